"""Text-to-texture on a fixed mesh (Paint-it / TEXTure's task) in plain PyTorch: `--generator mesh --mesh PATH`.

theta is the texture of the user's mesh; each step renders it from random cameras (guidance/cameras.py) with
guidance/raster.py (visibility once per view, no gradient; the texture lookup differentiable) and the losses
distil the model's score into it, as for any generator (guidance/generators.py).

Loading (`load_mesh`): .obj, .glb / .gltf, .ply, .stl through trimesh, or the built-in `box` and `sphere`.
- Axes: the file's up and front axes become the world's +z (up) and +x (front, what azimuth 0 sees). Defaults
  per format: glTF is +y up with the front facing +z (the glTF spec; Blender's and most y-up OBJ exports agree),
  so .glb, .gltf and .obj default to up +y, front +z; .ply and .stl (z-up scans and CAD) to up +z, front -y
  (Blender's and CAD's front view looks along +y at the -y side). `up` / `front` override (+x, -x, +y, ... ).
- Units: the mesh is centred on its bounding box's centre and scaled so that its farthest vertex lies at
  MESH_RADIUS = 0.6 from the origin: inside the unit sphere that guidance/cameras.py keeps its cameras out of,
  and small enough that the middle camera (distance 1.75, fovy 55) sees all of it with a margin.
  The similarity is recorded (`TexturedMesh.world_from_user`), and exports are in the file's own coordinates.
- Several meshes in one file (a scene) are merged into one, with their scene transforms applied; their own
  UVs would overlap in one texture, so the merged mesh is unwrapped afresh.
- UVs: the file's when it has one mesh whose UVs all lie in [0, 1], else generated with xatlas (`uv="xatlas"`
  forces it) in a child process: xatlas can crash on some large meshes, and a crash must be a clear error,
  not the end of the run. Overlapping file UVs (mirrored halves) are kept: both halves get the same paint.
- Normals: area-weighted vertex normals with coincident vertices welded (smooth across UV seams); they only
  shade the lambertian training views; everything exported is albedo.
- `box` (half side 0.4) and `sphere` (radius 0.5) are the toy 3D world's cube and sphere (guidance/toy3d.py, on the
  3D branch): built in the world frame (z up, front +x), exported unrotated.

theta (`texture_param`): "network" (the default), texture = sigmoid(CNN(fixed noise)), Paint-it's deep-image-prior
lesson; or "direct", texture = sigmoid(logits). In the exact toy world (python -m benchmarks.mesh --compare: SDS on
a textured plane, 2 prompts x 3 seeds, 500 steps) the network ends nearer the prompt's template at every --lr tried
(0.03, 0.1, 0.3), and at the defaults at mean template MSE 0.0013 against 0.0019.

Rendering, per view: `shading` albedo, lambertian (albedo x (ambient + (1 - ambient) max(0, n . l)), ambient
uniform in AMBIENT_RANGE, the light near the camera's direction) or mixed (each view either, at random: Stable
Diffusion's default, so that shading is not painted into the texture); `background` a random solid colour
(Stable Diffusion) or black (the toy worlds, whose images have black backgrounds); `supersample` k: k x k rays per
pixel, box-filtered. The front view (`image`) is albedo on black.

Outputs of `MeshGenerator.save(dir, name)`: <name>.glb (unlit, two-sided, texture sampled linearly with
CLAMP_TO_EDGE, as the renders sample it) and <name>.obj + <name>.mtl, in the file's coordinates;
<name>/texture.png; <name>/turntable/: RGBA frames, transforms.json with the camera poses in the same coordinates
as the exported meshes (so the GLB rendered at those poses gives the frames back) and turntable.gif. A built-in
primitive's "file coordinates" are the world frame (z up): glTF viewers, which assume y up, show it on its back.
"""
from __future__ import annotations

import functools
import io
import json
import math
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from guidance.cameras import CameraRanges, turntable
from guidance.export import write_turntable
from guidance.common import UserError, atomic_write_bytes
from guidance.generators import DEFAULT_LR, Generator
from guidance.raster import ViewCache, render_view

FORMATS = (".obj", ".glb", ".gltf", ".ply", ".stl")
PRIMITIVES = ("box", "sphere")
AXES = ("+x", "-x", "+y", "-y", "+z", "-z")
DEFAULT_AXES = {".glb": ("+y", "+z"), ".gltf": ("+y", "+z"), ".obj": ("+y", "+z"), ".ply": ("+z", "-y"),
                ".stl": ("+z", "-y")}  # (up, front) per format: see the module docstring
