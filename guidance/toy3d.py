"""The toy 3D world: a diffusion model over renders of known 3D objects, exact, so that text-to-3D can be tested.

The 2D toy world's sibling (guidance/toy.py). Objects are a sphere (radius 0.5) or a cube (half side 0.4) centred
at the origin, of one colour, optionally with a front of another colour (the cube's +x face; the sphere's cap
x > 0.6 r): "a red cube", "a blue sphere with a yellow front". The world frame and cameras are guidance/cameras.py's
(z up, azimuth 0 sees the +x front). Objects are lit by a fixed light (ambient 0.5 + 0.5 max(0, n . l)), so that a
cube shows its faces; the light is baked into what a NeRF must learn as albedo. The background is black.

The data distribution is a mixture of isotropic Gaussians N(mu_k, s^2 I), s = 0.05, one per (object, view): mu_k
is the object rendered (2 x 2 supersampled, 32 x 32 pixels, in [-1, 1]) from the centre of one cell of a grid
over DreamFusion's camera ranges (elevation -10..45, azimuth -180..180, distance 1.5..2.0, fovy 40..70 degrees;
`ViewGrid`: 36 azimuths every 10 degrees with 0 a cell centre, 6 elevations, 2 distances, 3 fovys = 1296 views),
every cell equally likely. A prompt selects the objects it names and, with a view phrase (", front view"), the
views that Camera.view() names so; the empty prompt (and words that describe image quality, such as the default
negative prompt "low quality") is the whole world. The "UNet" is the exact MMSE noise predictor of that mixture
under Stable Diffusion's schedule, as in the 2D world:
    eps*(x_t) = b (x_t - a sum_k w_k(x_t) mu_k) / v,   w_k ~ p_k N(x_t; a mu_k, v I),   v = a^2 s^2 + b^2.

The "text embedding" is the prior p_k itself (not its log, as in the 2D world): stable-dreamfusion interpolates
the embeddings of neighbouring views linearly, and a convex combination of priors is the mixture of those views,
where one of log-priors would intersect them. The UNet takes the log.

Cost: a template is colour-linear, mu = 2 (A c_body + F c_front) - 1, with A, F the body's and the front's
coverage x shading in each pixel; so the world stores only A and F per (shape, view) (2 x 1296 x 2 maps of
32 x 32 = 5.3 M floats, 21 MB) and forms x . mu_k, |mu_k|^2 and sum_k w_k mu_k for all 32 objects x 1296 views
(41 472 templates) from them exactly, by algebra: one UNet call takes ~12 ms at batch 2 and ~25 ms at batch 8 on
one CPU thread, where a dense bank of the 41 472 templates would hold 510 MB (float32) and read all of it per call.
Building the maps takes ~2 s (cached per process).

    python -m guidance.toy3d render OUT_DIR "a red cube with a yellow front"    # the true object's turntable
"""
from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from guidance.cameras import DEFAULT_AZIMUTH, DEFAULT_DISTANCE, DEFAULT_ELEVATION, DEFAULT_FOVY, VIEWS, Camera, \
    CameraRanges, wrap_azimuth
from guidance.common import UserError, resolve_device, resolve_precision
from guidance.losses import ScoreDistillation
from guidance.schedule import NoiseSchedule
from guidance.toy import COLOURS, DEFAULT_LORA_LR, LOG_ZERO, TEMPLATE_STD, ToyUNet

