"""The camera convention every 3D part shares (guidance/cameras.py): z up, azimuth 0 sees the front (+x), OpenGL
camera axes, pixel centres; checked against hand-computed numbers, not against the module's own formulas."""
import math

import pytest
import torch

from guidance.cameras import (Camera, CameraRanges, CameraSampler, camera_from_c2w, transforms_json, turntable,
                              wrap_azimuth)
from guidance.common import UserError


def test_azimuth_zero_sits_on_plus_x_and_looks_at_the_origin():
    cam = Camera(elevation=0.0, azimuth=0.0, distance=2.0, fovy=60.0)
    assert torch.allclose(cam.position(), torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64))
    c2w = cam.c2w()
    # OpenGL axes: the camera looks along its -z column, its y column is world up, and its x column (right) is
    # forward x up = (-1, 0, 0) x (0, 0, 1) = (0, 1, 0): standing on +x facing the origin, +y is on the right.
    assert torch.allclose(-c2w[:3, 2], torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(c2w[:3, 1], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(c2w[:3, 0], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(torch.linalg.det(c2w[:3, :3]), torch.tensor(1.0, dtype=torch.float64))


def test_elevation_and_azimuth_place_the_camera():
    cam = Camera(elevation=30.0, azimuth=90.0, distance=1.5, fovy=50.0)
    expected = 1.5 * torch.tensor([0.0, math.cos(math.radians(30)), math.sin(math.radians(30))], dtype=torch.float64)
    assert torch.allclose(cam.position(), expected, atol=1e-12)
    assert cam.view() == "side"
    assert Camera(0, 170, 2, 50).view() == "back" and Camera(0, -170, 2, 50).view() == "back"
    assert Camera(0, 44, 2, 50).view() == "front" and Camera(0, -46, 2, 50).view() == "side"
    assert Camera(61, 0, 2, 50).view() == "overhead"


def test_rays_through_pixel_centres_and_projection_agree():
    cam = Camera(elevation=20.0, azimuth=-35.0, distance=1.8, fovy=55.0)
    height, width = 6, 8
    origins, directions = cam.rays(height, width, dtype=torch.float64)
    assert torch.allclose(origins, cam.position().expand(height, width, 3))
    assert torch.allclose(directions.norm(dim=-1), torch.ones(height, width, dtype=torch.float64))
    points = (origins + 1.3 * directions).reshape(-1, 3)
    pixels, depth = cam.project(points, height, width)
    cols, rows = torch.meshgrid(torch.arange(width) + 0.5, torch.arange(height) + 0.5, indexing="xy")
    assert torch.allclose(pixels[:, 0], cols.reshape(-1).double(), atol=1e-9)
    assert torch.allclose(pixels[:, 1], rows.reshape(-1).double(), atol=1e-9)
    assert (depth > 0).all()
    # The image's top row sees higher z than its bottom row; fovy spans the image height exactly.
    top, bottom = directions[0, width // 2], directions[-1, width // 2]
    assert top[2] > bottom[2]
    half = math.tan(math.radians(55.0) / 2)
    corner_dir = torch.tensor([0.0, half, -1.0], dtype=torch.float64) @ cam.c2w()[:3, :3].T
    pix, _ = cam.project((cam.position() + corner_dir).unsqueeze(0), height, width)
    assert abs(float(pix[0, 1])) < 1e-9  # on the image's top edge


def test_c2w_round_trips_and_turntable_starts_at_the_front():
    frames = turntable(8, elevation=15.0)
    assert [round(c.azimuth) for c in frames] == [0, 45, 90, 135, -180, -135, -90, -45]
    assert frames[0].distance == pytest.approx(1.75) and frames[0].fovy == pytest.approx(55.0)
    for cam in frames:
        back = camera_from_c2w(cam.c2w(), cam.fovy)
        assert back.elevation == pytest.approx(cam.elevation) and back.distance == pytest.approx(cam.distance)
        assert wrap_azimuth(back.azimuth - cam.azimuth) == pytest.approx(0.0, abs=1e-9)


def test_transforms_json_is_nerfstudio_shaped():
    frames = turntable(4)
    data = transforms_json(frames, 64, 64, [f"frame_{k:03d}.png" for k in range(4)])
    assert data["w"] == 64 and data["h"] == 64 and data["cx"] == 32.0
    assert data["fl_x"] == pytest.approx(32.0 / math.tan(math.radians(55.0) / 2))
    assert len(data["frames"]) == 4 and len(data["frames"][0]["transform_matrix"]) == 4
    assert torch.allclose(torch.tensor(data["frames"][2]["transform_matrix"], dtype=torch.float64), frames[2].c2w())


def test_sampler_draws_inside_the_ranges_and_is_seeded():
    ranges = CameraRanges(elevation=(0, 10), azimuth=(-30, 30), distance=(1.5, 1.6), fovy=(40, 41))
    draw = CameraSampler(ranges, views_per_step=3, generator=torch.Generator().manual_seed(1))
    cams = [c for _ in range(50) for c in draw()]
    assert len(cams) == 150
    assert all(0 <= c.elevation <= 10 and -30 <= c.azimuth <= 30 and 1.5 <= c.distance <= 1.6 for c in cams)
    again = CameraSampler(ranges, views_per_step=3, generator=torch.Generator().manual_seed(1))
    assert again() == cams[:3]


@pytest.mark.parametrize("ranges, flag", [
    (CameraRanges(elevation=(50, 10)), "elevation_range"), (CameraRanges(distance=(0.5, 2.0)), "distance_range"),
    (CameraRanges(fovy=(40, 190)), "fovy_range"), (CameraRanges(azimuth=(0, float("nan"))), "azimuth_range"),
])
def test_bad_ranges_name_the_flag(ranges, flag):
    with pytest.raises(UserError, match=flag):
        ranges.check()