MESH_RADIUS = 0.6
BOX_HALF_SIDE = 0.4  # the toy 3D world's cube and sphere
SPHERE_RADIUS = 0.5
MAX_FACES = 500_000
MAX_TEXTURE_SIZE = 4096
TEXTURE_PARAMS = ("network", "direct")
DEFAULT_TEXTURE_PARAM = "network"
DEFAULT_TEXTURE_SIZE = 512
SHADINGS = ("albedo", "lambertian", "mixed")
BACKGROUNDS = ("random", "black", "white")
UV_MODES = ("auto", "xatlas")
UV_PADDING = 2  # texels between xatlas charts: bilinear lookups near a chart's edge stay inside its own paint
TURNTABLE_FRAMES = 36
XATLAS_TIMEOUT = 900  # seconds
# Adam rates at --lr 0.1 (DEFAULT_LR), from SDS in the toy world (python -m benchmarks.mesh --compare): direct
# logits at 0.03 had not converged in 500 steps (template MSE 0.149), at 0.09 they had (0.0022); the network's
# weights at 1e-3 reach 0.0013 (3e-3: 0.0008; kept lower for SD's noisier scores).
LRS = {"direct": 0.1, "network": 1e-3}
# Lambertian training views: ambient share and the light's spread around the camera's direction.
AMBIENT_RANGE = (0.2, 0.5)
LIGHT_SPREAD = 0.5


# ----------------------------------------------------------------------------------------------- the mesh
@dataclass
class TexturedMesh:
    """A mesh in the world frame with per-vertex UVs and normals, and the similarity back to the file's frame."""

    vertices: torch.Tensor  # [V, 3] float32, world frame (z up, front +x, inside the unit sphere)
    faces: torch.Tensor  # [F, 3] int64
    uv: torch.Tensor  # [V, 2] float32, OBJ convention (v up)
    normals: torch.Tensor  # [V, 3] float32, world frame, unit
    user_vertices: np.ndarray  # [V, 3] float64, the file's own coordinates (what exports write)
    rotation: np.ndarray  # [3, 3] float64: world = scale * rotation @ (user - centre)
    scale: float
    centre: np.ndarray  # [3] float64
    source: str
    uv_source: str  # "file", "xatlas" or "built-in"

    @property
    def world_from_user(self) -> np.ndarray:
        """Return the float64 [4, 4] similarity taking the file's coordinates to the world frame."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.scale * self.rotation
        matrix[:3, 3] = -self.scale * self.rotation @ self.centre
        return matrix

    def user_pose(self, c2w: torch.Tensor) -> np.ndarray:
        """Return a world camera-to-world matrix as the same camera in the file's coordinates (rigid, float64)."""
        c2w = np.asarray(torch.as_tensor(c2w, dtype=torch.float64))
        pose = np.eye(4)
        pose[:3, :3] = self.rotation.T @ c2w[:3, :3]
        pose[:3, 3] = self.rotation.T @ c2w[:3, 3] / self.scale + self.centre
        return pose

    def user_normals(self) -> np.ndarray:
        """Return the [V, 3] float64 unit normals in the file's coordinates."""
        return self.normals.double().numpy() @ self.rotation


def axis_vector(axis: str, flag: str) -> np.ndarray:
    """Return the unit vector of an axis name such as '+y' or '-z' (UserError naming the flag otherwise)."""
    if axis not in AXES:
        raise UserError(f"--{flag} {axis!r}: use one of {', '.join(AXES)}")
    vector = np.zeros(3)
    vector["xyz".index(axis[1])] = 1.0 if axis[0] == "+" else -1.0
    return vector


def axes_rotation(up: str, front: str) -> np.ndarray:
    """Return the rotation taking the file's up axis to +z and its front axis to +x (the world frame)."""
    up_v, front_v = axis_vector(up, "mesh_up"), axis_vector(front, "mesh_front")
    if abs(float(up_v @ front_v)) > 0.5:
        raise UserError(f"--mesh_up {up} --mesh_front {front}: the front must be perpendicular to up; e.g. "
                        f"--mesh_up +y --mesh_front +z (glTF) or --mesh_up +z --mesh_front -y (z-up)")
    # Rows: the file's axes that become world x, y, z; world y = z x x keeps the rotation proper (det +1).
    return np.stack([front_v, np.cross(up_v, front_v), up_v])


def check_texture_size(texture_size: int) -> int:
    """Return texture_size after checking it is a power of two within [16, MAX_TEXTURE_SIZE]."""
    size = int(texture_size)
    if size != texture_size or size < 16 or size > MAX_TEXTURE_SIZE or size & (size - 1):
        raise UserError(f"--texture_size {texture_size}: must be a power of two from 16 to {MAX_TEXTURE_SIZE} "
                        f"(e.g. 512 or 1024)")
    return size


def load_mesh(source: str, up: str | None = None, front: str | None = None, uv: str = "auto",
              max_faces: int = MAX_FACES, texture_size: int = DEFAULT_TEXTURE_SIZE) -> TexturedMesh:
    """Return the TexturedMesh of a built-in primitive ('box', 'sphere') or a mesh file (see the module docstring),
    read once per process for the same file and options (a run checks its mesh before the model loads, then paints
    it: unwrapping a large mesh takes tens of seconds)."""
    path = Path(source)
    stamp = path.stat().st_mtime_ns if source not in PRIMITIVES and path.is_file() else None
    return _load_mesh_cached(source, stamp, up, front, uv, max_faces, texture_size)


@functools.lru_cache(maxsize=4)
def _load_mesh_cached(source: str, stamp, up, front, uv, max_faces, texture_size) -> TexturedMesh:
    return _load_mesh(source, up, front, uv, max_faces, texture_size)