SIZE = 32
SHAPES = ("sphere", "cube")
SPHERE_RADIUS = 0.5
CUBE_HALF_SIDE = 0.4
FRONT_CAP = 0.6  # the sphere's front: surface points with x > FRONT_CAP * radius (a 53-degree cap)
LIGHT = (0.6, 0.4, 0.7)  # direction towards the fixed light (normalised below)
AMBIENT, DIFFUSE = 0.5, 0.5
SUPERSAMPLE = 2  # rays per pixel side: templates and renders are box-filtered, as a NeRF's soft edges are
BACKGROUND = (0.0, 0.0, 0.0)
COLOUR_NAMES = tuple(COLOURS)
# Words about image quality (main.py's default negative prompt, SDS-Bridge's modifiers): they name no object,
# so a prompt made of them alone is the whole world. Any other unknown word is an error.
QUALITY_WORDS = frozenset("""low high quality detailed resolution sharp oversaturated smooth pixelated cartoon foggy
hazy blurry bad structure noisy malformed""".split())
ARTICLES = ("a", "an", "the")
VOCABULARY = (f"\"a <colour> <shape>\" or \"a <colour> <shape> with a <colour> front\", colours {', '.join(COLOURS)}, "
              f"shapes {', '.join(SHAPES)}, optionally followed by \", front view\" / \", side view\" / "
              f"\", back view\"")
DEFAULT_PROMPTS = ("a red cube with a yellow front", "a blue sphere", "a green cube",
                   "a yellow sphere with a red front")


@dataclass(frozen=True)
class Object3D:
    """One object of the world: its shape, its body colour and its front's colour (equal for a plain object)."""

    shape: str
    colour: str
    front: str

    def __str__(self) -> str:
        plain = f"a {self.colour} {self.shape}"
        return plain if self.front == self.colour else f"{plain} with a {self.front} front"


OBJECTS = tuple(Object3D(s, c, f) for s in SHAPES for c in COLOURS for f in COLOURS)
OBJECTS_PER_SHAPE = len(COLOURS) ** 2


@dataclass(frozen=True)
class ViewGrid:
    """The cameras of the world: the centres of a grid of equal cells over each camera range."""

    azimuths: int = 36
    elevations: int = 6
    distances: int = 2
    fovys: int = 3
    elevation: tuple = DEFAULT_ELEVATION
    distance: tuple = DEFAULT_DISTANCE
    fovy: tuple = DEFAULT_FOVY

    def cameras(self) -> list[Camera]:
        """Return every view's Camera, azimuth fastest, then elevation, distance, fovy."""
        def centres(pair, n):
            return [pair[0] + (pair[1] - pair[0]) * (i + 0.5) / n for i in range(n)]
        azimuths = [wrap_azimuth(360.0 * k / self.azimuths) for k in range(self.azimuths)]
        return [Camera(el, az, d, f) for f in centres(self.fovy, self.fovys)
                for d in centres(self.distance, self.distances)
                for el in centres(self.elevation, self.elevations) for az in azimuths]

    def ranges(self) -> CameraRanges:
        """Return the camera ranges the grid covers."""
        return CameraRanges(self.elevation, DEFAULT_AZIMUTH, self.distance, self.fovy)


# ----------------------------------------------------------------------------------------------- rendering
def _light() -> torch.Tensor:
    light = torch.tensor(LIGHT, dtype=torch.float64)
    return light / light.norm()


def intersect(shape: str, origins: torch.Tensor, directions: torch.Tensor):
    """Return (hit [...], front [...], shade [...]) of rays [..., 3] against a shape at the origin.

    hit: the ray meets the object in front of its origin; front: the point it meets is on the object's front;
    shade: AMBIENT + DIFFUSE max(0, n . l) at that point (the fixed light).
    """
    if shape == "sphere":
        b = (origins * directions).sum(-1)
        c = (origins**2).sum(-1) - SPHERE_RADIUS**2
        disc = b**2 - c
        t = -b - disc.clamp(min=0).sqrt()
        hit = (disc >= 0) & (t > 0)
        normal = (origins + t[..., None] * directions) / SPHERE_RADIUS
        front = normal[..., 0] > FRONT_CAP
    elif shape == "cube":
        safe = torch.where(directions.abs() < 1e-12, torch.full_like(directions, 1e-12), directions)
        t1, t2 = (-CUBE_HALF_SIDE - origins) / safe, (CUBE_HALF_SIDE - origins) / safe
        t_near, axis = torch.minimum(t1, t2).max(-1)
        t_far = torch.maximum(t1, t2).min(-1).values
        hit = (t_near <= t_far) & (t_near > 0)
        # The face a ray enters through faces against the ray: normal = -sign(d_axis) e_axis.
        normal = torch.zeros_like(origins)
        normal.scatter_(-1, axis[..., None], -torch.sign(safe.gather(-1, axis[..., None])))
        front = (axis == 0) & (normal[..., 0] > 0)
    else:
        raise ValueError(f"unknown shape {shape!r}: use one of {', '.join(SHAPES)}")
    shade = AMBIENT + DIFFUSE * (normal @ _light().to(normal.dtype)).clamp(min=0)
    return hit, front & hit, torch.where(hit, shade, torch.zeros_like(shade))


