"""The rasteriser and texture lookup (guidance/raster.py) against independent computations.

References written here, not taken from the module: Moller-Trumbore ray-triangle intersection on guidance/cameras.py's
pixel rays (float64, every ray against every triangle), a hand-written bilinear lookup. Each test names the mutant
(a plausible bug) that fails it.
"""
import math

import pytest
import torch

from guidance.cameras import Camera
from guidance.raster import Pose, ViewCache, rasterize, render_view, sample_texture

EDGE = 1e-5  # barycentric margin: the rasteriser's slack (1e-6) plus float32 rounding; either answer is right there


def moller_trumbore(origins, directions, triangles):
    """Return (t, u, v) [P, F] of every ray against every triangle (float64); t = inf where the ray misses."""
    a, b, c = triangles[:, 0], triangles[:, 1], triangles[:, 2]
    e1, e2 = (b - a)[None], (c - a)[None]
    d = directions[:, None]
    p = torch.linalg.cross(d.expand_as(e2.expand(d.shape[0], -1, -1)), e2.expand(d.shape[0], -1, -1))
    det = (e1 * p).sum(-1)
    inv = 1.0 / torch.where(det.abs() > 1e-15, det, torch.ones_like(det))
    s = origins[:, None] - a[None]
    u = (s * p).sum(-1) * inv
    q = torch.linalg.cross(s, e1.expand_as(s))
    v = (d * q).sum(-1) * inv
    t = (e2 * q).sum(-1) * inv
    return t, u, v, det.abs() > 1e-15


def ray_cast(origins, directions, triangles):
    """Return (nearest face [P] or -1, its barycentrics [P, 3], ray distance [P], ambiguous [P] bool) of rays [P, 3]
    against triangles [F, 3, 3], by brute force in float64."""
    t, u, v, ok = moller_trumbore(origins.double(), directions.double(), triangles.double())
    margin = torch.minimum(torch.minimum(u, v), 1 - u - v)
    hit = ok & (margin >= 0) & (t > 0)
    depth = torch.where(hit, t, torch.full_like(t, math.inf))
    two = depth.topk(min(2, depth.shape[1]), dim=1, largest=False)
    nearest, face = two.values[:, 0], two.indices[:, 0]
    face = torch.where(torch.isfinite(nearest), face, torch.full_like(face, -1))
    # Ambiguous: a triangle grazed within EDGE of its edge, or the two nearest hits at (almost) the same depth.
    grazed = (ok & (margin.abs() < EDGE) & (t > 0)).any(1)
    second = two.values[:, -1] if depth.shape[1] > 1 else torch.full_like(nearest, math.inf)
    tie = torch.isfinite(second) & ((second - nearest) < 1e-6 * nearest)
    rows = torch.arange(face.numel())
    uu, vv = u[rows, face.clamp(min=0)], v[rows, face.clamp(min=0)]
    return face, torch.stack([1 - uu - vv, uu, vv], 1), nearest, grazed | tie


def reference_raster(vertices, faces, camera, height, width):
    """Return (face [H*W], bary [H*W, 3], view depth [H*W], ambiguous [H*W] bool) by casting the camera's pixel rays."""
    origins, directions = camera.rays(height, width, dtype=torch.float64)
    directions = directions.reshape(-1, 3)
    face, bary, distance, ambiguous = ray_cast(origins.reshape(-1, 3), directions, vertices.double()[faces])
    forward = -camera.c2w()[:3, 2]
    return face, bary, distance * (directions @ forward), ambiguous


def random_soup(generator, count=50):
    """Return (vertices, faces) of `count` random, mutually intersecting triangles inside radius ~0.8."""
    centres = (torch.rand(count, 1, 3, generator=generator, dtype=torch.float64) - 0.5) * 0.9
    offsets = (torch.rand(count, 3, 3, generator=generator, dtype=torch.float64) - 0.5) * 0.6
    return (centres + offsets).reshape(-1, 3).float(), torch.arange(3 * count).view(count, 3)


def noisy_sphere(generator):
    """Return (vertices, faces) of a closed icosphere (80 faces) of radius ~0.5 with jittered vertices."""
    trimesh = pytest.importorskip("trimesh")
    ico = trimesh.creation.icosphere(subdivisions=1, radius=0.5)
    vertices = torch.tensor(ico.vertices, dtype=torch.float64)
    vertices = vertices * (1 + 0.15 * torch.rand(len(vertices), 1, generator=generator, dtype=torch.float64))
    return vertices.float(), torch.tensor(ico.faces, dtype=torch.int64)


def random_camera(generator, fovy_range=(30.0, 70.0)):
    el, az, dist, fovy = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    low, high = fovy_range
    return Camera(-60 + 120 * el, -180 + 360 * az, 1.6 + 1.0 * dist, low + (high - low) * fovy)


