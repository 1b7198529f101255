"""What a 3D generator leaves behind, for any renderer: a turntable (RGBA frames, transforms.json, GIF) and a mesh.

write_turntable(render_rgba, cameras, folder, gif_path) renders each camera (render_rgba(camera) -> [4, H, W] in
[0, 1], RGB premultiplied, i.e. over black, and alpha) and writes folder/frame_NNN.png (straight-alpha RGBA, what
PNG means), folder/transforms.json (instant-ngp / nerfstudio: guidance.cameras.transforms_json, file paths
relative to the json) and gif_path (the frames over a solid background). The NeRF (guidance/nerf.py) and the
mesh generator share it.

export_mesh(density, colour, stem) samples a density function on a grid over [-1, 1]^3 (zero outside the unit
sphere, where renderers never look), extracts the isosurface by marching cubes (PyMCubes) and writes stem.glb and
stem.obj (trimesh) with vertex colours, in the world frame of guidance/cameras.py (z up; glTF viewers assume y up
and show the object lying on its back). The threshold 'auto' is threestudio's: the mean of the grid's densities
above 1e-5. A field with no surface at the threshold raises UserError naming its largest density: never an empty
file; so does a field with non-finite densities. Every file is written atomically.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from guidance.cameras import Camera, transforms_json
from guidance.common import UserError, atomic_write_bytes, save_image_atomic, save_json_atomic

GIF_SECONDS_PER_FRAME = 0.08
AUTO_THRESHOLD_FLOOR = 1e-5  # threestudio's: densities at or below it are empty space, not part of the mean


def straight_alpha(rgba: torch.Tensor) -> np.ndarray:
    """Return an [H, W, 4] uint8 straight-alpha array from [4, H, W] premultiplied RGBA in [0, 1]."""
    rgba = rgba.detach().float().cpu().clamp(0, 1)
    alpha = rgba[3:]
    rgb = torch.where(alpha > 1e-4, rgba[:3] / alpha.clamp(min=1e-4), torch.zeros_like(rgba[:3])).clamp(0, 1)
    return (torch.cat([rgb, alpha]).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def write_turntable(render_rgba: Callable[[Camera], torch.Tensor], cameras: list[Camera], folder, gif_path,
                    gif_background=(0.0, 0.0, 0.0), seconds_per_frame: float = GIF_SECONDS_PER_FRAME,
                    pose: Callable[[torch.Tensor], torch.Tensor] | None = None, extra: dict | None = None) -> list[Path]:
    """Return the paths written: folder/frame_NNN.png per camera, folder/transforms.json, gif_path.

    pose, if given, maps each camera's world camera-to-world matrix to the one transforms.json records (a mesh's
    own coordinates); extra adds keys to transforms.json."""
    folder, gif_path = Path(folder), Path(gif_path)
    if not cameras:
        raise ValueError("write_turntable needs at least one camera")
    paths, names, gif_frames = [], [], []
    background = torch.tensor(gif_background, dtype=torch.float32).view(3, 1, 1)
    size = None
    for k, camera in enumerate(cameras):
        rgba = render_rgba(camera).detach().float().cpu()
        if rgba.dim() != 3 or rgba.shape[0] != 4:
            raise ValueError(f"render_rgba returned shape {tuple(rgba.shape)}; it must return [4, H, W]")
        if size is not None and rgba.shape[1:] != size:
            raise ValueError(f"frame {k} is {tuple(rgba.shape[1:])}, frame 0 {tuple(size)}: render every frame alike")
        size = rgba.shape[1:]
        name = f"frame_{k:03d}.png"
        save_image_atomic(Image.fromarray(straight_alpha(rgba), "RGBA"), folder / name)
        paths.append(folder / name)
        names.append(name)
        over = (rgba[:3] + (1 - rgba[3:]) * background).clamp(0, 1)
        gif_frames.append(Image.fromarray((over.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)))
    height, width = size
    data = transforms_json(cameras, width, height, names)
    if pose is not None:
        for frame, camera in zip(data["frames"], cameras):
            frame["transform_matrix"] = pose(camera.c2w()).tolist()
    save_json_atomic({**data, **(extra or {})}, folder / "transforms.json")
    paths.append(folder / "transforms.json")
    buffer = io.BytesIO()
    gif_frames[0].save(buffer, format="GIF", save_all=True, append_images=gif_frames[1:],
                       duration=int(seconds_per_frame * 1000), loop=0)
    atomic_write_bytes(gif_path, buffer.getvalue())
    return paths + [gif_path]


@torch.no_grad()
def density_grid(density: Callable[[torch.Tensor], torch.Tensor], resolution: int, device=None,
                 chunk: int = 262144) -> torch.Tensor:
    """Return the [N, N, N] float32 densities at grid points x_i = -1 + 2 i / (N - 1) (index order x, y, z),
    zero outside the unit sphere."""
    axis = torch.linspace(-1, 1, int(resolution))
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    inside = points.norm(dim=-1) <= 1.0
    values = torch.zeros(points.shape[0])
    chosen = points[inside]
    values[inside] = torch.cat([density(c.to(device)).float().cpu() for c in chosen.split(chunk)])
    return values.view(resolution, resolution, resolution)


def auto_threshold(grid: torch.Tensor) -> float:
    """Return threestudio's automatic isosurface threshold: the mean of the densities above 1e-5."""
    occupied = grid[grid > AUTO_THRESHOLD_FLOOR]
    if occupied.numel() == 0:
        raise UserError(f"the field is empty: no density above {AUTO_THRESHOLD_FLOOR:g} anywhere in the unit sphere "
                        f"(the optimisation diverged or removed the object); no mesh written")
    return float(occupied.mean())


