"""DreamFusion's NeRF in plain PyTorch: x = g(theta; c), a neural field rendered from a camera c (guidance/cameras.py).

The field (TriplaneField) is a factorised grid: three axis-aligned feature planes (xy, xz, yz) over [-1, 1]^2,
sampled bilinearly with grid_sample and concatenated with the point itself, then a small MLP gives a density
and a colour (RGB albedo through a sigmoid, or the model's latent channels for `latent_render`):
    sigma(p) = softplus(s(p) + blob(p)),  blob(p) = 10 (1 - |p| / 0.5)
(Magic3D's / threestudio's density blob: the object starts as a ball of radius ~0.5 at the centre). No compiled
extension: grid_sample and Linear layers run on CPU, MPS and CUDA alike. A pure-torch multi-resolution hash grid
(instant-NGP's 16 levels x 2 features, one gather for every level and corner) was measured on this project's CPU
and not used: 2.6 s forward + backward for 32 768 points against 0.07 s for the triplane (benchmarks/nerf.py,
time_encodings; one thread).

Rendering (render_rays): the rays of each camera that meet the unit sphere (the object's bounding sphere) take
`samples` stratified samples between their entry and exit, then `importance` more drawn from the piecewise-constant
distribution of the stratified samples' weights (inverse CDF; NeRF's hierarchical sampling with one field). The
stratified samples are evaluated once, without gradients (they propose, and they are rendered); the importance
samples carry the gradients, so a step's backward costs `importance` samples per ray. All are merged in depth order
and composited with midpoint intervals (each sample owns the stretch between its neighbours' midpoints)
    alpha_i = 1 - exp(-sigma_i delta_i),   w_i = alpha_i prod_{j<i} (1 - alpha_j),
    C = sum_i w_i c_i + (1 - sum_i w_i) bg,
so that a constant density integrates to within half a stratified bin per boundary (tests/test_nerf.py).
Shading (DreamFusion, sec. 3.1): 'albedo' (c = rho), 'lambertian' (c = rho (0.1 + 0.9 max(0, n . l))),
'textureless' (the same with rho = 1), with normals n = -grad sigma / |grad sigma| (autograd) and a point light
drawn around the camera every step; 'random' is threestudio's schedule: albedo for the first `albedo_steps`
steps, then per view albedo (p = 0.25), lambertian or textureless (p = 0.375 each).

Regularisers (regularization(), on the last render, in the units of main.py's scaled loss, LOSS_SCALE x loss;
each a sum over a view's pixels, averaged over the views): orientation (DreamFusion / Ref-NeRF: sum_i w_i
max(0, n_i . d)^2, normals facing away from the camera; only on renders that computed normals), opacity sparsity
(accumulated opacity), alpha entropy (binary entropy of the accumulated opacity: opaque or empty pixels). Their
weights default to 0 (REGULARIZERS): in the toy 3D world neither entropy (20, 100) nor sparsity (20) improved a
150-step sphere (IoU 0.69-0.74 against 0.735 without), and they cannot be tuned for Stable Diffusion here.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from guidance.cameras import Camera, CameraRanges, turntable
from guidance.common import UserError
from guidance.generators import DEFAULT_LR, Generator

DEFAULT_RENDER_SIZE = 64
SHADINGS = ("albedo", "lambertian", "textureless", "random")
BACKGROUNDS = ("random", "mlp", "black", "white")
# At --lr 0.1 (main.py's default), the rate of each parameter group: threestudio's (grid 0.01, MLP and background
# 0.001, for runs of 10 000 steps). The toy 3D world's nerf_defaults raise them ten times for its 300-step runs.
LRS = {"grid": 0.01, "mlp": 0.001, "background": 0.001}
# Weights in units of LOSS_SCALE x loss (main.py): total = 2000 loss + regularization().
REGULARIZERS = {"orientation": 0.0, "sparsity": 0.0, "entropy": 0.0}
BLOB_DENSITY, BLOB_RADIUS = 10.0, 0.5
AMBIENT, DIFFUSE = 0.1, 0.9
ALBEDO_STEPS = 1000
LIGHT_DISTANCE = (0.8, 1.5)  # threestudio's "dreamfusion" light: around the camera, this far from the origin
TURNTABLE_FRAMES = 60
DEFAULTS = dict(render_size=DEFAULT_RENDER_SIZE, samples=48, importance=16, grid_resolution=64, grid_channels=16,
                hidden=64, shading="random", background="random", lrs={})
CHUNK_RAYS = 8192  # rays per chunk of a no-grad render (turntable, image): ~0.5 GB peak (benchmarks/nerf.py, 128^2)


class TriplaneField(nn.Module):
    """A density and a colour at points of [-1, 1]^3 from three feature planes and a small MLP (module docstring)."""

    def __init__(self, out_channels: int = 3, resolution: int = 64, channels: int = 16, hidden: int = 64,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.out_channels = int(out_channels)
        # Small random planes: the MLP first sees the point itself (a smooth blob), and the planes add detail.
        self.planes = nn.Parameter(1e-2 * torch.randn(3, channels, resolution, resolution, generator=generator))
        self.mlp = nn.Sequential(nn.Linear(3 * channels + 3, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1 + self.out_channels))
        with torch.no_grad():
            for layer in self.mlp:
                if isinstance(layer, nn.Linear):
                    bound = 1 / math.sqrt(layer.in_features)
                    layer.weight.copy_((torch.rand(layer.weight.shape, generator=generator) * 2 - 1) * bound)
                    layer.bias.zero_()

    def features(self, points: torch.Tensor) -> torch.Tensor:
        """Return the [N, 3 C] plane features at [N, 3] points (bilinear; planes xy, xz, yz)."""
        x, y, z = points.unbind(-1)
        grid = torch.stack([torch.stack([x, y], -1), torch.stack([x, z], -1), torch.stack([y, z], -1)])[:, None]
        sampled = F.grid_sample(self.planes, grid.to(self.planes.dtype), mode="bilinear", align_corners=True)
        return sampled[:, :, 0].permute(2, 0, 1).reshape(points.shape[0], -1)  # [3, C, 1, N] -> [N, 3 C]

    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (density [N] >= 0, colour features [N, out_channels] before activation) at [N, 3] points."""
        out = self.mlp(torch.cat([self.features(points), points], -1))
        blob = BLOB_DENSITY * (1 - points.norm(dim=-1) / BLOB_RADIUS)
        return F.softplus(out[:, 0] + blob), out[:, 1:]

    def density(self, points: torch.Tensor) -> torch.Tensor:
        """Return the density [N] at [N, 3] points."""
        return self(points)[0]