# ----------------------------------------------------------------------------------------------- rasteriser
@pytest.mark.parametrize("mesh", ["soup", "sphere", "cropped"])
def test_faces_depths_and_barycentrics_equal_ray_triangle_intersection(mesh):
    # Mutants: the z-buffer keeping the farthest face (face ids), pixel corners instead of centres or rows and
    # columns swapped (face ids on a non-square image), screen-space barycentrics without the perspective
    # correction (bary off by ~1e-2 on these slanted faces), depth along the ray instead of the view axis;
    # "cropped" (a narrow field of view: faces cross the image's borders): a face's pixel grid running past the
    # image's right edge into the next row.
    generator = torch.Generator().manual_seed(7)
    vertices, faces = noisy_sphere(generator) if mesh == "sphere" else random_soup(generator)
    height, width = 37, 53
    checked = 0
    for _ in range(4):
        camera = random_camera(generator, (12.0, 20.0) if mesh == "cropped" else (30.0, 70.0))
        frags = rasterize(vertices, faces, camera, height, width)
        face, bary, depth, ambiguous = reference_raster(vertices, faces, camera, height, width)
        # A pixel centre within 1e-6 (barycentric) of an edge may go to either face, or be missed, in float
        # arithmetic: only those may differ. They must stay rare for the comparison to mean anything.
        assert float(ambiguous.float().mean()) < 0.01
        sure = ~ambiguous
        ours = frags.face.reshape(-1)
        assert torch.equal(ours[sure], face[sure])
        hit = sure & (face >= 0)
        assert int(hit.sum()) > 100  # the mesh fills a good part of every view
        torch.testing.assert_close(frags.bary.reshape(-1, 3)[hit].double(), bary[hit], atol=2e-5, rtol=0)
        torch.testing.assert_close(frags.depth.reshape(-1)[hit].double(), depth[hit], atol=0, rtol=1e-5)
        assert torch.isinf(frags.depth.reshape(-1)[sure & (face < 0)]).all()
        checked += int(hit.sum())
    assert checked > 1000


def test_chunks_of_any_size_give_the_same_fragments():
    # Mutant: a chunk boundary that drops or repeats the faces at its edge, or keys that do not combine across
    # chunks (the last chunk's nearest instead of the overall nearest).
    generator = torch.Generator().manual_seed(3)
    vertices, faces = random_soup(generator, count=80)
    camera = random_camera(generator)
    whole = rasterize(vertices, faces, camera, 40, 40)
    chunked = rasterize(vertices, faces, camera, 40, 40, fragment_budget=37)
    assert torch.equal(whole.face, chunked.face)
    assert torch.equal(whole.bary, chunked.bary) and torch.equal(whole.depth, chunked.depth)


def test_a_pose_is_the_same_camera_as_its_camera():
    # Mutant: Pose.c2w transposed, or fovy read in radians.
    generator = torch.Generator().manual_seed(5)
    vertices, faces = random_soup(generator)
    camera = Camera(25.0, 40.0, 2.0, 50.0)
    pose = Pose.from_c2w(camera.c2w().tolist(), 50.0)
    assert torch.equal(rasterize(vertices, faces, camera, 24, 32).face, rasterize(vertices, faces, pose, 24, 32).face)


# ----------------------------------------------------------------------------------------------- texture lookup
def test_texture_lookup_is_bilinear_with_v_up_and_clamped_edges():
    # Mutants: v not flipped (row 0 at v = 0), align_corners=True (texel centres at i / (T - 1)), zero padding.
    size = 4
    texture = torch.arange(2 * size * size, dtype=torch.float32).view(2, size, size)

    def texel(row, col):
        return texture[:, row, col]

    uv = torch.tensor([[(1 + 0.5) / size, 1 - (2 + 0.5) / size],  # the centre of texel row 2, column 1
                       [(1 + 0.5 + 0.25) / size, 1 - (0 + 0.5) / size],  # a quarter of the way to column 2, row 0
                       [0.0, 1.0],  # the image's top-left corner: texel (0, 0) repeated
                       [1.0, 0.0]])  # bottom-right corner: texel (3, 3)
    samples = sample_texture(texture, uv)
    expected = torch.stack([texel(2, 1), 0.75 * texel(0, 1) + 0.25 * texel(0, 2), texel(0, 0), texel(3, 3)])
    torch.testing.assert_close(samples, expected, atol=1e-5, rtol=0)


def quad(x, y0, y1, z0, z1, u0, u1):
    """Return the vertices, faces and UVs of a quad in the plane x facing +x, painted in [u0, u1] x [0, 1]."""
    vertices = torch.tensor([[x, y0, z0], [x, y1, z0], [x, y1, z1], [x, y0, z1]])
    uv = torch.tensor([[u0, 0.0], [u1, 0.0], [u1, 1.0], [u0, 1.0]])
    return vertices, torch.tensor([[0, 1, 2], [0, 2, 3]]), uv


