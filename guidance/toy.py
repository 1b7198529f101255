"""The toy world: a diffusion model that is known exactly, so SDS, PDS and VSD can be run and tested offline.

Images are 64x64 RGB in [-1, 1] on a black background, each one coloured shape at one of the 3x3 grid
positions. The data distribution is a mixture of isotropic Gaussians N(mu_k, s^2 I), s = 0.05, one per
(colour, shape, position) template, equally likely. A prompt selects the templates whose colour and shape
it names; what it does not name is marginalised; the empty (or negative) prompt is the whole mixture.

The "UNet" is the exact MMSE noise predictor of that mixture under Stable Diffusion's schedule: with
a = sqrt(abar_t), b = sqrt(1 - abar_t), v = a^2 s^2 + b^2,
    eps*(x_t) = sum_k w_k(x_t) b (x_t - a mu_k) / v,   w_k ~ pi_k N(x_t; a mu_k, v I),
and the "text embedding" of a prompt is its log-prior over the templates. The latent is the image itself.
Every loss and classifier-free guidance run through ScoreDistillation (guidance/losses.py) unchanged; for
VSD the UNet carries a zero-initialised, time-modulated residual that peft's LoRA trains (ToyUNet).
ToyScorer plays CLIP's role in eval.py (`--scorer toy`), and data/toy_prompts.json is a prompt set in the
course's schema whose source images (a template plus a white patch no template has) this module renders:

    python -m guidance.toy render data/toy_imgs data/toy_prompts.json
"""
from __future__ import annotations

import functools
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from guidance.schedule import NoiseSchedule
from guidance.losses import ScoreDistillation
from guidance.common import UserError, resolve_device, resolve_precision, save_image_atomic, save_json_atomic

REPO = Path(__file__).resolve().parent.parent
SIZE = 64
GRID = 3
TEMPLATE_STD = 0.05
BACKGROUND = -1.0
# Light colours, so that recolouring a shape moves an image less than moving it (in [-1, 1] units).
COLOURS = {
    "red": (1.0, 0.2, 0.2),
    "green": (0.2, 1.0, 0.2),
    "blue": (0.2, 0.2, 1.0),
    "yellow": (1.0, 1.0, 0.2),
}
SHAPES = ("circle", "square")
CIRCLE_RADIUS = 8.0
SQUARE_HALF_SIDE = 7.0
ROW_NAMES = ("top", "middle", "bottom")
COL_NAMES = ("left", "centre", "right")
# Words for colours and shapes this world lacks: a prompt using one is an error, not a silent marginal.
ABSENT_COLOURS = {"purple", "orange", "pink", "white", "black", "brown", "grey", "gray", "cyan", "magenta",
                  "violet", "golden", "gold", "silver", "teal", "indigo", "turquoise", "beige", "maroon", "navy"}
ABSENT_SHAPES = {"triangle", "star", "rectangle", "hexagon", "pentagon", "ellipse", "oval", "diamond", "heart",
                 "cross", "line", "cube", "sphere", "polygon", "rhombus", "octagon", "cylinder", "cone"}
# Phrases that describe what every image has (the background) or the source images' identity detail.
IGNORED_PHRASES = ("black background", "white patch")
# A large finite log-prior for "not this template": -inf would turn 0 * inf into NaN inside CFG.
LOG_ZERO = -1e20
PATCH_SIZE = 4
CORNERS = ("top left", "top right", "bottom left", "bottom right")
DEFAULT_LORA_LR = 3e-2
N_BASIS = 6


@dataclass(frozen=True)
class Template:
    """One mixture component of the toy world: a colour, a shape and a grid cell (row, col)."""

    colour: str
    shape: str
    row: int
    col: int

    @property
    def position(self) -> str:
        return f"{ROW_NAMES[self.row]} {COL_NAMES[self.col]}"

    def __str__(self) -> str:
        return f"{self.colour} {self.shape} at {self.position}"