def _load_mesh(source: str, up: str | None = None, front: str | None = None, uv: str = "auto",
               max_faces: int = MAX_FACES, texture_size: int = DEFAULT_TEXTURE_SIZE) -> TexturedMesh:
    """Return the TexturedMesh of a built-in primitive or a mesh file, read and checked (load_mesh caches it)."""
    if uv not in UV_MODES:
        raise UserError(f"--mesh_uv {uv!r}: use one of {', '.join(UV_MODES)}")
    texture_size = check_texture_size(texture_size)
    if source in PRIMITIVES:
        if up is not None or front is not None:
            raise UserError(f"--mesh_up / --mesh_front are for mesh files; the built-in {source} is already in the "
                            f"world frame (z up, front +x): drop them")
        return box_mesh() if source == "box" else sphere_mesh()
    path = Path(source)
    suffix = path.suffix.lower()
    if not path.exists():
        raise UserError(f"--mesh {source}: no such file; give a .obj, .glb, .gltf, .ply or .stl file, or "
                        f"{' / '.join(PRIMITIVES)}")
    if not path.is_file():
        raise UserError(f"--mesh {source}: is a folder, not a mesh file; give a .obj, .glb, .gltf, .ply or .stl file")
    if suffix not in FORMATS:
        raise UserError(f"--mesh {source}: unsupported format {suffix or '(no extension)'}; use one of "
                        f"{', '.join(FORMATS)} (convert it, e.g. with Blender or MeshLab)")
    default_up, default_front = DEFAULT_AXES[suffix]
    rotation = axes_rotation(up or default_up, front or default_front)
    vertices, faces, file_uv = _read_mesh_file(path)
    if len(faces) > max_faces:
        raise UserError(f"--mesh {source}: {len(faces):,} faces is more than --mesh_max_faces {max_faces:,}; "
                        f"decimate it (Blender: Decimate modifier, ratio {max_faces / len(faces):.2f}; MeshLab: "
                        f"Quadric Edge Collapse Decimation) or raise --mesh_max_faces")
    if not np.isfinite(vertices).all():
        raise UserError(f"--mesh {source}: some vertex coordinates are not finite (NaN or inf); repair the file")
    used = vertices[np.unique(faces)]
    centre = (used.min(0) + used.max(0)) / 2
    radius = float(np.linalg.norm(used - centre, axis=1).max())
    if not radius > 0:
        raise UserError(f"--mesh {source}: every vertex is at the same point; the mesh has no extent")
    uv_source = "file"
    if uv == "xatlas" or file_uv is None or not _uv_in_unit_square(file_uv):
        vertices, faces = _weld(vertices, faces)
        normals_user = _vertex_normals(vertices, faces)
        vmapping, faces, file_uv = _unwrap(vertices, faces, texture_size, source)
        vertices, normals_user = vertices[vmapping], normals_user[vmapping]
        uv_source = "xatlas"
    else:
        normals_user = _smooth_normals(vertices, faces)
    scale = MESH_RADIUS / radius
    world = scale * (vertices - centre) @ rotation.T
    return TexturedMesh(
        vertices=torch.from_numpy(world).float(), faces=torch.from_numpy(np.ascontiguousarray(faces)).long(),
        uv=torch.from_numpy(np.asarray(file_uv, dtype=np.float32)),
        normals=torch.from_numpy(normals_user @ rotation.T).float(), user_vertices=vertices,
        rotation=rotation, scale=scale, centre=centre, source=str(source), uv_source=uv_source)