def test_gradients_reach_exactly_the_bilinear_footprint_of_visible_pixels():
    # Two quads seen from +x: the front one (left half of the texture) hides the back one (right half) entirely.
    # Mutants: sampling the texture for every face under a pixel rather than the nearest (the hidden half gets
    # gradients), nearest-texel sampling (a smaller footprint), UVs interpolated without the perspective
    # correction (a shifted footprint).
    v1, f1, uv1 = quad(0.3, -0.35, 0.25, -0.3, 0.3, 0.0, 0.5)
    v2, f2, uv2 = quad(-0.3, -0.1, 0.1, -0.1, 0.1, 0.5, 1.0)
    vertices, faces, uv = torch.cat([v1, v2]), torch.cat([f1, f2 + 4]), torch.cat([uv1, uv2])
    normals = torch.tensor([[1.0, 0.0, 0.0]]).expand(8, 3)
    camera = Camera(10.0, 15.0, 1.8, 45.0)  # slanted, so that the perspective correction matters
    height = width = 32
    size = 16
    view = ViewCache(vertices, faces, uv, normals)(camera, height, width)
    texture = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    image = render_view(view, texture, torch.zeros(3))
    weights = torch.rand(3, height, width, generator=torch.Generator().manual_seed(1)) + 0.5
    (image * weights).sum().backward()
    touched = texture.grad.abs().sum(0) > 0
    # The footprint from ray casting: every hit pixel's UV, its four bilinear texels with nonzero weight.
    face, bary, _, ambiguous = reference_raster(vertices, faces, camera, height, width)
    assert not bool(ambiguous.any())
    hit = face >= 0
    pixel_uv = (bary[hit, :, None] * uv.double()[faces[face[hit]]]).sum(1)
    x = pixel_uv[:, 0] * size - 0.5
    y = (1 - pixel_uv[:, 1]) * size - 0.5
    expected = torch.zeros(size, size, dtype=torch.bool)
    for col0, row0, fx, fy in zip(x.floor().long(), y.floor().long(), x - x.floor(), y - y.floor()):
        for dc, wx in ((0, 1 - fx), (1, fx)):
            for dr, wy in ((0, 1 - fy), (1, fy)):
                if wx * wy > 1e-9:
                    expected[int((row0 + dr).clamp(0, size - 1)), int((col0 + dc).clamp(0, size - 1))] = True
    assert torch.equal(touched, expected)
    # The hidden quad's texels get nothing (column size / 2 is shared: the front quad's lookups at u = 0.5 reach it).
    assert bool(touched[:, : size // 2].any()) and not bool(touched[:, size // 2 + 1:].any())


def test_lambertian_shading_and_two_sided_normals():
    # A quad facing +x, seen from the front and from behind. Mutants: ambient not mixed in (dark side black),
    # the normal not turned towards the camera (the back side lit as if facing away), light taken the wrong way.
    vertices, faces, uv = quad(0.0, -0.4, 0.4, -0.4, 0.4, 0.0, 1.0)
    normals = torch.tensor([[1.0, 0.0, 0.0]]).expand(4, 3)
    cache = ViewCache(vertices, faces, uv, normals)
    texture = torch.full((3, 4, 4), 0.8)
    for azimuth, towards in ((0.0, [1.0, 0.0, 0.0]), (180.0, [-1.0, 0.0, 0.0])):
        view = cache(Camera(0.0, azimuth, 2.0, 40.0), 16, 16)
        centre = (slice(None), 8, 8)
        lit = render_view(view, texture, torch.zeros(3), torch.tensor(towards), ambient=0.25)
        grazing = render_view(view, texture, torch.zeros(3), torch.tensor([0.0, 0.6, 0.8]), ambient=0.25)
        away = render_view(view, texture, torch.zeros(3), -torch.tensor(towards), ambient=0.25)
        torch.testing.assert_close(lit[centre], torch.full((3,), 0.8))
        torch.testing.assert_close(grazing[centre], torch.full((3,), 0.8 * 0.25))
        torch.testing.assert_close(away[centre], torch.full((3,), 0.8 * 0.25))
    half = cache(Camera(0.0, 0.0, 2.0, 40.0), 16, 16)
    oblique = render_view(half, texture, torch.zeros(3), torch.tensor([0.6, 0.8, 0.0]), ambient=0.25)
    torch.testing.assert_close(oblique[:, 8, 8], torch.full((3,), 0.8 * (0.25 + 0.75 * 0.6)))
    assert float(oblique[:, 0, 0].abs().sum()) == 0  # the corner pixel is background (the quad is smaller)


def test_views_are_cached_per_camera_and_size():
    # Mutants: a key without the size (a 16-pixel view served for 24 pixels), no eviction (memory grows forever).
    vertices, faces, uv = quad(0.0, -0.4, 0.4, -0.4, 0.4, 0.0, 1.0)
    cache = ViewCache(vertices, faces, uv, torch.tensor([[1.0, 0.0, 0.0]]).expand(4, 3), max_views=2)
    front, side = Camera(0.0, 0.0, 2.0, 40.0), Camera(0.0, 30.0, 2.0, 40.0)
    first = cache(front, 16, 16)
    assert cache(front, 16, 16) is first and cache.misses == 1
    assert cache(front, 24, 24).mask().shape == (24, 24) and cache.misses == 2
    cache(side, 16, 16)  # evicts (front, 16) - the least recently used
    assert cache(front, 24, 24) is not None and cache.misses == 3
    assert cache(front, 16, 16) is not first and cache.misses == 4
