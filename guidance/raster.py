"""A triangle rasteriser and texture lookup in plain PyTorch: what the mesh generator (guidance/mesh.py) renders with.

The geometry of a textured mesh is fixed, so only the texture lookup needs gradients (TEXTure's idea): per view,
the rasteriser finds, without gradients, which face each pixel sees, where on it (perspective-correct
barycentrics) and how far (the z-buffer); the pixels' UVs and normals are interpolated once and cached per
camera; every render then samples the texture at those UVs with grid_sample, which is differentiable in the
texture. No CUDA extension: it runs wherever PyTorch does.

Cameras are guidance/cameras.py's (OpenGL axes, pixel centres at (j + 0.5, i + 0.5), fl = H / (2 tan(fovy / 2))),
or any object with `c2w()` and `focal(height)`: `Pose` is one placed anywhere (a camera in a user's coordinates).

Cost is local: each face only visits the pixel centres inside its projected bounding box, as (face, pixel)
fragments generated in chunks of at most `fragment_budget`; a chunk's nearest fragment per pixel is kept with one
scatter-min over a key that packs (float32 depth, face id), so chunks combine in any order and equal depths go to
the lower face id. Faces are two-sided (no back-face culling: an open mesh shows its inside); a face with a vertex
closer than NEAR to the camera plane, or behind it, is skipped (there is no clipping; guidance/cameras.py keeps
cameras outside the unit sphere the mesh lives in, so this never happens there).

UV convention: OBJ's, (0, 0) the texture image's bottom-left corner, v up; the image's row 0 is its top (v = 1).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEAR = 1e-4  # world units in front of the camera plane
FRAGMENT_BUDGET = 1_000_000  # (face, pixel) pairs per chunk: ~100 MB of float64 temporaries
INSIDE_TOLERANCE = 1e-9  # barycentric slack, so that a pixel centre exactly on a shared edge is not missed by both
_NO_FRAGMENT = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class Pose:
    """A pinhole camera placed by its camera-to-world matrix (OpenGL axes, row-major 16 floats) and fovy in degrees."""

    matrix: tuple
    fovy: float

    @classmethod
    def from_c2w(cls, c2w, fovy: float) -> "Pose":
        """Return the Pose of a [4, 4] camera-to-world matrix (a tensor or nested lists) and fovy in degrees."""
        return cls(tuple(float(x) for x in torch.as_tensor(c2w, dtype=torch.float64).reshape(16).tolist()), float(fovy))

    def c2w(self) -> torch.Tensor:
        """Return the float64 [4, 4] camera-to-world matrix."""
        return torch.tensor(self.matrix, dtype=torch.float64).view(4, 4)

    def focal(self, height: int) -> float:
        """Return the focal length in pixels of an image `height` pixels tall: H / (2 tan(fovy / 2))."""
        return height / (2.0 * math.tan(math.radians(self.fovy) / 2.0))


@dataclass
class Fragments:
    """What each pixel of one view sees: face id (-1 for none), perspective-correct barycentrics, view depth."""

    face: torch.Tensor  # [H, W] int64
    bary: torch.Tensor  # [H, W, 3] float32, zero where face == -1
    depth: torch.Tensor  # [H, W] float32 along the camera's viewing axis, inf where face == -1

    @property
    def mask(self) -> torch.Tensor:
        """Return the [H, W] bool mask of pixels that see a face."""
        return self.face >= 0


def project(vertices: torch.Tensor, camera, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (float64 [V, 2] pixel coordinates (column, row), float64 [V] depth along the view axis) of vertices."""
    c2w = camera.c2w().to(vertices.device)
    w2c = torch.linalg.inv(c2w)
    cam = vertices.to(torch.float64) @ w2c[:3, :3].T + w2c[:3, 3]
    depth = -cam[:, 2]
    fl = camera.focal(height)
    safe = torch.where(depth > NEAR, depth, torch.ones_like(depth))  # the faces touching these are skipped anyway
    return torch.stack([width / 2 + fl * cam[:, 0] / safe, height / 2 - fl * cam[:, 1] / safe], -1), depth