# ----------------------------------------------------------------------------------------------- volume rendering
def sphere_interval(origins: torch.Tensor, directions: torch.Tensor, radius: float = 1.0):
    """Return (near, far) [R] where unit-direction rays cross the sphere |p| = radius (near = far = 0 on a miss)."""
    b = (origins * directions).sum(-1)
    disc = b**2 - ((origins**2).sum(-1) - radius**2)
    half = disc.clamp(min=0).sqrt()
    hit = disc > 0
    near = torch.where(hit, (-b - half).clamp(min=0), torch.zeros_like(b))
    far = torch.where(hit, (-b + half).clamp(min=0), torch.zeros_like(b))
    return near, far


def sample_pdf(edges: torch.Tensor, weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Return depths [R, n] drawn by inverse CDF from the piecewise-constant density over bins edges [R, N + 1]
    with masses weights [R, N] (a small floor keeps every bin reachable), at uniforms u [R, n]."""
    pdf = weights + 1e-5
    pdf = pdf / pdf.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), pdf.cumsum(-1)], -1).clamp(max=1.0)
    upper = torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True).clamp(1, pdf.shape[-1])
    lower = upper - 1
    c_lo, c_hi = cdf.gather(-1, lower), cdf.gather(-1, upper)
    e_lo, e_hi = edges.gather(-1, lower), edges.gather(-1, upper)
    return e_lo + (u - c_lo) / (c_hi - c_lo).clamp(min=1e-8) * (e_hi - e_lo)


def composite_weights(density: torch.Tensor, depths: torch.Tensor, near: torch.Tensor, far: torch.Tensor):
    """Return (w [R, S], deltas [R, S]) for sorted sample depths [R, S]: each sample owns the interval between its
    neighbours' midpoints (the first from near, the last to far); w_i = alpha_i prod_{j<i} (1 - alpha_j)."""
    mids = (depths[:, 1:] + depths[:, :-1]) / 2
    bounds = torch.cat([near[:, None], mids, far[:, None]], -1)
    deltas = (bounds[:, 1:] - bounds[:, :-1]).clamp(min=0)
    optical = density * deltas
    # transmittance in front of sample i: exp(-sum_{j<i} sigma_j delta_j)
    in_front = torch.cat([torch.zeros_like(optical[:, :1]), optical[:, :-1]], -1).cumsum(-1)
    return (1 - torch.exp(-optical)) * torch.exp(-in_front), deltas


def _evaluate(field, points: torch.Tensor, need_normals: bool):
    """Return (density [N], colour [N, C], unit normals -grad sigma [N, 3] or None) at [N, 3] points."""
    if not need_normals:
        density, colours = field(points)
        return density, colours, None
    differentiable = torch.is_grad_enabled()  # the normals need autograd either way; a no-grad pass keeps no graph
    with torch.enable_grad():
        points = points.detach().requires_grad_(True)
        density, colours = field(points)
        grad = torch.autograd.grad(density.sum(), points, create_graph=differentiable)[0]
    normals = -grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    if not differentiable:
        return density.detach(), colours.detach(), normals.detach()
    return density, colours, normals


def render_rays(field, origins: torch.Tensor, directions: torch.Tensor, samples: int = 48, importance: int = 16,
                generator: torch.Generator | None = None, need_normals: bool = False,
                proposal_grad: bool = False) -> dict:
    """Return the volume rendering of rays [R, 3] (unit directions) through field(points) -> (density, colour).

    `samples` stratified samples, then `importance` more drawn from their weights; all are composited in depth
    order. proposal_grad=False evaluates the stratified samples once, without gradients (they propose and are
    rendered, but only the importance samples carry the field's gradients: the backward pass costs `importance`
    samples per ray, not samples + importance). Keys: 'opacity' [R] (sum_i w_i), 'depth' [R], 'weights' [R, S],
    'colours' [R, S, C] (the field's raw colour), 'points' [R, S, 3], and with need_normals 'normals' [R, S, 3].
    generator: stratified jitter and importance uniforms (None: bin centres and evenly spaced quantiles, a
    deterministic render).
    """
    n_rays, device = origins.shape[0], origins.device
    near, far = sphere_interval(origins, directions)
    span = far - near
    edges = near[:, None] + span[:, None] * torch.linspace(0, 1, samples + 1, device=device)
    jitter = (torch.rand(n_rays, samples, generator=generator).to(device) if generator is not None
              else torch.full((n_rays, samples), 0.5, device=device))
    depths = edges[:, :-1] + jitter * (span[:, None] / samples)
    points = origins[:, None] + depths[..., None] * directions[:, None]
    with torch.set_grad_enabled(torch.is_grad_enabled() and (proposal_grad or importance == 0)):
        values = _evaluate(field, points.reshape(-1, 3), need_normals)
    if importance > 0:
        with torch.no_grad():
            coarse, _ = composite_weights(values[0].detach().view(n_rays, samples), depths, near, far)
            u = (torch.rand(n_rays, importance, generator=generator).to(device) if generator is not None
                 else ((torch.arange(importance, device=device) + 0.5) / importance).expand(n_rays, importance))
            fine = sample_pdf(edges, coarse, u)
        fine_points = origins[:, None] + fine[..., None] * directions[:, None]
        fine_values = _evaluate(field, fine_points.reshape(-1, 3), need_normals)
        depths, order = torch.sort(torch.cat([depths, fine], -1), -1)
        points = torch.cat([points, fine_points], 1).gather(1, order[..., None].expand(-1, -1, 3))
        flat_order = (order + torch.arange(n_rays, device=device)[:, None] * order.shape[1]).reshape(-1)
        values = [None if a is None else torch.cat([a.view(n_rays, samples, -1), b.view(n_rays, importance, -1)], 1)
                  .reshape(n_rays * (samples + importance), -1)[flat_order] for a, b in zip(values, fine_values)]
        values[0] = values[0].view(-1)
    density, colours, normals = values
    n = depths.shape[1]
    weights, _ = composite_weights(density.view(n_rays, n), depths, near, far)
    out = {"opacity": weights.sum(-1), "depth": (weights * depths).sum(-1), "weights": weights,
           "colours": colours.reshape(n_rays, n, -1), "points": points}
    if need_normals:
        out["normals"] = normals.reshape(n_rays, n, 3)
    return out


def shade(colours: torch.Tensor, shading: str, normals: torch.Tensor | None = None, points: torch.Tensor | None = None,
          light: torch.Tensor | None = None) -> torch.Tensor:
    """Return per-sample colours [R, S, 3] under a shading: albedo rho, lambertian rho (a + d max(0, n . l)), or
    textureless (a + d max(0, n . l)) in grey; l the unit direction from each point to the point light."""
    if shading == "albedo":
        return colours
    to_light = F.normalize(light.view(1, 1, 3) - points, dim=-1)
    diffuse = AMBIENT + DIFFUSE * (normals * to_light).sum(-1, keepdim=True).clamp(min=0)
    if shading == "lambertian":
        return colours * diffuse
    if shading == "textureless":
        return diffuse.expand_as(colours)
    raise ValueError(f"unknown shading {shading!r}: use one of {', '.join(SHADINGS)}")


# ----------------------------------------------------------------------------------------------- the generator
class NerfGenerator(Generator):
    """theta = a TriplaneField (+ a background MLP); latents(model, cameras) renders each camera and encodes it.

    Options (DEFAULTS; the model's `nerf_defaults` replace them, e.g. the toy 3D world's black background and
    smaller field): render_size 64 (pixels per side of each view; the render is resized to the model's resolution
    for its VAE), samples 48 (stratified, proposal) / importance 16 (rendered) per ray, grid_resolution 64,
    grid_channels 16, hidden 64, shading 'random', albedo_steps 1000, background 'random' (a solid random colour
    per view; 'mlp' a small MLP of the direction; 'black' / 'white'), latent_render False (render the model's
    latent channels at its latent size: no VAE), regularizers REGULARIZERS, lrs LRS (per group, at --lr 0.1),
    ranges CameraRanges() (the model's camera_ranges if it has them): the front view and the turntable sit at
    the middle of the distance and fovy ranges; turntable_frames 60 at turntable_size max(render_size, 128);
    mesh_resolution 128, mesh_threshold 'auto'.
    """

    name = "nerf"
    needs_cameras = True

    def __init__(self, model, batch: int = 1, render_size: int | None = None, generator: torch.Generator | None = None,
                 samples: int | None = None, importance: int | None = None, grid_resolution: int | None = None,
                 grid_channels: int | None = None, hidden: int | None = None, shading: str | None = None,
                 albedo_steps: int = ALBEDO_STEPS, background: str | None = None, latent_render: bool = False,
                 regularizers: dict | None = None, lrs: dict | None = None, ranges: CameraRanges | None = None,
                 turntable_frames: int = TURNTABLE_FRAMES, turntable_size: int | None = None,
                 mesh_resolution: int = 128, mesh_threshold="auto"):
        given = dict(render_size=render_size, samples=samples, importance=importance, grid_resolution=grid_resolution,
                     grid_channels=grid_channels, hidden=hidden, shading=shading, background=background, lrs=lrs)
        # An option not given comes from the model's nerf_defaults (the toy 3D world's), else from DEFAULTS.
        options = {**DEFAULTS, **getattr(model, "nerf_defaults", {}),
                   **{k: v for k, v in given.items() if v is not None}}
        if latent_render and shading is None:
            options["shading"] = "albedo"  # latent channels cannot be shaded
        shading, background = options["shading"], options["background"]
        if int(batch) != 1:
            raise UserError(f"--batch {batch}: the NeRF generator optimises one object; use --views_per_step for "
                            f"several views per step")
        if shading not in SHADINGS:
            raise UserError(f"--shading {shading!r}: use one of {', '.join(SHADINGS)}")
        if background not in BACKGROUNDS:
            raise UserError(f"--background {background!r}: use one of {', '.join(BACKGROUNDS)}")
        if latent_render and shading != "albedo":
            raise UserError(f"--latent_render renders the model's latent channels, which cannot be shaded: use "
                            f"--shading albedo (not {shading})")
        unknown = set(regularizers or {}) - set(REGULARIZERS)
        if unknown:
            raise UserError(f"unknown regularizer(s) {', '.join(sorted(unknown))}: use {', '.join(REGULARIZERS)}")
        rng = generator if generator is not None else torch.Generator().manual_seed(0)
        super().__init__(model, 1, int(model.latent_size) if latent_render else int(options["render_size"]), False, rng)
        self.config = dict(render_size=self.render_size, samples=int(options["samples"]),
                           importance=int(options["importance"]), grid_resolution=int(options["grid_resolution"]),
                           grid_channels=int(options["grid_channels"]), hidden=int(options["hidden"]), shading=shading,
                           background=background, latent_render=bool(latent_render),
                           channels=int(model.latent_channels) if latent_render else 3)
        self.samples, self.importance = self.config["samples"], self.config["importance"]
        self.shading, self.albedo_steps, self.background = shading, int(albedo_steps), background
        self.latent_render = bool(latent_render)
        self.regularizers = {**REGULARIZERS, **(regularizers or {})}
        self.ranges = ranges or getattr(model, "camera_ranges", None) or CameraRanges()
        # The front view's and the GIF's background: the model's (the toy 3D world's black), else the training one.
        self.eval_background = tuple(getattr(model, "background", (0.0,) * 3 if background == "black" else (1.0,) * 3))
        self.turntable_frames, self.turntable_size = int(turntable_frames), turntable_size
        self.mesh_resolution, self.mesh_threshold = int(mesh_resolution), mesh_threshold
        if self.latent_render:
            self._fit_latent_colours(model)
            self._decode = model.decode_latents
        self.field = TriplaneField(self.config["channels"], self.config["grid_resolution"],
                                   self.config["grid_channels"], self.config["hidden"], rng).to(self.device)
        rates = {**LRS, **options["lrs"]}
        self.groups = [{"name": "grid", "params": [self.field.planes], "lr": rates["grid"]},
                       {"name": "mlp", "params": list(self.field.mlp.parameters()), "lr": rates["mlp"]}]
        self.background_mlp = None
        if background == "mlp":
            self.background_mlp = nn.Sequential(nn.Linear(3, 32), nn.SiLU(), nn.Linear(32, 3)).to(self.device)
            self.groups.append({"name": "background", "params": list(self.background_mlp.parameters()),
                                "lr": rates["background"]})
        self.steps = 0  # training renders so far (the 'random' shading schedule)
        self.last = None  # the last training render's tensors, for regularization()

    # ------------------------------------------------------------------------------------------- colours
    def _fit_latent_colours(self, model) -> None:
        """Fit affine maps between RGB and the model's latents of solid colours (backgrounds, mesh colours)."""
        gen = torch.Generator().manual_seed(1)
        corners = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=torch.float32)
        rgb = torch.cat([corners, torch.rand(8, 3, generator=gen)])
        side = int(model.size_multiple)
        with torch.no_grad():
            latents = model.encode_imgs(rgb[:, :, None, None].expand(-1, -1, side, side).to(self.device))
        latents = latents.mean((2, 3)).float().cpu()
        ones = torch.ones(len(rgb), 1)
        self.rgb_to_latent = torch.linalg.lstsq(torch.cat([rgb, ones], 1), latents).solution  # [4, C]
        self.latent_to_rgb = torch.linalg.lstsq(torch.cat([latents, ones], 1), rgb).solution  # [C + 1, 3]

    def _colour(self, raw: torch.Tensor) -> torch.Tensor:
        """Return rendered channels from the field's raw colour: sigmoid albedo, or the latent values themselves."""
        return raw if self.latent_render else torch.sigmoid(raw)

    def _to_channels(self, rgb: torch.Tensor) -> torch.Tensor:
        """Return background colours [..., 3] in the rendered channels (latents through the fitted affine map)."""
        if not self.latent_render:
            return rgb
        return torch.cat([rgb, torch.ones_like(rgb[..., :1])], -1) @ self.rgb_to_latent.to(rgb.device)

    def rgb_of(self, channels: torch.Tensor) -> torch.Tensor:
        """Return RGB in [0, 1] of rendered channels [..., C] (latents through the fitted affine map)."""
        if not self.latent_render:
            return channels.clamp(0, 1)
        ones = torch.ones_like(channels[..., :1])
        return (torch.cat([channels, ones], -1) @ self.latent_to_rgb.to(channels.device)).clamp(0, 1)

    # ------------------------------------------------------------------------------------------- rendering
    def _view_shading(self) -> str:
        if self.shading != "random":
            return self.shading
        if self.steps < self.albedo_steps:
            return "albedo"
        u = float(torch.rand((), generator=self.rng))
        return "albedo" if u < 0.25 else "lambertian" if u < 0.625 else "textureless"

    def _light(self, camera: Camera) -> torch.Tensor:
        """Return a random point light around the camera (threestudio's 'dreamfusion' light sampling)."""
        direction = F.normalize(camera.position().float() + torch.randn(3, generator=self.rng), dim=0)
        near, far = LIGHT_DISTANCE
        distance = near + (far - near) * float(torch.rand((), generator=self.rng))
        return (direction * distance).to(self.device)

    def _background_colour(self, training: bool, background: tuple | None) -> torch.Tensor | None:
        """Return this view's solid background colour [3] in RGB, or None for the background MLP's."""
        if background is not None:
            return torch.tensor(background, dtype=torch.float32)
        if self.background == "mlp":
            return None
        if not training:
            return torch.tensor(self.eval_background, dtype=torch.float32)
        if self.background == "random":
            return torch.rand(3, generator=self.rng)
        return torch.full((3,), 0.0 if self.background == "black" else 1.0)

    def render_views(self, cameras: list[Camera], size: int | None = None, training: bool = True,
                     background: tuple | None = None) -> dict:
        """Return {'image' [B, C, H, W] over the background, 'opacity' [B, 1, H, W]} of cameras (differentiable).

        training: stratified jitter, this step's random light, shading and background colour, and the tensors
        regularization() reads are kept; else a deterministic render with albedo shading on `background` (RGB;
        default: the evaluation background, or the background MLP's).
        """
        size = int(size or self.render_size)
        images, opacities, last = [], [], []
        for camera in cameras:
            origins, directions = (r.reshape(-1, 3) for r in camera.rays(size, size, device=self.device))
            shading = self._view_shading() if training else "albedo"
            out = self._render_chunks(origins, directions, shading, camera, self.rng if training else None, training)
            colour = self._background_colour(training, background)
            if colour is None:
                bg = self._to_channels(torch.sigmoid(self.background_mlp(directions)))
            else:
                bg = self._to_channels(colour.to(self.device)).expand(directions.shape[0], -1)
            image = out["colour"] + (1 - out["opacity"][:, None]) * bg
            images.append(image.T.reshape(-1, size, size))
            opacities.append(out["opacity"].reshape(1, size, size))
            if training:
                last.append(out)
        if training:
            self.last = last
            self.steps += 1
        return {"image": torch.stack(images), "opacity": torch.stack(opacities)}

    def _render_chunks(self, origins, directions, shading, camera, rng, training) -> dict:
        """Return {'colour' [R, C] premultiplied, 'opacity' [R], and, training, what the regularisers read}."""
        chunk = origins.shape[0] if training else CHUNK_RAYS
        light = self._light(camera) if shading != "albedo" else None
        pieces = []
        for start in range(0, origins.shape[0], chunk):
            o, d = origins[start:start + chunk], directions[start:start + chunk]
            out = render_rays(self.field, o, d, self.samples, self.importance, rng, need_normals=shading != "albedo")
            colours = shade(self._colour(out["colours"]), shading, out.get("normals"), out["points"], light)
            piece = {"colour": (out["weights"][..., None] * colours).sum(1), "opacity": out["opacity"]}
            if training:
                piece["weights"] = out["weights"]
                if "normals" in out:  # n . d > 0: a normal facing away from the camera
                    facing = (out["normals"] * d[:, None]).sum(-1).clamp(min=0)
                    piece["orientation"] = (out["weights"] * facing**2).sum(-1)
            pieces.append(piece)
        if len(pieces) == 1:
            return pieces[0]
        return {key: torch.cat([p[key] for p in pieces]) for key in ("colour", "opacity")}

    def latents(self, model, cameras: list[Camera] | None = None) -> torch.Tensor:
        """Return the latents [B = len(cameras), C, h, w] of this step's renders, differentiable in theta."""
        if not cameras:
            raise ValueError("the NeRF generator renders cameras: call latents(model, cameras) with a list of Camera")
        images = self.render_views(cameras)["image"]
        if self.latent_render:
            return images
        if images.shape[-1] != model.resolution:
            images = F.interpolate(images, size=(model.resolution, model.resolution), mode="bilinear",
                                   align_corners=False)
        return model.encode_imgs(images, requires_grad=True)

    def regularization(self) -> torch.Tensor:
        """Return the weighted regularisers of the last training render (a scalar; 0 when every weight is 0).

        Each term is a sum over the pixels of a view, averaged over the views, so that a weight lambda pushes a
        pixel as hard as an SDS gradient of lambda / LOSS_SCALE on one latent element of an identity VAE.
        """
        total = torch.zeros((), device=self.device)
        if self.last is None:
            return total
        lam = self.regularizers
        opacity = torch.stack([out["opacity"] for out in self.last])  # [B, H * W]
        if lam["sparsity"]:
            total = total + lam["sparsity"] * opacity.sum(-1).mean()
        if lam["entropy"]:
            a = opacity.clamp(1e-5, 1 - 1e-5)
            total = total + lam["entropy"] * -(a * a.log() + (1 - a) * (1 - a).log()).sum(-1).mean()
        orientation = [out["orientation"].sum() for out in self.last if "orientation" in out]
        if lam["orientation"] and orientation:
            total = total + lam["orientation"] * torch.stack(orientation).mean()
        return total

    # ------------------------------------------------------------------------------------------- outputs
    def front_camera(self) -> Camera:
        """Return the evaluation camera: azimuth 0 (the front), the middle of the other ranges."""
        return self.ranges.middle()

    def final_view(self) -> list[Camera]:
        """Return [the front camera]: the run's final latents (latents.pt) are the front view's."""
        return [self.front_camera()]

    @torch.no_grad()
    def render_rgba(self, camera: Camera, size: int | None = None) -> torch.Tensor:
        """Return [4, H, W] in [0, 1]: RGB over black (premultiplied) and alpha = accumulated opacity.

        latent_render: the latents over the latent of black, decoded by the model's VAE at its resolution (alpha
        resized to match).
        """
        out = self.render_views([camera], size, training=False, background=(0.0, 0.0, 0.0))
        opacity = out["opacity"][0].clamp(0, 1)
        if not self.latent_render:
            return torch.cat([out["image"][0].clamp(0, 1), opacity])
        rgb = self._decode(out["image"])[0].clamp(0, 1)
        opacity = F.interpolate(opacity[None], size=rgb.shape[-2:], mode="bilinear", align_corners=False)[0]
        return torch.cat([rgb, opacity])

    @torch.no_grad()
    def image(self, model) -> torch.Tensor:
        """Return the front view [1, 3, H, W] in [0, 1] on the evaluation background, at the model's resolution
        (rendered at max(render_size, 128) pixels at most, then resized: a CPU renders 512^2 in tens of seconds)."""
        if self.latent_render:
            latents = self.render_views([self.front_camera()], training=False)["image"]
            return model.decode_latents(latents).clamp(0, 1)
        size = min(int(model.resolution), max(self.render_size, 128))  # then resized to the model's resolution
        image = self.render_views([self.front_camera()], size, training=False)["image"]
        return self._to_output_size(image).clamp(0, 1)

    def save(self, save_dir, name: str) -> list[Path]:
        """Write <save_dir>/<name>.glb and .obj (unless the field is empty: then a warning says so), and in
        <save_dir>/<name>/: turntable/frame_NNN.png (RGBA), turntable/transforms.json, turntable.gif; return paths."""
        from guidance.export import export_mesh, write_turntable

        run_dir = Path(save_dir) / name
        size = int(self.turntable_size or (self.render_size if self.latent_render else max(self.render_size, 128)))
        middle = self.ranges.middle()
        cameras = turntable(self.turntable_frames, distance=middle.distance, fovy=middle.fovy, ranges=self.ranges)
        paths = write_turntable(lambda camera: self.render_rgba(camera, size), cameras, run_dir / "turntable",
                                run_dir / "turntable.gif", gif_background=self.eval_background)
        try:
            paths += export_mesh(self.field.density, self.vertex_colours, Path(save_dir) / name,
                                 resolution=self.mesh_resolution, threshold=self.mesh_threshold)
        except UserError as err:
            warnings.warn(f"no mesh written for {name}: {err}", stacklevel=2)
        return paths

    @torch.no_grad()
    def vertex_colours(self, points: torch.Tensor) -> torch.Tensor:
        """Return RGB in [0, 1] [N, 3] of the field's albedo at [N, 3] points (mesh vertex colours)."""
        return torch.cat([self.rgb_of(self._colour(self.field(chunk)[1]))
                          for chunk in points.to(self.device).split(65536)]).cpu()

    # ------------------------------------------------------------------------------------------- checkpoints
    def checkpoint(self) -> dict:
        """Return theta and what it means: {'config', 'field', 'background', 'steps'} (state dicts, on the CPU)."""
        def cpu(module):
            return None if module is None else {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        return {"generator": self.name, "config": dict(self.config), "field": cpu(self.field),
                "background": cpu(self.background_mlp), "steps": self.steps}

    def restore(self, checkpoint: dict) -> None:
        """Load a checkpoint() (UserError naming each setting that differs from this generator's)."""
        if checkpoint.get("generator") != self.name:
            raise UserError(f"the checkpoint is of the {checkpoint.get('generator')!r} generator, not nerf")
        saved = checkpoint["config"]
        differ = [f"{k} {saved.get(k)!r} (now {v!r})" for k, v in self.config.items() if saved.get(k) != v]
        if differ:
            raise UserError(f"cannot resume: the checkpoint was made with {', '.join(differ)}; run with the "
                            f"checkpoint's settings or start afresh")
        self.field.load_state_dict(checkpoint["field"])
        if self.background_mlp is not None:
            self.background_mlp.load_state_dict(checkpoint["background"])
        self.steps = int(checkpoint.get("steps", 0))

    def save_checkpoint(self, path) -> Path:
        """Write checkpoint() to path atomically (torch.save); return the path."""
        from guidance.common import save_torch_atomic

        return save_torch_atomic(self.checkpoint(), path)

    def fit(self, target_imgs, steps=0, lr=DEFAULT_LR) -> float:
        raise UserError("the NeRF generator cannot start from a source image (PDS / DDS edits): use an image "
                        "generator (latent, pixels, gaussians, vector) for editing")
