"""What a 3D generator leaves behind (guidance/export.py): turntable frames, transforms.json, GIF, and meshes, checked
on analytic fields through the NeRF generator's own renderer.

What each test would catch: a mesh in grid-index units or with two axes swapped (its silhouettes, rasterised here
independently by point-in-triangle, would not match the frames' alpha); a transforms.json whose matrices are
world-to-camera, transposed, or whose intrinsics do not match the frames (re-rendering at its poses would differ);
an empty or sub-threshold field written as an empty mesh file instead of a clear UserError; vertex colours from
the wrong place.
"""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from guidance.cameras import Camera, camera_from_c2w, turntable
from guidance.common import UserError
from guidance.export import auto_threshold, export_mesh, extract_mesh, write_turntable
from guidance.nerf import NerfGenerator

HALF = torch.tensor([0.5, 0.3, 0.2])  # a box longer along x than y than z: a swapped axis shows


class BoxField(torch.nn.Module):
    """A box of density `peak` with edges ~0.003 wide (a twentieth of a pixel in the frames: rays grazing a softer
    edge collect enough density to widen the alpha silhouette past the isosurface), yellow where x > 0 (its
    front), red elsewhere (colours as logits)."""

    def __init__(self, peak=60.0):
        super().__init__()
        self.peak = peak

    def density(self, p):
        inside = (HALF.to(p) - p.abs()).min(-1).values
        return self.peak * torch.sigmoid(inside / 0.001)

    def forward(self, p):
        yellow = torch.tensor([4.0, 4.0, -2.0]).to(p)
        red = torch.tensor([4.0, -2.0, -2.0]).to(p)
        return self.density(p), torch.where(p[:, :1] > 0, yellow, red)


def stub_model():
    """The least a model must offer the NeRF generator (an identity 'VAE' at 32 pixels, a black background)."""
    return SimpleNamespace(device=torch.device("cpu"), resolution=32, latent_size=32, latent_channels=3,
                           background=(0.0, 0.0, 0.0), encode_imgs=lambda imgs, requires_grad=False: imgs * 2 - 1)


def generator(field, **options):
    gen = NerfGenerator(stub_model(), render_size=32, samples=48, importance=32, shading="albedo",
                        background="black", **options)
    gen.field = field
    return gen