TEMPLATES = tuple(Template(c, s, r, q) for c in COLOURS for s in SHAPES for r in range(GRID) for q in range(GRID))
VOCABULARY = f"colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)}"


def shape_mask(shape: str, row: int, col: int) -> torch.Tensor:
    """Return the [64, 64] bool mask of a shape in grid cell (row, col): pixel centres inside it."""
    cell = SIZE / GRID
    cy, cx = (row + 0.5) * cell, (col + 0.5) * cell
    ys = torch.arange(SIZE, dtype=torch.float64).view(-1, 1) + 0.5
    xs = torch.arange(SIZE, dtype=torch.float64).view(1, -1) + 0.5
    if shape == "circle":
        return (ys - cy) ** 2 + (xs - cx) ** 2 <= CIRCLE_RADIUS**2
    if shape == "square":
        return ((ys - cy).abs() <= SQUARE_HALF_SIDE) & ((xs - cx).abs() <= SQUARE_HALF_SIDE)
    raise ValueError(f"unknown shape {shape!r}: {VOCABULARY}")


def render_template(template: Template) -> torch.Tensor:
    """Return the [3, 64, 64] float64 mean image mu_k of a template, in [-1, 1]."""
    image = torch.full((3, SIZE, SIZE), BACKGROUND, dtype=torch.float64)
    mask = shape_mask(template.shape, template.row, template.col)
    for channel, value in enumerate(COLOURS[template.colour]):
        image[channel][mask] = value
    return image


def patch_mask(corner: str = "top left") -> torch.Tensor:
    """Return the [64, 64] bool mask of the white identity patch: PATCH_SIZE pixels square in a corner."""
    if corner not in CORNERS:
        raise ValueError(f"unknown corner {corner!r}: use one of {', '.join(CORNERS)}")
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    rows = slice(0, PATCH_SIZE) if corner.startswith("top") else slice(SIZE - PATCH_SIZE, SIZE)
    cols = slice(0, PATCH_SIZE) if corner.endswith("left") else slice(SIZE - PATCH_SIZE, SIZE)
    mask[rows, cols] = True
    return mask


def render_source(template: Template, corner: str = "top left") -> torch.Tensor:
    """Return a [3, 64, 64] source image in [-1, 1]: the template plus a white patch no template has."""
    image = render_template(template)
    image[:, patch_mask(corner)] = 1.0
    return image


def to_pil(image: torch.Tensor) -> Image.Image:
    """Return a [3, 64, 64] image in [-1, 1] as an RGB PIL image (the toy's colours quantise exactly)."""
    array = ((image.double().clamp(-1, 1) + 1) / 2 * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def from_pil(img: Image.Image) -> torch.Tensor:
    """Return a PIL image as a [3, 64, 64] float32 tensor in [-1, 1], resized (bicubic) if it is not 64x64."""
    img = img.convert("RGB")
    if img.size != (SIZE, SIZE):
        img = img.resize((SIZE, SIZE), resample=Image.BICUBIC)
    array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1) * 2 - 1


# ----------------------------------------------------------------------------------------------- prompts
def parse_prompt(prompt: str) -> tuple[set[str], set[str]]:
    """Return (colours, shapes) a prompt names; empty sets mean 'any'. Raises UserError for absent ones."""
    text = prompt.lower()
    for phrase in IGNORED_PHRASES:
        text = text.replace(phrase, " ")
    colours, shapes, absent = set(), set(), []
    for word in re.findall(r"[a-z]+", text):
        singular = word[:-1] if word.endswith("s") and word[:-1] in SHAPES + tuple(ABSENT_SHAPES) else word
        if singular in COLOURS:
            colours.add(singular)
        elif singular in SHAPES:
            shapes.add(singular)
        elif singular in ABSENT_COLOURS or singular in ABSENT_SHAPES:
            absent.append(word)
    if absent:
        raise UserError(f"prompt {prompt!r} names {', '.join(repr(w) for w in absent)}, which the toy world "
                        f"lacks. Its vocabulary is {VOCABULARY} (e.g. \"a red circle\", \"a square\")")
    return colours, shapes