@torch.no_grad()
def rasterize(vertices: torch.Tensor, faces: torch.Tensor, camera, height: int, width: int,
              fragment_budget: int = FRAGMENT_BUDGET) -> Fragments:
    """Return the Fragments of a triangle mesh (vertices [V, 3] world, faces [F, 3]) seen by camera at H x W."""
    device = vertices.device
    faces = faces.to(device=device, dtype=torch.int64)
    xy, depth = project(vertices, camera, height, width)
    table, boxes = _face_table(xy, depth, faces, height, width)
    counts = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    candidates = torch.nonzero(counts > 0).squeeze(1)
    counts = counts[candidates]
    best = torch.full((height * width,), _NO_FRAGMENT, dtype=torch.int64, device=device)
    ends = counts.cumsum(0)
    start = 0
    while start < candidates.numel():
        # As many faces as fit in the budget, and at least one (a face larger than the budget goes alone).
        offset = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(torch.searchsorted(ends, offset + fragment_budget, right=True)))
        chunk = candidates[start:stop]
        pixel, face = _fragments(boxes[chunk], chunk, counts[start:stop], width)
        lam, z = _screen_barycentrics(table, face, pixel, width)
        inside = (lam >= -INSIDE_TOLERANCE).all(1)
        # Positive float32 depths order as their int32 bit patterns: (depth bits, face id) in one int64 key.
        key = (z.float().view(torch.int32).to(torch.int64) << 32) | face
        best.scatter_reduce_(0, pixel[inside], key[inside], reduce="amin")
        start = stop
    covered = torch.nonzero(best != _NO_FRAGMENT).squeeze(1)
    face_id = torch.full((height * width,), -1, dtype=torch.int64, device=device)
    face_id[covered] = best[covered] & 0xFFFFFFFF
    bary = torch.zeros(height * width, 3, dtype=torch.float32, device=device)
    view_depth = torch.full((height * width,), math.inf, dtype=torch.float32, device=device)
    lam, z = _screen_barycentrics(table, face_id[covered], covered, width)
    bary[covered] = _perspective_correct(lam, table[face_id[covered]][:, 6:9]).float()
    view_depth[covered] = z.float()
    return Fragments(face_id.view(height, width), bary.view(height, width, 3), view_depth.view(height, width))


def _face_table(xy: torch.Tensor, depth: torch.Tensor, faces: torch.Tensor, height: int, width: int):
    """Return (float64 [F, 10] per-face table, int64 [F, 4] pixel boxes x0, y0, x1, y1, end-exclusive).

    Table columns: a (pixels), b - a, c - a, 1 / z_a, 1 / z_b, 1 / z_c, 1 / (signed double area). A face to skip
    (a vertex behind NEAR, zero area, not finite) gets an empty box.
    """
    tri = xy[faces]  # [F, 3, 2]
    a = tri[:, 0]
    e1 = tri[:, 1] - a
    e2 = tri[:, 2] - a
    area = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    tri_depth = depth[faces]
    usable = (tri_depth > NEAR).all(1) & (area.abs() > 1e-12) & torch.isfinite(tri).all(2).all(1)
    inv_depth = 1.0 / torch.where(tri_depth > NEAR, tri_depth, torch.ones_like(tri_depth))
    inv_area = 1.0 / torch.where(usable, area, torch.ones_like(area))
    table = torch.cat([a, e1, e2, inv_depth, inv_area[:, None]], 1)
    # Pixel j is visited when its centre j + 0.5 lies within the face's extent (with a hair of slack).
    lo = torch.ceil(tri.amin(1) - 0.5 - 1e-6)
    hi = torch.floor(tri.amax(1) - 0.5 + 1e-6) + 1
    limits = torch.tensor([width, height], dtype=torch.float64, device=xy.device)
    lo = torch.minimum(lo.clamp(min=0), limits)
    hi = torch.minimum(hi.clamp(min=0), limits)
    boxes = torch.cat([lo, hi], 1).to(torch.int64)
    boxes[~usable] = 0
    return table, boxes


def _fragments(boxes: torch.Tensor, face_ids: torch.Tensor, counts: torch.Tensor, width: int):
    """Return (flat pixel index, face id), both int64 [sum(counts)], of every pixel in each face's box."""
    local = torch.repeat_interleave(torch.arange(face_ids.numel(), device=boxes.device), counts)
    first = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    offset = torch.arange(local.numel(), device=boxes.device) - first
    box_w = (boxes[:, 2] - boxes[:, 0])[local]
    cols = boxes[local, 0] + offset % box_w
    rows = boxes[local, 1] + offset // box_w
    return rows * width + cols, face_ids[local]


def _screen_barycentrics(table: torch.Tensor, face: torch.Tensor, pixel: torch.Tensor, width: int):
    """Return (float64 [N, 3] screen-space barycentrics of each pixel centre in its face, float64 [N] view depth)."""
    ax, ay, e1x, e1y, e2x, e2y, inv_za, inv_zb, inv_zc, inv_area = table.index_select(0, face).unbind(1)
    dx = (pixel % width).to(torch.float64) + 0.5 - ax
    dy = torch.div(pixel, width, rounding_mode="floor").to(torch.float64) + 0.5 - ay
    lam_b = (dx * e2y - dy * e2x) * inv_area
    lam_c = (e1x * dy - e1y * dx) * inv_area
    lam = torch.stack([1.0 - lam_b - lam_c, lam_b, lam_c], 1)
    # 1 / z is affine in screen space: the depth at the pixel is 1 / (sum_k lam_k / z_k).
    return lam, 1.0 / (lam[:, 0] * inv_za + lam[:, 1] * inv_zb + lam[:, 2] * inv_zc)


