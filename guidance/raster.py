"""A triangle rasteriser and texture lookup in plain PyTorch: what the mesh generator (guidance/mesh.py) renders with.

The geometry of a textured mesh is fixed, so only the texture lookup needs gradients (TEXTure's idea): per view,
the rasteriser finds, without gradients, which face each pixel sees, where on it (perspective-correct
barycentrics) and how far (the z-buffer); the pixels' UVs and normals are interpolated once and cached per
camera; every render then samples the texture at those UVs with grid_sample, which is differentiable in the
texture. No CUDA extension: it runs wherever PyTorch does.

Cameras are guidance/cameras.py's (OpenGL axes, pixel centres at (j + 0.5, i + 0.5), fl = H / (2 tan(fovy / 2))),
or any object with `c2w()` and `focal(height)`: `Pose` is one placed anywhere (a camera in a user's coordinates).

Cost is local: each face only visits the pixel centres inside its projected bounding box. Faces are grouped by
box shape (sides rounded up to 1, 2, 3, 4, 6, 8, 12, ...), so that a group's (face, pixel) fragments form a dense
[faces, kh, kw] grid computed by broadcasting per-face numbers, in chunks of at most `fragment_budget` fragments.
The nearest fragment per pixel is kept by one scatter-max over an int64 key packing (float32 1 / depth, ~face id),
so chunks combine in any order and equal depths go to the lower face id; the winners' barycentrics and depths are
then recomputed in float64. Faces are two-sided (no back-face culling: an open mesh shows its inside); a face with
a vertex closer than NEAR to the camera plane, or behind it, is skipped (there is no clipping; guidance/cameras.py
keeps cameras outside the unit sphere the mesh lives in, so this never happens there).

UV convention: OBJ's, (0, 0) the texture image's bottom-left corner, v up; the image's row 0 is its top (v = 1).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEAR = 1e-4  # world units in front of the camera plane
FRAGMENT_BUDGET = 1_000_000  # (face, pixel) pairs per chunk: ~60 MB of temporaries
# Barycentric slack (float32 computes them to ~1e-7): a pixel centre on an edge shared by two faces is never
# missed by both; a silhouette grows by at most 1e-6 of its face.
INSIDE_TOLERANCE = 1e-6
_FACE_BITS = 0xFFFFFFFF
BUCKET_SIDES = tuple(sorted({2 ** k for k in range(15)} | {3 * 2 ** k for k in range(14)}))  # 1, 2, 3, 4, 6, ...


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
    box_w, box_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    # Faces are grouped by box shape, each side rounded up to 1, 2, 3, 4, 6, 8, 12, ... (at most 1.5x per side
    # beyond 2): a group's fragments are then a dense [faces, kh, kw] grid, computed by broadcasting per-face
    # numbers, with no per-fragment gathers.
    sides = torch.tensor(BUCKET_SIDES, device=device)
    bucket = torch.searchsorted(sides, box_h) * len(BUCKET_SIDES) + torch.searchsorted(sides, box_w)
    usable = torch.nonzero((box_w > 0) & (box_h > 0)).squeeze(1)
    order = usable[torch.argsort(bucket[usable], stable=True)]
    groups, counts = torch.unique_consecutive(bucket[order], return_counts=True)
    # float32 per-face numbers, a's position relative to its box corner so that float32 keeps ~1e-7 px.
    corner = table[:, 0:2] - boxes[:, 0:2].to(table.dtype)
    local = torch.cat([corner, table[:, 2:]], 1).float()
    best = torch.full((height * width + 1,), -1, dtype=torch.int64, device=device)  # + 1: a slot for misses
    first = 0
    for group, count in zip(groups.tolist(), counts.tolist()):
        kh, kw = BUCKET_SIDES[group // len(BUCKET_SIDES)], BUCKET_SIDES[group % len(BUCKET_SIDES)]
        per_chunk = max(1, fragment_budget // (kh * kw))
        for lo in range(first, first + count, per_chunk):
            chunk = order[lo:min(lo + per_chunk, first + count)]
            pixel, key = _dense_fragments(local[chunk], boxes[chunk], chunk, kh, kw, height, width)
            best.scatter_reduce_(0, pixel.reshape(-1), key.reshape(-1), reduce="amax")
        first += count
    best = best[:-1]
    covered = torch.nonzero(best >= 0).squeeze(1)
    face_id = torch.full((height * width,), -1, dtype=torch.int64, device=device)
    face_id[covered] = _FACE_BITS - (best[covered] & _FACE_BITS)
    bary = torch.zeros(height * width, 3, dtype=torch.float32, device=device)
    view_depth = torch.full((height * width,), math.inf, dtype=torch.float32, device=device)
    lam, inv_depth = _screen_barycentrics(table, face_id[covered], covered, width)
    weighted = lam * inv_depth  # perspective-correct: b_k = (lam_k / z_k) / sum_j lam_j / z_j; depth = 1 / sum
    bary[covered] = (weighted / weighted.sum(1, keepdim=True)).float()
    view_depth[covered] = (1.0 / weighted.sum(1)).float()
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


def _dense_fragments(local: torch.Tensor, boxes: torch.Tensor, face_ids: torch.Tensor, kh: int, kw: int,
                     height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (pixel index, z-buffer key), both int64 [n, kh, kw], of the faces' kh x kw pixel grids from their
    box corners; a grid cell outside its face (or its box) gets pixel H * W (the spare slot) and key -1.

    The key packs (float32 1 / depth, ~face id): a larger key is nearer, and at equal depths the lower face id.
    """
    ax, ay, e1x, e1y, e2x, e2y, inv_za, inv_zb, inv_zc, inv_area = (c[:, None, None] for c in local.unbind(1))
    cols = torch.arange(kw, device=local.device)
    rows = torch.arange(kh, device=local.device)
    dx = (cols.float() + 0.5)[None, None, :] - ax
    dy = (rows.float() + 0.5)[None, :, None] - ay
    lam_b = (dx * e2y - dy * e2x) * inv_area
    lam_c = (e1x * dy - e1y * dx) * inv_area
    lam_a = 1.0 - lam_b - lam_c
    inside = (lam_a >= -INSIDE_TOLERANCE) & (lam_b >= -INSIDE_TOLERANCE) & (lam_c >= -INSIDE_TOLERANCE)
    x0, y0, x1, y1 = (c[:, None, None] for c in boxes.unbind(1))
    inside &= (cols[None, None, :] < x1 - x0) & (rows[None, :, None] < y1 - y0)
    inv_depth = lam_a * inv_za + lam_b * inv_zb + lam_c * inv_zc
    key = (inv_depth.view(torch.int32).to(torch.int64) << 32) | (_FACE_BITS - face_ids)[:, None, None]
    pixel = (y0 + rows[None, :, None]) * width + (x0 + cols[None, None, :])
    return torch.where(inside, pixel, height * width), torch.where(inside, key, -1)