def _read_mesh_file(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Return (float64 vertices, int64 faces, float64 per-vertex UVs or None) of the one mesh a file holds, or of
    its meshes merged (scene transforms applied; UVs then None)."""
    import trimesh

    try:
        loaded = trimesh.load(str(path), process=False)
    except Exception as error:  # trimesh raises anything from ValueError to KeyError on a broken file
        raise UserError(f"--mesh {path}: could not read it as {path.suffix} ({type(error).__name__}: {error}); "
                        f"check the file, or re-export it as .glb or .obj") from None
    parts = loaded.dump() if isinstance(loaded, trimesh.Scene) else [loaded]
    meshes = [m for m in parts if isinstance(m, trimesh.Trimesh) and len(m.faces)]
    if not meshes:
        points = sum(len(m.vertices) for m in parts if isinstance(m, (trimesh.PointCloud, trimesh.Trimesh)))
        if any(isinstance(m, trimesh.PointCloud) for m in parts) or points:
            raise UserError(f"--mesh {path}: a point cloud ({points:,} points, no faces); texture painting needs a "
                            f"surface: reconstruct one first (e.g. MeshLab or Open3D's Poisson reconstruction)")
        raise UserError(f"--mesh {path}: the file has no faces; give a triangle mesh")
    if len(meshes) == 1:
        mesh = meshes[0]
        uv = getattr(mesh.visual, "uv", None)
        uv = None if uv is None or len(uv) != len(mesh.vertices) else np.asarray(uv, dtype=np.float64)
        return np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64), uv
    vertices, faces, offset = [], [], 0
    for mesh in meshes:
        vertices.append(np.asarray(mesh.vertices, dtype=np.float64))
        faces.append(np.asarray(mesh.faces, dtype=np.int64) + offset)
        offset += len(mesh.vertices)
    return np.concatenate(vertices), np.concatenate(faces), None


def _uv_in_unit_square(uv: np.ndarray) -> bool:
    """Return whether every UV is finite and inside [0, 1] (a hair of slack): one texture, no tiling."""
    return bool(np.isfinite(uv).all() and uv.min() >= -1e-4 and uv.max() <= 1 + 1e-4)


def _weld(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (unique vertices, faces re-indexed) with exactly coincident vertices merged (STL is a triangle soup)."""
    unique, inverse = np.unique(vertices, axis=0, return_inverse=True)
    return unique, inverse.reshape(-1)[faces]


def _vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Return float64 [V, 3] unit vertex normals: the area-weighted sum of the faces' normals around each vertex."""
    tri = vertices[faces]
    face_normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = twice the area
    normals = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(normals, faces[:, k], face_normals)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return np.where(length > 0, normals / np.where(length > 0, length, 1), np.array([0.0, 0.0, 1.0]))


def _smooth_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Return vertex normals with coincident vertices welded first, so that UV seams do not crease the shading."""
    unique, inverse = np.unique(vertices, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    return _vertex_normals(unique, inverse[faces])[inverse]


_XATLAS_CHILD = """
import io, sys, numpy as np, xatlas
data = np.load(io.BytesIO(sys.stdin.buffer.read()))
atlas = xatlas.Atlas()
atlas.add_mesh(data["vertices"], data["faces"])
pack = xatlas.PackOptions()
pack.padding = int(data["padding"])
pack.resolution = int(data["resolution"])
pack.bilinear = True
atlas.generate(pack_options=pack)
vmapping, faces, uv = atlas[0]
out = io.BytesIO()
np.savez(out, vmapping=vmapping, faces=faces, uv=uv)
sys.stdout.buffer.write(out.getvalue())
"""


def _unwrap(vertices: np.ndarray, faces: np.ndarray, texture_size: int, source: str):
    """Return xatlas's (vmapping [V'], faces [F, 3] into the new vertices, uv [V', 2]) of a mesh, computed in a child
    process so that a crash inside xatlas becomes a UserError."""
    payload = io.BytesIO()
    np.savez(payload, vertices=vertices.astype(np.float32), faces=faces.astype(np.uint32),
             padding=UV_PADDING, resolution=texture_size)
    try:
        result = subprocess.run([sys.executable, "-c", _XATLAS_CHILD], input=payload.getvalue(), capture_output=True,
                                timeout=XATLAS_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise UserError(f"--mesh {source}: xatlas did not unwrap its {len(faces):,} faces in {XATLAS_TIMEOUT} s; "
                        f"give the mesh UVs (e.g. Blender's Smart UV Project) or decimate it") from None
    if result.returncode != 0:
        how = f"crashed (signal {-result.returncode})" if result.returncode < 0 else "failed"
        detail = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise UserError(f"--mesh {source}: xatlas {how} unwrapping its {len(faces):,} faces {detail[0]}; give the "
                        f"mesh UVs inside [0, 1] (e.g. Blender's Smart UV Project) or decimate it")
    data = np.load(io.BytesIO(result.stdout))
    return data["vmapping"].astype(np.int64), data["faces"].astype(np.int64), data["uv"].astype(np.float64)


# ----------------------------------------------------------------------------------------------- primitives
# The box's six faces, each a cell of a 3 x 2 UV grid: (name, outward normal, the face's up as seen from outside).
BOX_FACES = (("+x", (1, 0, 0), (0, 0, 1)), ("+y", (0, 1, 0), (0, 0, 1)), ("-x", (-1, 0, 0), (0, 0, 1)),
             ("-y", (0, -1, 0), (0, 0, 1)), ("+z", (0, 0, 1), (-1, 0, 0)), ("-z", (0, 0, -1), (1, 0, 0)))
BOX_CELL_MARGIN = 1 / 32  # of a cell's side: bilinear lookups at a face's edge stay inside its own cell


def box_cell(name: str) -> tuple[float, float, float, float]:
    """Return the UV rectangle (u0, v0, u1, v1) that the box's face `name` ('+x', ..., '-z') is painted in."""
    k = [face[0] for face in BOX_FACES].index(name)
    col, row = k % 3, k // 3
    u0, v1 = col / 3, 1 - row / 2  # row 0 is the texture image's top half
    return (u0 + BOX_CELL_MARGIN / 3, v1 - 0.5 + BOX_CELL_MARGIN / 2, u0 + 1 / 3 - BOX_CELL_MARGIN / 3,
            v1 - BOX_CELL_MARGIN / 2)


def box_mesh(half: float = BOX_HALF_SIDE) -> TexturedMesh:
    """Return the cube [-half, half]^3: 4 vertices per face (flat normals), one UV cell per face, each face's texture
    upright as seen from outside (the front, +x, is what azimuth 0 sees)."""
    vertices, uv, normals, faces = [], [], [], []
    for name, normal, up in BOX_FACES:
        n, w = np.array(normal, float), np.array(up, float)
        right = np.cross(-n, w)  # a viewer outside looking along -n with w up has `right` on the right
        u0, v0, u1, v1 = box_cell(name)
        base = len(vertices)
        for su, sv in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
            vertices.append(half * (n + su * right + sv * w))
            uv.append((u0 + (su + 1) / 2 * (u1 - u0), v0 + (sv + 1) / 2 * (v1 - v0)))
            normals.append(n)
        faces += [(base, base + 1, base + 2), (base, base + 2, base + 3)]
    return _primitive(np.array(vertices), np.array(faces), np.array(uv), np.array(normals), "box")


def sphere_mesh(radius: float = SPHERE_RADIUS, segments: int = 64, rings: int = 32) -> TexturedMesh:
    """Return a UV sphere: u = azimuth / 360 + 0.5 (the front, +x, at u = 0.5; the seam at the back), v = latitude."""
    azimuth = np.linspace(-math.pi, math.pi, segments + 1)  # the seam column is duplicated: u 0 and u 1
    polar = np.linspace(0, math.pi, rings + 1)  # from the north pole
    az, po = np.meshgrid(azimuth, polar, indexing="xy")  # [rings + 1, segments + 1]
    az[[0, -1], :-1] += math.pi / segments  # a pole vertex per segment, at its middle u
    normals = np.stack([np.sin(po) * np.cos(az), np.sin(po) * np.sin(az), np.cos(po)], -1).reshape(-1, 3)
    uv = np.stack([(az / (2 * math.pi) + 0.5), 1 - po / math.pi], -1).reshape(-1, 2)
    faces = []
    for r in range(rings):
        for s in range(segments):
            a, b = r * (segments + 1) + s, r * (segments + 1) + s + 1  # (a, b) this row, (c, d) the next
            c, d = a + segments + 1, b + segments + 1
            if r < rings - 1:  # at the poles one of the two triangles has collapsed
                faces.append((a, c, d))
            if r > 0:
                faces.append((a, d, b))
    faces = np.array(faces)
    used, faces = np.unique(faces, return_inverse=True)  # the poles' last column is never used
    faces = faces.reshape(-1, 3)
    return _primitive(radius * normals[used], faces, uv[used], normals[used], "sphere")


def _primitive(vertices, faces, uv, normals, name) -> TexturedMesh:
    """Return a built-in mesh: world frame = its own frame (the identity similarity)."""
    return TexturedMesh(torch.from_numpy(vertices).float(), torch.from_numpy(faces).long(),
                        torch.from_numpy(uv).float(), torch.from_numpy(normals).float(), vertices.astype(np.float64),
                        np.eye(3), 1.0, np.zeros(3), name, "built-in")


# ----------------------------------------------------------------------------------------------- theta
class DirectTexture(nn.Module):
    """texture = sigmoid(logits), logits a [3, T, T] parameter starting at grey plus a little noise."""

    def __init__(self, size: int, generator: torch.Generator):
        super().__init__()
        self.logits = nn.Parameter(0.1 * torch.randn(3, size, size, generator=generator))

    def forward(self) -> torch.Tensor:
        """Return the [3, T, T] texture in [0, 1]."""
        return torch.sigmoid(self.logits)


class TextureNetwork(nn.Module):
    """texture = sigmoid(net(z)): a convolutional decoder from fixed noise z (Paint-it's deep-image-prior lesson).

    z is [1, 64, 16, 16]; each level doubles the resolution (bilinear) then applies a 3x3 conv and LeakyReLU,
    up to T x T; channels shrink as the resolution grows (min(64, max(8, 4096 / resolution))), so a level costs
    about the same at every resolution; a 1x1 conv gives the logits. The network's spectral bias paints smooth
    colour first and detail later, which averages SDS's per-step noise over texels instead of copying it.
    """

    START = 16

    def __init__(self, size: int, generator: torch.Generator):
        super().__init__()
        channels = lambda res: min(64, max(8, 4096 // res))  # noqa: E731
        self.register_buffer("noise", torch.randn(1, channels(self.START), self.START, self.START,
                                                  generator=generator))
        layers, res = [], self.START
        while res < size:
            res *= 2
            layers.append(nn.Conv2d(channels(res // 2), channels(res), 3, padding=1))
        self.levels = nn.ModuleList(layers)
        self.head = nn.Conv2d(channels(res), 3, 1)
        for conv in (*self.levels, self.head):
            nn.init.kaiming_uniform_(conv.weight, a=0.2, generator=generator)
            nn.init.zeros_(conv.bias)
        with torch.no_grad():
            self.head.weight.mul_(0.1)  # start near grey, as the direct texture does

    def forward(self) -> torch.Tensor:
        """Return the [3, T, T] texture in [0, 1]."""
        x = self.noise
        for conv in self.levels:
            x = F.leaky_relu(conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)), 0.2)
        return torch.sigmoid(self.head(x))[0]


def build_texture(texture_param: str, size: int, generator: torch.Generator) -> nn.Module:
    """Return the texture parameterisation `texture_param` ('network' or 'direct') at size x size."""
    if texture_param not in TEXTURE_PARAMS:
        raise UserError(f"--texture_param {texture_param!r}: use one of {', '.join(TEXTURE_PARAMS)}")
    return (TextureNetwork if texture_param == "network" else DirectTexture)(check_texture_size(size), generator)


# ----------------------------------------------------------------------------------------------- the generator
def model_defaults(model) -> dict:
    """Return the shading and background a model's world expects: the toy worlds' (albedo on black: their images
    have black backgrounds, and the 3D world's light is baked into its objects, `model.nerf_defaults`), else
    Stable Diffusion's (random lambertian / albedo views on a random solid colour, DreamFusion's augmentations)."""
    from guidance.models import world

    defaults = getattr(model, "nerf_defaults", None)
    if isinstance(defaults, dict):
        return {"shading": defaults.get("shading", "albedo"), "background": defaults.get("background", "black")}
    if world(getattr(model, "model_name", "")) is not None:
        return {"shading": "albedo", "background": "black"}
    return {"shading": "mixed", "background": "random"}


class MeshGenerator(Generator):
    """theta = the texture of a fixed mesh, rendered from the cameras the loop draws each step."""

    name = "mesh"
    needs_cameras = True

    def __init__(self, model, batch: int = 1, mesh: str | TexturedMesh = "box", render_size: int | None = None,
                 texture_size: int = DEFAULT_TEXTURE_SIZE, texture_param: str = DEFAULT_TEXTURE_PARAM,
                 generator: torch.Generator | None = None, up: str | None = None, front: str | None = None,
                 uv: str = "auto", max_faces: int = MAX_FACES, shading: str | None = None,
                 background: str | None = None, supersample: int = 1, turntable_frames: int = TURNTABLE_FRAMES,
                 eval_camera=None, max_cached_views: int = 16):
        if int(batch) != 1:
            raise UserError(f"--batch {batch}: the mesh generator paints one texture; use --batch 1 (more views "
                            f"per step: --views_per_step)")
        defaults = model_defaults(model)
        self.shading = shading or defaults["shading"]
        self.background = background or defaults["background"]
        if int(supersample) < 1 or int(supersample) > 4:
            raise UserError(f"--mesh_supersample {supersample}: use 1 (none) to 4 rays per pixel side")
        self.supersample = int(supersample)
        if self.shading not in SHADINGS:
            raise UserError(f"--mesh_shading {shading!r}: use one of {', '.join(SHADINGS)}")
        if self.background not in BACKGROUNDS:
            raise UserError(f"--mesh_background {background!r}: use one of {', '.join(BACKGROUNDS)}")
        if int(turntable_frames) < 1:
            raise UserError(f"--turntable_frames {turntable_frames} must be at least 1")
        texture_size = check_texture_size(texture_size)
        if texture_param not in TEXTURE_PARAMS:
            raise UserError(f"--texture_param {texture_param!r}: use one of {', '.join(TEXTURE_PARAMS)}")
        rng = generator if generator is not None else torch.Generator().manual_seed(0)
        super().__init__(model, 1, render_size, False, rng)
        self.mesh = mesh if isinstance(mesh, TexturedMesh) else load_mesh(mesh, up, front, uv, max_faces, texture_size)
        self.texture_size, self.texture_param = texture_size, texture_param
        self.texture = build_texture(texture_param, texture_size, rng).to(self.device)
        self.groups = [{"name": "texture", "params": list(self.texture.parameters()), "lr": LRS[texture_param]}]
        self.views = ViewCache(self.mesh.vertices.to(self.device), self.mesh.faces.to(self.device),
                               self.mesh.uv.to(self.device), self.mesh.normals.to(self.device), max_cached_views)
        self.turntable_frames = int(turntable_frames)
        self.eval_camera = eval_camera or CameraRanges().middle()

    def final_view(self) -> list:
        """Return [the evaluation camera]: the run's final latents (latents.pt) are the front view's."""
        return [self.eval_camera]

    # ------------------------------------------------------------------------------------------- rendering
    def texture_image(self) -> torch.Tensor:
        """Return the [3, T, T] texture in [0, 1] (differentiable in theta)."""
        return self.texture()

    def render(self, cameras=None, texture: torch.Tensor | None = None, shading: str | None = None,
               background: str | None = None) -> torch.Tensor:
        """Return [B, 3, S, S] renders in [0, 1] of the cameras (default: the evaluation camera) at render_size."""
        cameras = [self.eval_camera] if cameras is None else list(cameras)
        texture = self.texture_image() if texture is None else texture
        shading, background = shading or self.shading, background or self.background
        size = self.render_size * self.supersample
        images = []
        for camera in cameras:
            view = self.views(camera, size, size)
            light, ambient = self._light(camera, shading)
            images.append(render_view(view, texture, self._background(background), light, ambient))
        images = torch.stack(images)
        # Supersampled: each pixel the box-filtered mean of its supersample^2 rays (soft, antialiased edges).
        return F.avg_pool2d(images, self.supersample) if self.supersample > 1 else images

    def _light(self, camera, shading: str):
        """Return (unit light direction or None, ambient) for one view: lambertian views light from near the camera."""
        if shading == "albedo" or (shading == "mixed" and float(torch.rand(1, generator=self.rng)) < 0.5):
            return None, 1.0
        towards_camera = camera.c2w()[:3, 3].float()
        towards_camera = towards_camera / towards_camera.norm()
        light = towards_camera + LIGHT_SPREAD * torch.randn(3, generator=self.rng)
        ambient = AMBIENT_RANGE[0] + (AMBIENT_RANGE[1] - AMBIENT_RANGE[0]) * float(torch.rand(1, generator=self.rng))
        return (light / light.norm()).to(self.device), ambient

    def _background(self, background: str) -> torch.Tensor:
        if background == "random":
            return torch.rand(3, generator=self.rng).to(self.device)
        return torch.full((3,), 0.0 if background == "black" else 1.0, device=self.device)

    def latents(self, model, cameras=None) -> torch.Tensor:
        """Return the [len(cameras), C, h, w] latents of the cameras' renders, differentiable in theta."""
        return model.encode_imgs(self._to_output_size(self.render(cameras)), requires_grad=True)

    def regularization(self) -> torch.Tensor:
        """Return 0: the texture has no regulariser."""
        return torch.zeros((), device=self.device)

    @torch.no_grad()
    def image(self, model) -> torch.Tensor:
        """Return the [1, 3, H, W] front view (the evaluation camera, azimuth 0): albedo on black."""
        return self._to_output_size(self.render([self.eval_camera], shading="albedo", background="black")).clamp(0, 1)

    @torch.no_grad()
    def render_rgba(self, camera, size: int | None = None, texture: torch.Tensor | None = None) -> torch.Tensor:
        """Return the [4, H, W] albedo render of a camera with alpha = coverage (1 on the mesh, 0 off it); the view
        is not cached (a turntable's cameras are seen once)."""
        size = size or self.render_size
        view = self.views.rasterize(camera, size, size)
        texture = self.texture_image() if texture is None else texture
        rgb = render_view(view, texture, torch.zeros(3, device=self.device))
        return torch.cat([rgb, view.mask()[None].to(rgb)])

    def fit(self, target_imgs: torch.Tensor, cameras=None, steps: int = 300, lr: float = DEFAULT_LR) -> float:
        """Return the final MSE after fitting the texture to [B, 3, S, S] albedo renders of the cameras on black."""
        cameras = [self.eval_camera] if cameras is None else list(cameras)
        target = target_imgs.to(self.device, torch.float32)
        optimizer = torch.optim.Adam(self.param_groups(lr))
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            F.mse_loss(self.render(cameras, shading="albedo", background="black"), target).backward()
            optimizer.step()
        with torch.no_grad():
            return float(F.mse_loss(self.render(cameras, shading="albedo", background="black"), target))

    # ------------------------------------------------------------------------------------------- state
    def checkpoint(self) -> dict:
        """Return what restore() needs to continue: the texture's parameters, its settings and the random state."""
        return {"generator": self.name, "mesh": self.mesh.source, "faces": int(self.mesh.faces.shape[0]),
                "texture_size": self.texture_size, "texture_param": self.texture_param,
                "texture": {k: v.detach().cpu().clone() for k, v in self.texture.state_dict().items()},
                "rng": self.rng.get_state()}

    def restore(self, checkpoint: dict) -> None:
        """Set theta and the random state from a checkpoint() of a generator with the same mesh and texture."""
        mine = (self.name, self.mesh.source, int(self.mesh.faces.shape[0]), self.texture_size, self.texture_param)
        theirs = tuple(checkpoint.get(k) for k in ("generator", "mesh", "faces", "texture_size", "texture_param"))
        if mine != theirs:
            raise UserError(f"the checkpoint is of (generator, mesh, faces, texture size, parameterisation) {theirs}, "
                            f"this run is {mine}: resume with the same --mesh, --texture_size and --texture_param")
        self.texture.load_state_dict({k: v.to(self.device) for k, v in checkpoint["texture"].items()})
        self.rng.set_state(checkpoint["rng"])

    # ------------------------------------------------------------------------------------------- outputs
    @torch.no_grad()
    def save(self, save_dir, name: str) -> list[Path]:
        """Write <name>.glb, <name>.obj + .mtl, <name>/texture.png and <name>/turntable/ (frames, transforms.json,
        turntable.gif) under save_dir, each atomically; return their paths."""
        save_dir = Path(save_dir)
        folder = save_dir / name
        pixels = (self.texture_image().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        png = _png_bytes(Image.fromarray(pixels, "RGB"))
        paths = [folder / "texture.png", save_dir / f"{name}.glb", save_dir / f"{name}.obj", save_dir / f"{name}.mtl"]
        atomic_write_bytes(paths[0], png)
        atomic_write_bytes(paths[1], glb_bytes(self.mesh, png))
        obj, mtl = obj_mtl_text(self.mesh, f"{name}.mtl", f"{name}/texture.png")
        atomic_write_bytes(paths[2], obj.encode())
        atomic_write_bytes(paths[3], mtl.encode())
        # The frames show the texture exactly as saved (8 bits), so the exported files reproduce them.
        saved = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255).to(self.device)
        paths += self.write_turntable(folder / "turntable", saved)
        return paths

    def write_turntable(self, folder: Path, texture: torch.Tensor | None = None) -> list[Path]:
        """Write RGBA frames and transforms.json (poses in the exported meshes' coordinates) of the turntable cameras
        (guidance/cameras.py's) into folder, and turntable.gif beside it (where the NeRF writes its); return the paths."""
        size = max(self.render_size, 128)  # a rasteriser's frame costs little: show the texture at a useful size
        coordinates = {"coordinates": "the exported mesh's own (as in the input file); elevation and azimuth are in "
                                      "the world frame: z up, azimuth 0 looks at the front",
                       "world_from_mesh": self.mesh.world_from_user.tolist()}
        return write_turntable(lambda camera: self.render_rgba(camera, size, texture), turntable(self.turntable_frames),
                               folder, folder.parent / "turntable.gif", pose=self.mesh.user_pose, extra=coordinates)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------- file writers
def obj_mtl_text(mesh: TexturedMesh, mtl_name: str, texture_path: str) -> tuple[str, str]:
    """Return (OBJ text, MTL text) of the mesh in the file's coordinates, its texture at texture_path (relative)."""
    lines = ["# guidance/mesh.py: textured mesh, in the input file's coordinates", f"mtllib {mtl_name}",
             "o mesh"]
    lines += [f"v {x!r} {y!r} {z!r}" for x, y, z in mesh.user_vertices.tolist()]
    lines += [f"vt {u:.9g} {v:.9g}" for u, v in mesh.uv.double().tolist()]
    lines += [f"vn {x:.9g} {y:.9g} {z:.9g}" for x, y, z in mesh.user_normals().tolist()]
    lines.append("usemtl texture")
    lines += [f"f {a}/{a}/{a} {b}/{b}/{b} {c}/{c}/{c}" for a, b, c in (mesh.faces + 1).tolist()]
    mtl = ["# guidance/mesh.py", "newmtl texture", "Ka 1 1 1", "Kd 1 1 1", "Ks 0 0 0", "d 1", "illum 1",
           f"map_Kd {texture_path}"]
    return "\n".join(lines) + "\n", "\n".join(mtl) + "\n"


def glb_bytes(mesh: TexturedMesh, png: bytes) -> bytes:
    """Return a binary glTF 2.0 of the mesh in the file's coordinates with the PNG as an unlit, two-sided texture."""
    positions = mesh.user_vertices.astype(np.float32)
    normals = mesh.user_normals().astype(np.float32)
    texcoords = mesh.uv.numpy().astype(np.float32).copy()
    texcoords[:, 1] = 1 - texcoords[:, 1]  # glTF's v runs down the image
    indices = mesh.faces.numpy().astype(np.uint32).reshape(-1)
    blobs = [positions.tobytes(), normals.tobytes(), texcoords.tobytes(), indices.tobytes(), png]
    views, binary = [], b""
    for k, blob in enumerate(blobs):
        views.append({"buffer": 0, "byteOffset": len(binary), "byteLength": len(blob)})
        if k < 3:
            views[-1]["target"] = 34962  # ARRAY_BUFFER
        elif k == 3:
            views[-1]["target"] = 34963  # ELEMENT_ARRAY_BUFFER
        binary += blob + b"\0" * (-len(blob) % 4)
    count = len(positions)
    gltf = {
        "asset": {"version": "2.0", "generator": "guidance/mesh.py"},
        "extensionsUsed": ["KHR_materials_unlit"],
        "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0, "name": "mesh"}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0, "NORMAL": 1, "TEXCOORD_0": 2}, "indices": 3,
                                    "material": 0}]}],
        "materials": [{"name": "texture", "doubleSided": True, "extensions": {"KHR_materials_unlit": {}},
                       "pbrMetallicRoughness": {"baseColorTexture": {"index": 0}, "metallicFactor": 0.0,
                                                "roughnessFactor": 1.0}}],
        "textures": [{"source": 0, "sampler": 0}],
        "samplers": [{"magFilter": 9729, "minFilter": 9729, "wrapS": 33071, "wrapT": 33071}],  # LINEAR, CLAMP
        "images": [{"bufferView": 4, "mimeType": "image/png"}],
        "accessors": [
            {"bufferView": 0, "componentType": 5126, "count": count, "type": "VEC3",
             "min": positions.min(0).tolist(), "max": positions.max(0).tolist()},
            {"bufferView": 1, "componentType": 5126, "count": count, "type": "VEC3"},
            {"bufferView": 2, "componentType": 5126, "count": count, "type": "VEC2"},
            {"bufferView": 3, "componentType": 5125, "count": len(indices), "type": "SCALAR"},
        ],
        "bufferViews": views, "buffers": [{"byteLength": len(binary)}],
    }
    text = json.dumps(gltf, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)
    total = 12 + 8 + len(text) + 8 + len(binary)
    return (struct.pack("<4sII", b"glTF", 2, total) + struct.pack("<I4s", len(text), b"JSON") + text
            + struct.pack("<I4s", len(binary), b"BIN\0") + binary)