def _perspective_correct(lam: torch.Tensor, inv_depth: torch.Tensor) -> torch.Tensor:
    """Return the barycentrics in the face itself from screen-space ones: b_k = (lam_k / z_k) / sum_j lam_j / z_j."""
    weighted = lam * inv_depth
    return weighted / weighted.sum(1, keepdim=True)


# ----------------------------------------------------------------------------------------------- texture lookup
def sample_texture(texture: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Return [N, C] bilinear samples of a [C, T, T] (or [1, C, T, T]) texture at uv [N, 2], differentiable in both.

    Texel (row r, column c) covers u in [c / T, (c + 1) / T] and v in [1 - (r + 1) / T, 1 - r / T]; outside the
    texel centres' span the edge texels are repeated (grid_sample's border padding; glTF's CLAMP_TO_EDGE).
    """
    texture = texture if texture.dim() == 4 else texture[None]
    grid = torch.stack([2 * uv[:, 0] - 1, 1 - 2 * uv[:, 1]], -1).to(texture.dtype)
    samples = F.grid_sample(texture, grid[None, None], mode="bilinear", padding_mode="border", align_corners=False)
    return samples[0, :, 0].T


@dataclass
class View:
    """One camera's rasterisation with what a render needs per covered pixel (no gradients)."""

    height: int
    width: int
    pixels: torch.Tensor  # [N] flat indices of the covered pixels
    uv: torch.Tensor  # [N, 2]
    normal: torch.Tensor  # [N, 3] unit, world, turned towards the camera
    fragments: Fragments


class ViewCache:
    """Views of one fixed mesh (vertices, faces, per-vertex uv and normals), rasterised once per (camera, H, W)."""

    def __init__(self, vertices: torch.Tensor, faces: torch.Tensor, uv: torch.Tensor, normals: torch.Tensor,
                 max_views: int = 64, fragment_budget: int = FRAGMENT_BUDGET):
        self.vertices, self.faces = vertices.detach(), faces.detach()
        self.uv, self.normals = uv.detach().float(), normals.detach().float()
        self.max_views = int(max_views)
        self.fragment_budget = int(fragment_budget)
        self._views: OrderedDict = OrderedDict()
        self.misses = 0

    def __call__(self, camera, height: int, width: int) -> View:
        """Return the View of camera at H x W: from the cache, or rasterised (the least recently used one goes)."""
        key = (camera, int(height), int(width))
        if key in self._views:
            self._views.move_to_end(key)
            return self._views[key]
        self.misses += 1
        view = self.rasterize(camera, height, width)
        if self.max_views > 0:
            self._views[key] = view
            while len(self._views) > self.max_views:
                self._views.popitem(last=False)
        return view

    @torch.no_grad()
    def rasterize(self, camera, height: int, width: int) -> View:
        """Return the View of camera at H x W, rasterised now (not cached)."""
        fragments = rasterize(self.vertices, self.faces, camera, height, width, self.fragment_budget)
        pixels = torch.nonzero(fragments.face.reshape(-1) >= 0).squeeze(1)
        face = fragments.face.reshape(-1)[pixels]
        bary = fragments.bary.reshape(-1, 3)[pixels]
        corners = self.faces[face]  # [N, 3]
        uv = (bary[:, :, None] * self.uv[corners]).sum(1)
        normal = F.normalize((bary[:, :, None] * self.normals[corners]).sum(1), dim=-1)
        # Two-sided: a normal that points away from the camera is flipped (the inside of an open mesh).
        centre = camera.c2w()[:3, 3].to(self.vertices.device, torch.float32)
        points = (bary[:, :, None] * self.vertices[corners].float()).sum(1)
        towards_camera = centre - points
        normal = torch.where(((normal * towards_camera).sum(-1, keepdim=True) < 0), -normal, normal)
        return View(int(height), int(width), pixels, uv, normal, fragments)


def render_view(view: View, texture: torch.Tensor, background: torch.Tensor, light: torch.Tensor | None = None,
                ambient: float = 1.0) -> torch.Tensor:
    """Return the [3, H, W] image of a view: texture albedo (light None) or albedo x (ambient + (1 - ambient)
    max(0, n . light)) for a unit light direction [3], over a [3] background colour; differentiable in texture."""
    albedo = sample_texture(texture, view.uv)  # [N, 3]
    colour = albedo
    if light is not None:
        lambert = (view.normal @ light.to(view.normal)).clamp(min=0)
        colour = albedo * (ambient + (1 - ambient) * lambert)[:, None]
    n_pixels = view.height * view.width
    image = background.to(colour).view(3, 1).expand(3, n_pixels)
    image = image.index_copy(1, view.pixels, colour.T)
    return image.view(3, view.height, view.width)