def shape_maps(shape: str, cameras: list[Camera], size: int = SIZE, supersample: int = SUPERSAMPLE) -> torch.Tensor:
    """Return [V, 3, H, W] float32 maps per camera: body coverage x shade (A), front coverage x shade (F), coverage.

    The object's image in [0, 1] is A c_body + F c_front on black, its alpha the coverage; each pixel averages
    supersample^2 rays through the centres of its sub-pixels. Rays are float32 (the world's templates are
    exactly these renders; a ray grazing an edge moves one sub-pixel's coverage at most).
    """
    return _maps(shape, *_rays(cameras, size * supersample), supersample)


def _rays(cameras: list[Camera], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rays = [camera.rays(size, size, dtype=torch.float32) for camera in cameras]
    return torch.stack([o for o, _ in rays]), torch.stack([d for _, d in rays])


def _maps(shape: str, origins: torch.Tensor, directions: torch.Tensor, supersample: int) -> torch.Tensor:
    hit, front, shade = intersect(shape, origins, directions)
    maps = torch.stack([shade * (hit & ~front), shade * front, hit.to(shade.dtype)], 1)  # [V, 3, fine, fine]
    return torch.nn.functional.avg_pool2d(maps, supersample)


def render_object(obj: Object3D, camera: Camera, size: int = SIZE, supersample: int = SUPERSAMPLE) -> torch.Tensor:
    """Return the true object's [4, H, W] float32 RGBA render at camera, in [0, 1] (alpha = coverage), on black."""
    body, front, alpha = shape_maps(obj.shape, [camera], size, supersample)[0]
    colour, front_colour = (torch.tensor(COLOURS[name]).view(3, 1, 1) for name in (obj.colour, obj.front))
    rgb = body * colour + front * front_colour
    return torch.cat([rgb, alpha[None]])


# ----------------------------------------------------------------------------------------------- prompts
def parse_prompt(prompt: str) -> tuple[list[Object3D], str | None]:
    """Return (the objects a prompt selects, its view phrase or None); UserError for a prompt outside the world.

    "a <colour> <shape>" is the plain object; "... with a <colour> front" its fronted versions; a shape without a
    colour is any colour; a prompt of quality words only (or "") is every object.
    """
    text = prompt.lower().strip()
    view = None
    match = re.search(r",?\s*\b(" + "|".join(VIEWS) + r") view\s*$", text)
    if match:
        view, text = match.group(1), text[:match.start()]
    words = [w for w in re.findall(r"[a-z]+", text) if w not in QUALITY_WORDS]
    if not words:
        return list(OBJECTS), view
    sentence = " ".join(words)
    colour, shape, article = f"({'|'.join(COLOURS)})", f"({'|'.join(SHAPES)})", f"(?:{'|'.join(ARTICLES)}) "
    grammar = re.fullmatch(f"(?:{article})?(?:{colour} )?{shape}(?: with {article}?{colour} front)?", sentence)
    if grammar is None:
        raise UserError(f"prompt {prompt!r} is not an object of the toy 3D world, which draws one object: {VOCABULARY}")
    body, shape, front = grammar.groups()
    objects = [o for o in OBJECTS if o.shape == shape and (body is None or o.colour == body)
               and (o.front == front if front is not None else o.front == o.colour)]
    return objects, view


# ----------------------------------------------------------------------------------------------- the model
@functools.lru_cache(maxsize=2)
def _bank(grid: ViewGrid, size: int) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Return ([S, V, 2, H*W] float32 maps A, F per shape and view; each view's name), computed once per grid."""
    cameras = grid.cameras()
    maps = torch.zeros(len(SHAPES), len(cameras), 2, size * size)
    for i in range(0, len(cameras), 64):
        origins, directions = _rays(cameras[i:i + 64], size * SUPERSAMPLE)
        for s, shape in enumerate(SHAPES):
            maps[s, i:i + 64] = _maps(shape, origins, directions, SUPERSAMPLE)[:, :2].flatten(2)
    return maps, \
        tuple(c.view() for c in cameras)


class ViewMixtureEps(nn.Module):
    """The exact MMSE noise predictor of the (object, view) mixture, from the colour-linear maps (module docstring).

    Template k = (object o = (shape s, body b, front f), view v), k = o * V + v; mu_k = 2 (A_sv c_b + F_sv c_f) - 1
    per channel. Inner products x . A_sv and x . F_sv come from one [B*3, P] x [P, S*V*2] matmul (float32), the
    logits and weights are formed in float64, and sum_k w_k mu_k from one [B*3, S*V*2] x [S*V*2, P] matmul.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, maps: torch.Tensor, std: float = TEMPLATE_STD):
        super().__init__()
        n_shapes, n_views, _, n_pixels = maps.shape
        self.n_views, self.n_pixels = n_views, n_pixels
        self.register_buffer("maps", maps.reshape(-1, n_pixels).contiguous())  # [(s, v, region), P]
        colours = torch.tensor([COLOURS[c] for c in COLOUR_NAMES], dtype=torch.float64)
        body = colours.repeat_interleave(len(COLOURS), 0)  # [O, 3], o = b * 4 + f
        front = colours.repeat(len(COLOURS), 1)
        self.register_buffer("body", body)
        self.register_buffer("front", front)
        m = maps.double()
        a, f = m[:, :, 0], m[:, :, 1]  # [S, V, P]
        aa, ff, af = (a * a).sum(-1), (f * f).sum(-1), (a * f).sum(-1)
        sa, sf = a.sum(-1), f.sum(-1)
        # |mu|^2 = sum_ch sum_p (2 A c_b + 2 F c_f - 1)^2, per (s, v, o): [S, O, V]
        cb2, cf2, cbf = (body**2).sum(1), (front**2).sum(1), (body * front).sum(1)
        sq = (4 * cb2[None, :, None] * aa[:, None] + 4 * cf2[None, :, None] * ff[:, None]
              + 8 * cbf[None, :, None] * af[:, None] - 4 * body.sum(1)[None, :, None] * sa[:, None]
              - 4 * front.sum(1)[None, :, None] * sf[:, None] + 3 * n_pixels)
        self.register_buffer("sq_norms", sq.reshape(-1))  # [K] in template order k = (s * O + o) * V + v
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod, dtype=torch.float64))
        self.std = float(std)

    def coefficients(self, timesteps: torch.Tensor):
        """Return per-row (a, b, v) as [B, 1] float64 tensors for integer timesteps."""
        abar = self.alphas_cumprod[timesteps.long()].view(-1, 1)
        return abar.sqrt(), (1 - abar).sqrt(), abar * self.std**2 + (1 - abar)

    def posterior(self, x_t: torch.Tensor, timesteps: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """Return the [B, K] posterior weights w_k(x_t) given [B, K] priors (probabilities; zero excludes k)."""
        batch = x_t.shape[0]
        a, _, v = self.coefficients(timesteps)
        x = x_t.reshape(batch * 3, self.n_pixels).to(self.maps.dtype)
        inner = (x @ self.maps.T).double().view(batch, 3, -1, self.n_views, 2)  # [B, ch, S, V, region]
        x_mu = 2 * (torch.einsum("bcsv,oc->bsov", inner[..., 0], self.body)
                    + torch.einsum("bcsv,oc->bsov", inner[..., 1], self.front))
        x_mu = x_mu.reshape(batch, -1) - x.double().view(batch, -1).sum(1, keepdim=True)
        prior = prior.to(torch.float64)
        log_prior = torch.where(prior > 0, prior.clamp(min=1e-300).log(), torch.full_like(prior, LOG_ZERO))
        # -||x - a mu_k||^2 / 2v without the ||x||^2 term, which every k shares.
        logits = log_prior + (2 * a * x_mu - a**2 * self.sq_norms) / (2 * v)
        return torch.softmax(logits, dim=1)

    def posterior_mean(self, weights: torch.Tensor) -> torch.Tensor:
        """Return sum_k w_k mu_k as [B, 3 * P] float64, for [B, K] weights."""
        batch = weights.shape[0]
        w = weights.view(batch, -1, OBJECTS_PER_SHAPE, self.n_views)  # [B, S, O, V]
        w_body = torch.einsum("bsov,oc->bcsv", w, self.body)
        w_front = torch.einsum("bsov,oc->bcsv", w, self.front)
        coeffs = torch.stack([w_body, w_front], -1).reshape(batch * 3, -1)  # [(B, ch), (S, V, region)]
        mean = 2 * (coeffs.to(self.maps.dtype) @ self.maps).double() - weights.sum(1).repeat_interleave(3)[:, None]
        return mean.view(batch, -1)

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        weights = self.posterior(x_t, timesteps, prior)
        a, b, v = self.coefficients(timesteps)
        x = x_t.reshape(x_t.shape[0], -1).double()
        eps = b * (x - a * self.posterior_mean(weights)) / v
        return eps.to(x_t.dtype).view_as(x_t)


class Toy3DDiffusion(ScoreDistillation):
    """The toy 3D world behind the same interface as StableDiffusion and the 2D toy: exact UNet, identity 'VAE'.

    Latents are the 32 x 32 RGB images in [-1, 1] (float32; the posterior is formed in float64). The UNet is the
    2D toy's ToyUNet (its zero-initialised residual is VSD's LoRA target) around the 3D mixture's predictor.
    The world's answers to what scripts ask: `default_prompts`, `default_negative_prompt` (""), `resolution` (32),
    `background` (black: the evaluation background of a generator), `camera_ranges` (the world's),
    `default_weighting` ('sigma_over_alpha', in place of the course's 'uniform' for SDS and VSD: NeRF + SDS IoU 0.87
    against 0.81 'uniform' in benchmarks/toy3d.py; main.py's 500-step cube scores 0.92 against 0.01 in eval.py)
    and `nerf_defaults` (the NeRF generator's options for this world).
    """

    name = "toy3d"  # what --model takes
    model_name = name
    cpu_threads = 1  # its tensors are small: extra CPU threads only spin-wait
    prompts_file = Path(__file__).resolve().parent.parent / "data" / "toy3d_prompts.json"  # run_all's default
    description = f"the toy 3D world: spheres and cubes, 32x32 renders from DreamFusion's cameras ({VOCABULARY})"
    example = (DEFAULT_PROMPTS[0], None, None)  # prompt, edit prompt, source: the app's first page
    lora_target_modules = ["residual"]
    latent_channels = 3
    latent_size = SIZE
    resolution = SIZE
    size_multiple = SIZE
    default_prompts = DEFAULT_PROMPTS
    default_negative_prompt = ""
    default_weighting = "sigma_over_alpha"
    background = BACKGROUND
    camera_ranges = ViewGrid().ranges()  # the cameras its data covers (an instance with another grid sets its own)
    # Render at the world's size on its black background, unshaded (the light is baked into the objects); a small
    # field with ten times threestudio's rates: a 300-step run takes ~20 s on one CPU thread (tests/test_nerf.py).
    nerf_defaults = {"render_size": SIZE, "background": "black", "shading": "albedo", "samples": 24, "importance": 16,
                     "grid_channels": 8, "hidden": 32, "lrs": {"grid": 0.1, "mlp": 0.01, "background": 0.01}}

    def __init__(self, device=None, precision=torch.float32, t_range=(0.02, 0.98), lora_rank=4,
                 lora_lr=DEFAULT_LORA_LR, vsd_lora_timestep="fresh", channels_last=False, compile=False,
                 cuda_graphs="auto", grid: ViewGrid = ViewGrid(), size: int = SIZE):
        self._setup_distillation(t_range, lora_rank, lora_lr, vsd_lora_timestep)
        if cuda_graphs in ("on", True):
            raise UserError("--cuda_graphs on is for Stable Diffusion: the toy 3D world runs eagerly; use auto or off")
        resolve_precision(precision)
        self.device = resolve_device("cpu" if device is None else device)
        if self.device.type == "mps":
            raise UserError("the toy 3D world forms its posterior in float64, which MPS lacks: use --device cpu")
        self.dtype = torch.float32
        self.grid = grid
        self.latent_size = self.resolution = self.size_multiple = int(size)
        self.camera_ranges = grid.ranges()
        self.schedule = NoiseSchedule.scaled_linear()
        maps, self.view_names = _bank(grid, int(size))
        self.unet = ToyUNet(self.schedule.alphas_cumprod)
        self.unet.exact = ViewMixtureEps(self.schedule.alphas_cumprod, maps)
        self.unet.to(self.device).eval().requires_grad_(False)
        self.n_views = len(self.view_names)
        self._prior_cache = {}

    @staticmethod
    def check_prompt(prompt: str) -> None:
        """Raise UserError unless the prompt names an object of this world (a view phrase may follow)."""
        objects, _ = parse_prompt(prompt)
        if len(objects) == len(OBJECTS):
            raise UserError(f"the toy 3D world cannot draw {prompt!r}: it names no object. Its vocabulary is "
                            f"{VOCABULARY}")

    @staticmethod
    def scorer() -> "Toy3DScorer":
        """Return the scorer that plays CLIP's role in eval.py for this world (the front view)."""
        return Toy3DScorer()

    @property
    def n_templates(self) -> int:
        return len(OBJECTS) * self.n_views

    def prompt_prior(self, prompt: str) -> torch.Tensor:
        """Return the [1, K] float32 prior of a prompt: uniform over its objects x its views (k = o * V + v)."""
        if prompt not in self._prior_cache:
            objects, view = parse_prompt(prompt)
            views = torch.ones(self.n_views, dtype=torch.bool)
            if view is not None:
                views = torch.tensor([name == view for name in self.view_names])
                if not views.any():
                    raise UserError(f"prompt {prompt!r}: the toy 3D world has no {view} view (its cameras stay within "
                                    f"elevation {self.grid.elevation[0]:g}..{self.grid.elevation[1]:g}): drop "
                                    f"', {view} view' or keep --elevation_range below 60 for view prompts")
            selected = torch.zeros(len(OBJECTS), self.n_views, dtype=torch.bool)
            selected[[OBJECTS.index(o) for o in objects]] = views
            prior = selected.float().reshape(1, -1)
            self._prior_cache[prompt] = prior / prior.sum()
        return self._prior_cache[prompt]

    def get_text_embeds(self, prompt: str) -> torch.Tensor:
        """Return the prompt's [1, K] prior over (object, view) templates (its 'text embedding')."""
        return self.prompt_prior(prompt).to(self.device)

    def source_size(self, height: int, width: int) -> tuple[int, int]:
        """Return (size, size): every source image is resized to the world's size."""
        return (self.resolution, self.resolution)

    def encode_imgs(self, imgs: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
        """Return the latents of [B, 3, H, W] images in [0, 1]: the images in [-1, 1] (with gradients if asked)."""
        latents = (2 * imgs - 1).to(self.device, torch.float32)
        return latents if requires_grad else latents.detach()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Return images in [0, 1] from latents in [-1, 1] (clamped)."""
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def true_object(self, prompt: str) -> Object3D:
        """Return the one object a prompt names (UserError if it names several, e.g. a shape without colour)."""
        objects, _ = parse_prompt(prompt)
        if len(objects) != 1:
            raise UserError(f"prompt {prompt!r} selects {len(objects)} objects; name its colour and shape")
        return objects[0]

    def render(self, prompt_or_object, camera: Camera, size: int | None = None) -> torch.Tensor:
        """Return the TRUE object's [4, H, W] RGBA render in [0, 1] at any camera (alpha = coverage)."""
        obj = prompt_or_object if isinstance(prompt_or_object, Object3D) else self.true_object(prompt_or_object)
        return render_object(obj, camera, size or self.resolution)


# ----------------------------------------------------------------------------------------------- evaluation
class Toy3DScorer:
    """Plays CLIP's role for the toy 3D world: p(prompt's objects | front-view image).

    p = sum_{o in prompt} N(x; mu_o, sigma^2 I) / sum_o N(x; mu_o, sigma^2 I) over the 32 objects rendered at the
    evaluation camera (the front, CameraRanges().middle()), sigma = 1.5, so that the score grades: under "a red cube
    with a yellow front", 0.96 for its true front view, 0.034 for a plain yellow cube's, 0.015 for uniform noise,
    below 1e-4 for a plain red cube's or a black image.
    """

    def __init__(self, sigma: float = 1.5, camera: Camera | None = None, size: int = SIZE):
        self.sigma, self.size = float(sigma), int(size)
        camera = camera or CameraRanges().middle()
        self.means = torch.stack([render_object(o, camera, size)[:3].double().flatten() * 2 - 1 for o in OBJECTS])

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        """Return p(prompt's objects | image) in [0, 1] for each (image, prompt) pair."""
        if len(images) != len(prompts):
            raise ValueError(f"score() got {len(images)} images but {len(prompts)} prompts")
        scores = []
        for img, prompt in zip(images, prompts):
            objects, _ = parse_prompt(prompt)
            img = img.convert("RGB")
            if img.size != (self.size, self.size):
                img = img.resize((self.size, self.size), resample=Image.BICUBIC)
            x = torch.from_numpy(np.asarray(img, dtype=np.float64) / 255.0).permute(2, 0, 1).reshape(1, -1) * 2 - 1
            posterior = torch.softmax(-((self.means - x) ** 2).sum(1) / (2 * self.sigma**2), dim=0)
            scores.append(float(posterior[[OBJECTS.index(o) for o in objects]].sum()))
        return scores


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "render":
        print("usage: python -m guidance.toy3d render OUT_DIR PROMPT", file=sys.stderr)
        return 2
    from guidance.cameras import turntable
    from guidance.export import write_turntable

    try:
        objects, _ = parse_prompt(argv[2])
        if len(objects) != 1:
            raise UserError(f"prompt {argv[2]!r} selects {len(objects)} objects; name its colour and shape")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    folder = Path(argv[1])
    paths = write_turntable(lambda camera: render_object(objects[0], camera, 128), turntable(60), folder / "turntable",
                            folder / "turntable.gif")
    print(f"wrote {len(paths)} files under {folder}")
    return 0


WORLD = Toy3DDiffusion  # guidance/models.py finds the world here

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