def rasterise(vertices: np.ndarray, faces: np.ndarray, camera: Camera, size: int) -> torch.Tensor:
    """Return the [size, size] bool mask of pixel centres inside any projected triangle (point-in-triangle)."""
    pixels, depth = camera.project(torch.from_numpy(vertices).double(), size, size)
    assert (depth > 0).all()
    tri = pixels[torch.from_numpy(faces)]  # [F, 3, 2]
    cols, rows = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="xy")
    p = torch.stack([cols, rows], -1).reshape(-1, 1, 2).double()
    def edge(a, b):
        return (b[:, 0] - a[:, 0]) * (p[..., 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (p[..., 0] - a[:, 0])
    mask = torch.zeros(p.shape[0], dtype=torch.bool)
    for chunk in tri.split(2048):
        a, b, c = chunk[:, 0], chunk[:, 1], chunk[:, 2]
        e1, e2, e3 = edge(a, b), edge(b, c), edge(c, a)
        inside = ((e1 >= 0) & (e2 >= 0) & (e3 >= 0)) | ((e1 <= 0) & (e2 <= 0) & (e3 <= 0))
        mask |= inside.any(1)
    return mask.view(size, size)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A box's turntable (8 frames at elevation 15) and mesh, as the NeRF generator writes them."""
    folder = tmp_path_factory.mktemp("export")
    gen = generator(BoxField())
    cameras = turntable(8, distance=1.75, fovy=55.0)
    paths = write_turntable(lambda c: gen.render_rgba(c, 32), cameras, folder / "run" / "turntable",
                            folder / "run" / "turntable.gif")
    # At half the peak the isosurface is the box's boundary (the sigmoid's midpoint).
    paths += export_mesh(gen.field.density, gen.vertex_colours, folder / "box", resolution=96, threshold=30.0)
    return gen, folder, paths


def test_files_are_written_where_the_interface_says(written):
    _, folder, paths = written
    names = [p.relative_to(folder).as_posix() for p in paths]
    assert names == [f"run/turntable/frame_{k:03d}.png" for k in range(8)] + [
        "run/turntable/transforms.json", "run/turntable.gif", "box.glb", "box.obj"]
    frame = Image.open(paths[0])
    assert frame.mode == "RGBA" and frame.size == (32, 32)
    assert Image.open(folder / "run" / "turntable.gif").n_frames == 8
    assert not list(folder.rglob("*.tmp"))


def test_mesh_silhouettes_match_the_frames_alpha(written):
    _, folder, _ = written
    mesh = trimesh.load(folder / "box.obj", force="mesh", process=False)
    transforms = json.loads((folder / "run" / "turntable" / "transforms.json").read_text())
    fovy = math.degrees(2 * math.atan(transforms["h"] / (2 * transforms["fl_y"])))
    ious = []
    for frame in transforms["frames"]:
        camera = camera_from_c2w(torch.tensor(frame["transform_matrix"]), fovy)
        silhouette = rasterise(np.asarray(mesh.vertices), np.asarray(mesh.faces), camera, transforms["h"])
        alpha = torch.from_numpy(np.array(Image.open(folder / "run" / "turntable" / frame["file_path"]))[..., 3])
        covered = alpha > 127
        ious.append(float((silhouette & covered).sum() / (silhouette | covered).sum()))
    # The box covers ~150-300 pixels per frame; its outline ~60: one pixel of disagreement along the outline is
    # IoU ~0.8 at worst, so 0.9 means the mesh sits where the frames do to within a fraction of a pixel.
    # Mutants caught (each run): vertices left in grid units (behind the camera), x and y swapped (IoU 0.54-0.64).
    assert min(ious) > 0.9, ious


def test_mesh_is_closed_and_coloured_from_the_field(written):
    _, folder, _ = written
    mesh = trimesh.load(folder / "box.glb", force="mesh", process=False)
    assert mesh.is_watertight and mesh.volume > 0
    # The box's volume is 1.0 x 0.6 x 0.4 = 0.24 (a mesh in grid units would be 31.5^3 times larger).
    assert 0.2 < mesh.volume < 0.28
    extent = mesh.vertices.max(0) - mesh.vertices.min(0)
    np.testing.assert_allclose(extent, 2 * HALF.numpy(), atol=0.05)
    colours = np.asarray(mesh.visual.vertex_colors)[:, :3].astype(float) / 255
    front, back = mesh.vertices[:, 0] > 0.2, mesh.vertices[:, 0] < -0.2
    # sigmoid(4) = 0.98, sigmoid(-2) = 0.12: yellow in front, red behind.
    np.testing.assert_allclose(colours[front].mean(0), [0.98, 0.98, 0.12], atol=0.02)
    np.testing.assert_allclose(colours[back].mean(0), [0.98, 0.12, 0.12], atol=0.02)


def test_transforms_json_reproduces_the_frames(written):
    gen, folder, _ = written
    transforms = json.loads((folder / "run" / "turntable" / "transforms.json").read_text())
    assert transforms["w"] == transforms["h"] == 32 and transforms["cx"] == transforms["cy"] == 16.0
    fovy = math.degrees(2 * math.atan(transforms["h"] / (2 * transforms["fl_y"])))
    assert fovy == pytest.approx(55.0)
    for k, frame in enumerate(transforms["frames"]):
        camera = camera_from_c2w(torch.tensor(frame["transform_matrix"]), fovy)
        again = gen.render_rgba(camera, 32)
        png = torch.from_numpy(np.array(Image.open(folder / "run" / "turntable" / frame["file_path"]))).float() / 255
        premultiplied = torch.cat([png[..., :3] * png[..., 3:], png[..., 3:]], -1).permute(2, 0, 1)
        # 8-bit rounding of straight colour and alpha: at most ~1/255 each, ~2/255 premultiplied.
        assert (again - premultiplied).abs().max() < 3 / 255, k
    assert transforms["frames"][0]["azimuth"] == 0.0 and transforms["frames"][2]["azimuth"] == 90.0


def test_auto_threshold_is_the_mean_of_the_occupied_densities():
    grid = torch.tensor([0.0, 1e-6, 2.0, 4.0, 9.0])
    assert auto_threshold(grid) == pytest.approx(5.0)  # threestudio: mean of the values above 1e-5
    vertices, _, level = extract_mesh(BoxField().density, resolution=32)
    assert 0 < level < 60 and len(vertices) > 0


def test_an_empty_or_diverged_field_is_a_clear_error_and_writes_no_file(tmp_path):
    empty = BoxField(peak=0.0)
    with pytest.raises(UserError, match="empty"):
        export_mesh(empty.density, lambda p: torch.zeros(p.shape[0], 3), tmp_path / "empty")
    with pytest.raises(UserError, match="largest density is 60"):
        extract_mesh(BoxField().density, resolution=24, threshold=100.0)
    with pytest.raises(UserError, match="non-finite"):
        extract_mesh(lambda p: torch.where(p[:, 0] > 0.5, torch.nan, 1.0), resolution=16)
    assert not list(tmp_path.iterdir())
    gen = generator(empty, turntable_frames=2, turntable_size=16, mesh_resolution=24)
    with pytest.warns(UserWarning, match="no mesh written for empty: the field is empty"):
        paths = gen.save(tmp_path, "empty")
    assert [p.name for p in paths] == ["frame_000.png", "frame_001.png", "transforms.json", "turntable.gif"]
    assert not (tmp_path / "empty.glb").exists() and not (tmp_path / "empty.obj").exists()