def _screen_barycentrics(table: torch.Tensor, face: torch.Tensor, pixel: torch.Tensor, width: int):
    """Return (float64 [N, 3] screen-space barycentrics of each pixel centre in its face, [N, 3] 1 / vertex depths)."""
    ax, ay, e1x, e1y, e2x, e2y, inv_za, inv_zb, inv_zc, inv_area = table.index_select(0, face).unbind(1)
    dx = (pixel % width).to(torch.float64) + 0.5 - ax
    dy = torch.div(pixel, width, rounding_mode="floor").to(torch.float64) + 0.5 - ay
    lam_b = (dx * e2y - dy * e2x) * inv_area
    lam_c = (e1x * dy - e1y * dx) * inv_area
    return torch.stack([1.0 - lam_b - lam_c, lam_b, lam_c], 1), torch.stack([inv_za, inv_zb, inv_zc], 1)


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
    """What a render of one camera needs per covered pixel (no gradients): ~28 bytes per covered pixel."""

    height: int
    width: int
    pixels: torch.Tensor  # [N] flat indices of the covered pixels
    uv: torch.Tensor  # [N, 2]
    normal: torch.Tensor  # [N, 3] unit, world, turned towards the camera

    def mask(self) -> torch.Tensor:
        """Return the [H, W] float mask: 1 where the mesh covers the pixel, 0 elsewhere."""
        mask = torch.zeros(self.height * self.width, device=self.pixels.device)
        return mask.index_fill(0, self.pixels, 1.0).view(self.height, self.width)


class ViewCache:
    """Views of one fixed mesh (vertices, faces, per-vertex uv and normals), rasterised once per (camera, H, W).

    Views live on the tensors' device. MPS has no float64, so there the rasteriser runs on the CPU and the
    views are moved.
    """

    def __init__(self, vertices: torch.Tensor, faces: torch.Tensor, uv: torch.Tensor, normals: torch.Tensor,
                 max_views: int = 16, fragment_budget: int = FRAGMENT_BUDGET):
        self.device = vertices.device
        work = torch.device("cpu") if self.device.type == "mps" else self.device
        self.vertices, self.faces = vertices.detach().to(work), faces.detach().to(work)
        self.uv, self.normals = uv.detach().float().to(work), normals.detach().float().to(work)
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
        return View(int(height), int(width), pixels.to(self.device), uv.to(self.device), normal.to(self.device))


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