def prompt_templates(prompt: str) -> list[int]:
    """Return the indices of the templates a prompt selects (all of them for a prompt that names none)."""
    colours, shapes = parse_prompt(prompt)
    return [k for k, tpl in enumerate(TEMPLATES)
            if (not colours or tpl.colour in colours) and (not shapes or tpl.shape in shapes)]


def prompt_log_prior(prompt: str) -> torch.Tensor:
    """Return the [1, K] log-prior log pi_k of a prompt: uniform over its templates, LOG_ZERO elsewhere."""
    selected = prompt_templates(prompt)
    log_prior = torch.full((1, len(TEMPLATES)), LOG_ZERO, dtype=torch.float32)
    log_prior[0, selected] = -math.log(len(selected))
    return log_prior


# ----------------------------------------------------------------------------------------------- the model
@functools.lru_cache(maxsize=1)
def template_means() -> torch.Tensor:
    """Return the [K, 3 * 64 * 64] float64 matrix of template means mu_k, in TEMPLATES order (shared; never modify)."""
    return torch.stack([render_template(tpl).flatten() for tpl in TEMPLATES])


class ExactMixtureEps(nn.Module):
    """The exact MMSE noise predictor of the template mixture: eps*(x_t) = b (x_t - a sum_k w_k mu_k) / v."""

    def __init__(self, alphas_cumprod: torch.Tensor, std: float = TEMPLATE_STD):
        super().__init__()
        means = template_means()
        self.register_buffer("means", means)
        self.register_buffer("sq_norms", (means**2).sum(1))
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod, dtype=torch.float64))
        self.std = float(std)

    def coefficients(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return per-row (a, b, v) as [B, 1] tensors (float64, or float32 on MPS) for integer timesteps."""
        abar = self.alphas_cumprod[timesteps.long()].view(-1, 1)
        a, b = abar.sqrt(), (1 - abar).sqrt()
        return a, b, abar * self.std**2 + (1 - abar)

    def posterior(self, x_t: torch.Tensor, timesteps: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
        """Return the [B, K] posterior weights w_k(x_t) given [B, K] log-priors (in the means' precision)."""
        a, _, v = self.coefficients(timesteps)
        x = x_t.reshape(x_t.shape[0], -1).to(self.means.dtype)
        # -||x - a mu_k||^2 / 2v without the ||x||^2 term, which every k shares.
        logits = log_prior.to(self.means.dtype) + (2 * a * (x @ self.means.T) - a**2 * self.sq_norms) / (2 * v)
        return torch.softmax(logits, dim=1)

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
        weights = self.posterior(x_t, timesteps, log_prior)
        a, b, v = self.coefficients(timesteps)
        x = x_t.reshape(x_t.shape[0], -1).to(self.means.dtype)
        eps = b * (x - a * (weights @ self.means)) / v
        return eps.to(x_t.dtype).view_as(x_t)


class TimeEmbedding(nn.Module):
    """The identity on the time basis f_j(t): the toy UNet's 'timestep embedding', where VSD's LoRA adds its camera
    embedding (guidance/core.py: lora_cameras) as a diffusers UNet's time_embedding takes it."""

    def __init__(self, width: int):
        super().__init__()
        self.out_features = int(width)

    def forward(self, basis: torch.Tensor) -> torch.Tensor:
        return basis


class ToyUNet(nn.Module):
    """The toy world's UNet: the exact predictor eps* plus a residual that is zero until VSD's LoRA trains it.

    residual(x_t, t) = sum_j f_j(t) R_j([x_t, eps*(x_t), 1]), where `residual` is one zero-initialised 1x1
    conv (the LoRA-able layer) giving N_BASIS maps R_j, mixed by fixed Gaussian bumps f_j over t / T. It
    can thus represent what VSD needs phi to learn: for particles spread by sigma_q around a template,
    eps_q = eps* (a^2 s^2 + b^2) / (a^2 sigma_q^2 + b^2), a time-dependent gain on eps* (plus small shifts).
    peft's LoRA starts with lora_B = 0 and a random lora_A, so its first gradient reaches lora_B.
    Called like diffusers' UNet: unet(x, t, encoder_hidden_states=log_prior, return_dict=False)[0].
    """

    def __init__(self, alphas_cumprod: torch.Tensor, n_basis: int = N_BASIS):
        super().__init__()
        self.exact = ExactMixtureEps(alphas_cumprod)
        self.num_train_timesteps = len(alphas_cumprod)
        self.n_basis = n_basis
        self.residual = nn.Conv2d(3 + 3 + 1, 3 * n_basis, 1)
        nn.init.zeros_(self.residual.weight)
        nn.init.zeros_(self.residual.bias)
        self.register_buffer("basis_centres", torch.linspace(0, 1, n_basis, dtype=torch.float64))
        self.time_embedding = TimeEmbedding(n_basis)

    def time_basis(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Return the [B, n_basis] weights f_j(t): Gaussian bumps over t / T, one basis spacing wide."""
        u = timesteps.to(self.basis_centres.dtype).view(-1, 1) / self.num_train_timesteps
        return torch.exp(-0.5 * ((u - self.basis_centres) * (self.n_basis - 1)) ** 2)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = True):
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        eps = self.exact(sample, timesteps, encoder_hidden_states)
        features = torch.cat([sample, eps, torch.ones_like(sample[:, :1])], dim=1)
        maps = self.residual(features).view(sample.shape[0], self.n_basis, 3, *sample.shape[2:])
        basis = self.time_embedding(self.time_basis(timesteps)).to(sample.dtype)[:, :, None, None, None]
        eps = eps + (basis * maps).sum(1)
        return SimpleNamespace(sample=eps) if return_dict else (eps,)


class ToyDiffusion(ScoreDistillation):
    """The toy world behind the same interface as StableDiffusion: exact UNet, identity 'VAE', prompt log-priors.

    Its latents, gradients and LoRA are float32 whatever precision is asked (the posterior weights are
    computed in float64): half precision gains nothing on a 64x64 mixture, and channels_last / compile
    are accepted and ignored for the same reason. It runs on the CPU unless a device is named: its
    tensors are too small for an accelerator to help. lora_lr defaults to 3e-2: the LoRA must follow
    particles that go from pure noise to templates in a few hundred steps. With the course's 1e-4 for SD,
    phi barely moves and the 4 particles of `--loss_type vsd` end at mse 0.2-0.35 from a template; at
    1e-2 at 0.011-0.014; at 3e-2 at 0.004 (a true sample of the world is at 0.0025).
    """

    name = "toy"  # what --model takes
    model_name = name
    cpu_threads = 1  # a 500-step run: 5 s on 1 thread, 25 s on 2 (extra threads only spin-wait on tiny tensors)
    prompts_file = REPO / "data" / "toy_prompts.json"  # run_all.py's default prompt set for this world
    description = f"the toy world: 64x64 circles and squares ({VOCABULARY})"
    example = ("a red circle", "a blue circle", REPO / "data" / "toy_imgs" / "a_red_circle.png")  # prompt, edit, source
    lora_target_modules = ["residual"]
    latent_channels = 3
    latent_size = SIZE
    resolution = SIZE
    size_multiple = SIZE

    @staticmethod
    def check_prompt(prompt: str) -> None:
        """Raise UserError unless the prompt names one object this world can draw: a colour, a shape or both, one of
        each at most (what it does not name is any: "a square" is a square of any colour)."""
        colours, shapes = parse_prompt(prompt)
        if not colours and not shapes:
            raise UserError(f"the toy world cannot draw {prompt!r}: it names no colour or shape. Its vocabulary is "
                            f"{VOCABULARY}; e.g. \"a red circle\" or \"a square\"")
        if len(colours) > 1 or len(shapes) > 1:
            named = ", ".join(sorted(colours) + sorted(shapes))
            raise UserError(f"the toy world draws one shape per image, but {prompt!r} names {named}: give one object, "
                            f"e.g. \"a red circle\" ({VOCABULARY})")

    @staticmethod
    def scorer() -> "ToyScorer":
        """Return the scorer that plays CLIP's role in eval.py for this world."""
        return ToyScorer()

    @staticmethod
    def comparison_metrics(latents: torch.Tensor, prompt: str, source: Image.Image | None = None) -> dict:
        """Return the exact metrics run_all's comparison reports for a run's final latents [3, 64, 64] (the image
        itself): image_metrics, plus the kept white patch (patch_mean) for an edit of `source`."""
        figures = image_metrics(latents, prompt)
        if source is not None:
            figures["patch"] = patch_mean(latents, from_pil(source))
        return figures

    def __init__(self, device=None, precision=torch.float32, t_range=(0.02, 0.98), lora_rank=4, lora_lr=DEFAULT_LORA_LR, vsd_lora_timestep="fresh", channels_last=False,
                 compile=False, cuda_graphs="auto"):
        self._setup_distillation(t_range, lora_rank, lora_lr, vsd_lora_timestep)
        if cuda_graphs in ("on", True):
            raise UserError("--cuda_graphs on is for Stable Diffusion: the toy world runs eagerly (its tensors are "
                            "tiny); use --cuda_graphs auto or off")
        resolve_precision(precision)  # a bad value is still an error
        self.device = resolve_device("cpu" if device is None else device)
        self.dtype = torch.float32
        self.schedule = NoiseSchedule.scaled_linear()
        self.unet = ToyUNet(self.schedule.alphas_cumprod)
        if self.device.type == "mps":  # MPS has no float64
            self.unet.to(torch.float32)
        self.unet.to(self.device).eval().requires_grad_(False)

    def source_size(self, height: int, width: int) -> tuple[int, int]:
        """Return (64, 64): every toy source image is resized to the world's size."""
        return (SIZE, SIZE)

    def get_text_embeds(self, prompt: str) -> torch.Tensor:
        """Return the prompt's [1, K] log-prior over the templates (its 'text embedding')."""
        return prompt_log_prior(prompt).to(self.device)

    def encode_imgs(self, imgs: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
        """Return the latents of [B, 3, 64, 64] images in [0, 1]: the images themselves, in [-1, 1] (with gradients if asked)."""
        latents = (2 * imgs - 1).to(self.device, torch.float32)
        return latents if requires_grad else latents.detach()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Return images in [0, 1] from latents in [-1, 1] (clamped)."""
        return ((latents.float() + 1) / 2).clamp(0, 1)


# ----------------------------------------------------------------------------------------------- analysis
def nearest_template(image: torch.Tensor) -> tuple[Template, float]:
    """Return (the template nearest to a [3, 64, 64] image in [-1, 1], their mean squared error per value)."""
    errors = ((template_means() - image.detach().double().cpu().reshape(1, -1)) ** 2).mean(1)
    k = int(errors.argmin())
    return TEMPLATES[k], float(errors[k])


def image_metrics(image: torch.Tensor, prompt: str) -> dict:
    """Return the exact toy metrics of a [3, 64, 64] image in [-1, 1] (unclamped) for the prompt it should show.

    template: the nearest template; template_mse: mean squared error to it per value; residual_std: its square
    root, the RMS of image minus template (a sample of the world has ~0.05, the mode 0); in_class: whether the
    nearest template is one the prompt selects.
    """
    template, mse = nearest_template(image)
    in_class = TEMPLATES.index(template) in prompt_templates(prompt)
    return {"template": str(template), "template_mse": mse, "residual_std": math.sqrt(mse), "in_class": in_class}


def patch_mean(result: torch.Tensor, source: torch.Tensor) -> float:
    """Return the mean of an edit's result over the source's white patch (1.0 kept, -1 erased), images in [-1, 1]."""
    white = (source >= 0.99).all(dim=0)
    if not white.any():
        raise ValueError("the source image has no white patch (no pixel is white in every channel)")
    return float(result[:, white].mean())


class ToyScorer:
    """Plays CLIP's role in eval.py: the posterior probability of a prompt's templates given the image.

    p(prompt | x) = sum_{k in prompt} N(x; mu_k, sigma^2 I) / sum_k N(x; mu_k, sigma^2 I), with the
    templates seen through noise of std sigma = 4 (the mixture as the diffusion sees it near t = 800), so
    that the score grades instead of snapping to 0 or 1: under "a red circle", 0.98 for a red circle, 0.13
    for pure noise, 0.015 for a yellow circle, below 0.001 for a blue circle or a red square.
    """

    def __init__(self, sigma: float = 4.0):
        self.sigma = float(sigma)
        self.means = template_means()

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        """Return p(prompt's templates | image) in [0, 1] for each (image, prompt) pair."""
        if len(images) != len(prompts):
            raise ValueError(f"score() got {len(images)} images but {len(prompts)} prompts")
        scores = []
        for img, prompt in zip(images, prompts):
            colours, shapes = parse_prompt(prompt)
            if not colours and not shapes:
                raise UserError(f"the toy scorer needs a toy prompt, but {prompt!r} names no colour or shape "
                                f"({VOCABULARY}): use --scorer clip for other prompts")
            x = from_pil(img).double().reshape(1, -1)
            logits = -((self.means - x) ** 2).sum(1) / (2 * self.sigma**2)
            posterior = torch.softmax(logits, dim=0)
            scores.append(float(posterior[prompt_templates(prompt)].sum()))
        return scores


# ----------------------------------------------------------------------------------------------- prompt set
# The toy prompt set (data/toy_prompts.json): source template, its patch corner, and the edit prompt.
PROMPT_SET = (
    (Template("red", "circle", 1, 1), "top left", "a blue circle"),
    (Template("green", "square", 0, 2), "bottom left", "a yellow square"),
    (Template("blue", "circle", 2, 0), "top right", "a blue square"),
    (Template("yellow", "square", 2, 2), "top left", "a red square"),
    (Template("red", "square", 0, 0), "bottom right", "a green circle"),
)


def prompt_set(img_dir: str = "data/toy_imgs") -> dict:
    """Return the toy prompt set in the course's schema {key: {prompt, edit_prompt, img_path}}."""
    entries = {}
    for template, _, edit_prompt in PROMPT_SET:
        prompt = f"a {template.colour} {template.shape}"
        key = prompt.replace(" ", "_")
        entries[key] = {"prompt": prompt, "edit_prompt": edit_prompt, "img_path": f"{img_dir}/{key}.png"}
    return entries


def render_prompt_set(img_dir: str | Path = "data/toy_imgs", json_path: str | Path | None = None) -> list[Path]:
    """Write the prompt set's source PNGs (template + white patch) to img_dir, and the json if asked; return the PNGs."""
    img_dir = Path(img_dir)
    img_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (template, corner, _), key in zip(PROMPT_SET, prompt_set()):
        path = img_dir / f"{key}.png"
        save_image_atomic(to_pil(render_source(template, corner)), path)
        paths.append(path)
    if json_path is not None:
        save_json_atomic(prompt_set(str(img_dir)), json_path)
    return paths


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or argv[0] != "render":
        print("usage: python -m guidance.toy render IMG_DIR [PROMPTS_JSON]", file=sys.stderr)
        return 2
    for path in render_prompt_set(argv[1], argv[2] if len(argv) == 3 else None):
        print(f"wrote {path}")
    return 0


WORLD = ToyDiffusion  # guidance/models.py finds the world here

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
