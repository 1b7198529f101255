"""Cameras c of x = g(theta; c): where a 3D generator is seen from, in one world frame shared by every 3D tool here.

World frame (threestudio's `data/uncond.py`): z up; a camera at elevation el, azimuth az (degrees) and distance d
sits at d (cos el cos az, cos el sin az, sin el) and looks at the origin, so azimuth 0 looks along -x and sees the
object's front, its +x side; azimuth 90 sees its +y side. Camera axes are OpenGL's (instant-ngp / nerfstudio's
`transforms.json`): x right, y up, the camera looks along -z. fovy is the vertical field of view; a pixel (i, j)
of an H x W image has its centre at (j + 0.5, i + 0.5), the focal length is fl = H / (2 tan(fovy / 2)) pixels and
the principal point is (W / 2, H / 2), so that the ray through pixel (i, j) has camera-space direction
((j + 0.5 - W / 2) / fl, -(i + 0.5 - H / 2) / fl, -1).

Everything here is float64 on the CPU (a camera is a handful of numbers); rays are made on the device asked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from guidance.common import UserError

# DreamFusion / threestudio defaults: (low, high) per camera parameter, degrees and world units.
DEFAULT_ELEVATION = (-10.0, 45.0)
DEFAULT_AZIMUTH = (-180.0, 180.0)
DEFAULT_DISTANCE = (1.5, 2.0)
DEFAULT_FOVY = (40.0, 70.0)
TURNTABLE_ELEVATION = 15.0
# View-dependent prompts (threestudio): front |az| < 45, back |az| > 135, overhead el > 60, side otherwise.
FRONT_HALF_ANGLE = 45.0
BACK_HALF_ANGLE = 45.0
OVERHEAD_ELEVATION = 60.0
VIEWS = ("front", "side", "back", "overhead")


def wrap_azimuth(azimuth: float) -> float:
    """Return the azimuth in degrees wrapped into [-180, 180)."""
    return (float(azimuth) + 180.0) % 360.0 - 180.0


@dataclass(frozen=True)
class Camera:
    """One pinhole camera looking at the origin: elevation, azimuth, fovy in degrees; distance in world units."""

    elevation: float
    azimuth: float
    distance: float
    fovy: float

    def position(self) -> torch.Tensor:
        """Return the camera centre d (cos el cos az, cos el sin az, sin el) as a float64 [3] tensor."""
        el, az = math.radians(self.elevation), math.radians(self.azimuth)
        return self.distance * torch.tensor([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)],
                                            dtype=torch.float64)

    def c2w(self) -> torch.Tensor:
        """Return the float64 [4, 4] camera-to-world matrix (OpenGL axes: columns right, up, back, centre)."""
        centre = self.position()
        forward = -centre / centre.norm()
        world_up = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
        right = torch.linalg.cross(forward, world_up)
        if right.norm() < 1e-9:  # straight above or below: any right vector perpendicular to forward will do
            right = torch.tensor([-math.sin(math.radians(self.azimuth)), math.cos(math.radians(self.azimuth)), 0.0],
                                 dtype=torch.float64)
        right = right / right.norm()
        up = torch.linalg.cross(right, forward)
        matrix = torch.eye(4, dtype=torch.float64)
        matrix[:3, 0], matrix[:3, 1], matrix[:3, 2], matrix[:3, 3] = right, up, -forward, centre
        return matrix

    def focal(self, height: int) -> float:
        """Return the focal length in pixels of an image `height` pixels tall: H / (2 tan(fovy / 2))."""
        return height / (2.0 * math.tan(math.radians(self.fovy) / 2.0))

    def rays(self, height: int, width: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (origins, unit directions), each [H, W, 3] in world coordinates, one ray per pixel centre."""
        c2w = self.c2w()
        fl = self.focal(height)
        j = torch.arange(width, dtype=torch.float64) + 0.5
        i = torch.arange(height, dtype=torch.float64) + 0.5
        ii, jj = torch.meshgrid(i, j, indexing="ij")
        directions = torch.stack([(jj - width / 2) / fl, -(ii - height / 2) / fl, -torch.ones_like(ii)], dim=-1)
        directions = directions @ c2w[:3, :3].T
        directions = directions / directions.norm(dim=-1, keepdim=True)
        origins = c2w[:3, 3].expand(height, width, 3)
        return origins.to(device=device, dtype=dtype), directions.to(device=device, dtype=dtype)

    def project(self, points: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (pixel coordinates [N, 2] as (column, row) in pixel units, depth [N] along the view axis) of
        world points [N, 3]; a point in front of the camera has depth > 0."""
        w2c = torch.linalg.inv(self.c2w()).to(points.dtype)
        cam = points @ w2c[:3, :3].T + w2c[:3, 3]
        depth = -cam[:, 2]
        fl = self.focal(height)
        cols = width / 2 + fl * cam[:, 0] / depth
        rows = height / 2 - fl * cam[:, 1] / depth
        return torch.stack([cols, rows], dim=-1), depth

    def view(self) -> str:
        """Return the view this camera sees: 'overhead', 'front', 'back' or 'side' (threestudio's thresholds)."""
        if self.elevation > OVERHEAD_ELEVATION:
            return "overhead"
        azimuth = abs(wrap_azimuth(self.azimuth))
        if azimuth < FRONT_HALF_ANGLE:
            return "front"
        if azimuth > 180.0 - BACK_HALF_ANGLE:
            return "back"
        return "side"


@dataclass(frozen=True)
class CameraRanges:
    """The ranges cameras are drawn from, uniformly per parameter (DreamFusion / threestudio defaults)."""

    elevation: tuple = DEFAULT_ELEVATION
    azimuth: tuple = DEFAULT_AZIMUTH
    distance: tuple = DEFAULT_DISTANCE
    fovy: tuple = DEFAULT_FOVY

    def check(self) -> "CameraRanges":
        """Return self after checking every range (UserError naming the flag and the fix)."""
        limits = {"elevation": (-90.0, 90.0), "azimuth": (-360.0, 360.0), "distance": (0.0, math.inf),
                  "fovy": (0.0, 180.0)}
        for name, (lowest, highest) in limits.items():
            values = getattr(self, name)
            if len(values) != 2 or not all(math.isfinite(float(v)) for v in values):
                raise UserError(f"--{name}_range {' '.join(map(str, values))}: give two finite numbers MIN MAX")
            low, high = (float(v) for v in values)
            if low > high:
                raise UserError(f"--{name}_range {low:g} {high:g}: MIN is above MAX; give MIN MAX")
            open_low = name in ("distance", "fovy")
            if low < lowest or high > highest or (open_low and low <= lowest) or (name == "fovy" and high >= highest):
                bounds = {"elevation": "within [-90, 90] degrees", "azimuth": "within [-360, 360] degrees",
                          "distance": "positive (world units; the object fits in the unit sphere)",
                          "fovy": "within (0, 180) degrees"}[name]
                raise UserError(f"--{name}_range {low:g} {high:g}: must be {bounds}")
        if min(self.distance) <= 1.0:
            raise UserError(f"--distance_range {self.distance[0]:g} {self.distance[1]:g}: the camera must stay outside "
                            f"the unit sphere the object lives in; give distances above 1, e.g. 1.5 2.0")
        return self

    def middle(self) -> Camera:
        """Return the camera at the middle of every range, azimuth 0 (the front): the default evaluation camera."""
        mid = lambda pair: (float(pair[0]) + float(pair[1])) / 2.0  # noqa: E731
        return Camera(mid(self.elevation), 0.0, mid(self.distance), mid(self.fovy))


class CameraSampler:
    """Draws `views_per_step` cameras per optimisation step, each parameter uniform in its range."""

    def __init__(self, ranges: CameraRanges = CameraRanges(), views_per_step: int = 1,
                 generator: torch.Generator | None = None):
        if int(views_per_step) < 1:
            raise UserError(f"--views_per_step {views_per_step} must be at least 1")
        self.ranges = ranges.check()
        self.views_per_step = int(views_per_step)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def __call__(self, step: int | None = None) -> list[Camera]:
        """Return this step's cameras (the step index is not used: every step draws afresh)."""
        u = torch.rand(self.views_per_step, 4, generator=self.generator, dtype=torch.float64).tolist()
        cameras = []
        for row in u:
            values = [float(lo) + (float(hi) - float(lo)) * r for (lo, hi), r in
                      zip((self.ranges.elevation, self.ranges.azimuth, self.ranges.distance, self.ranges.fovy), row)]
            cameras.append(Camera(values[0], wrap_azimuth(values[1]), values[2], values[3]))
        return cameras


def turntable(frames: int, elevation: float = TURNTABLE_ELEVATION, distance: float | None = None,
              fovy: float | None = None, ranges: CameraRanges = CameraRanges()) -> list[Camera]:
    """Return `frames` cameras around the object at one elevation, azimuth 0 (the front) first, counter-clockwise
    seen from above; distance and fovy default to the middle of their training ranges."""
    if int(frames) < 1:
        raise UserError(f"--turntable_frames {frames} must be at least 1")
    middle = ranges.middle()
    distance = middle.distance if distance is None else float(distance)
    fovy = middle.fovy if fovy is None else float(fovy)
    return [Camera(float(elevation), wrap_azimuth(360.0 * k / frames), distance, fovy) for k in range(int(frames))]


def transforms_json(cameras: list[Camera], width: int, height: int, file_paths: list[str]) -> dict:
    """Return the instant-ngp / nerfstudio `transforms.json` of these cameras (shared intrinsics, OpenGL c2w)."""
    if not cameras:
        raise ValueError("transforms_json needs at least one camera")
    if len({(c.fovy) for c in cameras}) != 1:
        raise ValueError("transforms_json writes one set of intrinsics: every camera must have the same fovy")
    fl = cameras[0].focal(height)
    return {
        "camera_model": "OPENCV", "w": int(width), "h": int(height), "fl_x": fl, "fl_y": fl,
        "cx": width / 2.0, "cy": height / 2.0, "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0,
        "camera_angle_x": 2.0 * math.atan(width / (2.0 * fl)), "camera_angle_y": math.radians(cameras[0].fovy),
        "frames": [{"file_path": path, "transform_matrix": camera.c2w().tolist(),
                    "elevation": camera.elevation, "azimuth": camera.azimuth, "distance": camera.distance}
                   for camera, path in zip(cameras, file_paths)],
    }


def camera_from_c2w(c2w: torch.Tensor, fovy: float) -> Camera:
    """Return the Camera (looking at the origin) whose camera-to-world matrix is c2w (the inverse of Camera.c2w)."""
    centre = torch.as_tensor(c2w, dtype=torch.float64)[:3, 3]
    distance = float(centre.norm())
    elevation = math.degrees(math.asin(max(-1.0, min(1.0, float(centre[2]) / distance))))
    azimuth = math.degrees(math.atan2(float(centre[1]), float(centre[0])))
    return Camera(elevation, azimuth, distance, float(fovy))