def extract_mesh(density: Callable[[torch.Tensor], torch.Tensor], resolution: int = 128, threshold="auto",
                 device=None) -> tuple[np.ndarray, np.ndarray, float]:
    """Return (vertices [V, 3] in world units, faces [F, 3] with outward normals, the threshold used)."""
    import mcubes

    grid = density_grid(density, resolution, device)
    bad = int((~torch.isfinite(grid)).sum())
    if bad:
        raise UserError(f"the field has {bad} non-finite densities (the optimisation diverged): no mesh written; "
                        f"resume from an earlier checkpoint (nerf.pt)")
    level = auto_threshold(grid) if threshold == "auto" else float(threshold)
    peak = float(grid.max())
    if not peak > level:
        raise UserError(f"the field has no surface at density {level:.4g} (its largest density is {peak:.4g}): no mesh "
                        f"written; lower --mesh_threshold below {peak:.4g} or use 'auto'")
    vertices, faces = mcubes.marching_cubes(grid.numpy().astype(np.float64), level)
    if len(faces) == 0:
        raise UserError(f"marching cubes found no triangle at density {level:.4g}: no mesh written")
    vertices = vertices * (2.0 / (resolution - 1)) - 1.0
    faces = faces.astype(np.int64)
    # Densities rise inwards; flip the winding if marching cubes oriented the surface the other way.
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    if np.einsum("ij,ij->i", a, np.cross(b, c)).sum() < 0:
        faces = faces[:, ::-1].copy()
    return vertices.astype(np.float32), faces, level


def export_mesh(density: Callable[[torch.Tensor], torch.Tensor], colour: Callable[[torch.Tensor], torch.Tensor],
                stem, resolution: int = 128, threshold="auto", device=None) -> list[Path]:
    """Return [stem.glb, stem.obj] after writing density's isosurface with vertex colours colour(points) in [0, 1]."""
    import trimesh

    vertices, faces, _ = extract_mesh(density, resolution, threshold, device)
    rgb = colour(torch.from_numpy(vertices)).float().clamp(0, 1).cpu().numpy()
    rgba = np.concatenate([(rgb * 255).round(), np.full((len(rgb), 1), 255.0)], 1).astype(np.uint8)
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, vertex_colors=rgba, process=False)
    stem = Path(stem)
    paths = []
    for suffix in ("glb", "obj"):
        path = stem.with_name(f"{stem.name}.{suffix}")
        data = mesh.export(file_type=suffix)
        atomic_write_bytes(path, data if isinstance(data, bytes) else data.encode())
        paths.append(path)
    return paths
