"""The one table of distillation methods: each row holds a method's paper, defaults, flags, cost and how a step
calls its loss. main.py, run_all.py, bench.py, app.py, `--help` and the README read it; adding a method is adding
a row here and a loss in guidance/losses.py.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from guidance.losses import PDS_VARIANTS, SDI_INVERSION_ETA, SDI_INVERSION_GUIDANCE

DEFAULT_T_RANGE = (0.02, 0.98)
DEFAULT_NEGATIVE_PROMPT = "low quality"  # the course's: the uncond CFG row of a run without --negative_prompt
# NFSD's negative prompt, for its delta_D = eps_null - eps_neg (the paper's, and the reference code's: SDS-Bridge's 2D
# nfsd_loss)
NFSD_NEGATIVE_PROMPT = ("unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, "
                        "low-resolution, gloomy")
BRIDGE_SRC_MODIFIER = (", oversaturated, smooth, pixelated, cartoon, foggy, hazy, blurry, bad structure, noisy, "
                       "malformed")
BRIDGE_TGT_MODIFIER = ", detailed high resolution, high quality, sharp"


@dataclass(frozen=True)
class Option:
    """A method-specific main.py flag: its type (a callable that parses the flag's text, as argparse's type=), its
    help, and the loss keyword it sets (None: read by a step)."""

    kind: Callable[[str], object]
    help: str
    keyword: str | None = None


def one_of(*choices: str) -> Callable[[str], str]:
    """Return a flag type that accepts one of `choices`, and names them when given anything else."""
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    parse.__name__ = "|".join(choices)
    return parse


def guidance_or_null(text: str) -> float | str:
    """Return a guidance scale, or "null" (no CFG: the null prompt) for the words null / none."""
    if text.strip().lower() in ("null", "none"):
        return "null"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a guidance scale (e.g. -6.5) nor null") from None


def non_negative(text: str) -> float:
    """Return a float >= 0 (a noise scale)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return value


# Method-specific flags of main.py. Their defaults are per method (Method.options); a flag given to a method that does
# not own it is an error.
OPTION_FLAGS = {
    "bridge_start": Option(float, "bridge: fraction of the steps run as plain SDS before the bridge starts "
                                  "(default 0.5)"),
    "bridge_src_modifier": Option(str, "bridge: text appended to the prompt for the current image's distribution"),
    "bridge_tgt_modifier": Option(str, "bridge: text appended to the prompt for the target distribution"),
    "asd_ratio": Option(float, "asd: eta, the largest timestep shift d as a fraction of t - min_step (default 0.1)",
                        "asd_ratio"),
    "inversion_steps": Option(int, "ism / sdi: DDIM inversion steps (default ism 5, sdi 10)", "inversion_steps"),
    "ism_delta_t": Option(int, "ism: interval delta_t between the inverted s and t (default 80)", "delta_t"),
    "ism_delta_s": Option(int, "ism: timesteps per inversion step delta_s (default 200)", "delta_s"),
    "pds_variant": Option(one_of(*PDS_VARIANTS), "pds: 'paper' (t - 1 and the exact posterior: the course's form, "
                                                 "a t-reweighted DDS) or 'official' (the authors' pds.py: t on a "
                                                 "500-step DDIM grid, t_prev = t - 2, one-step posterior "
                                                 "coefficients, which pull the edit toward the source)", "variant"),
    "ddim_steps": Option(int, "ddim: DDIM sampling steps (default 50)"),
    "sdi_eta": Option(float, "sdi: fraction of fresh noise blended into the inverted noise kappa (0: the inverted "
                             "noise itself; 1: SDS)", "eta"),
    "sdi_inversion_guidance": Option(guidance_or_null, "sdi: CFG scale of the DDIM inversion on the run's negative "
                                                       "and prompt rows (default -6.5: the authors' -7.5 in "
                                                       "threestudio's convention), or null: invert under the null "
                                                       "prompt without CFG", "inversion_guidance"),
    "sdi_inversion_eta": Option(non_negative, "sdi: noise added after each inversion step, in units of the step's "
                                              "posterior std (default 0.3, the authors'; 0: deterministic). "
                                              "--sdi_inversion_guidance null --sdi_inversion_eta 0 is the "
                                              "deterministic null-prompt inversion", "inversion_eta"),
}


@dataclass
class StepContext:
    """What a method's step needs besides the latents: the run's settings, embeddings and source (built once per run)."""

    model: object
    config: object  # the run's settings (main.py's RunConfig)
    text_embeddings: torch.Tensor  # cat[uncond (the negative prompt), cond (the prompt)]
    edit_embeddings: torch.Tensor | None = None  # cat[uncond, edit prompt] for editing methods
    src_latents: torch.Tensor | None = None  # the source image's latents for editing methods
    min_step: int = 20
    max_step: int = 980
    extra: dict = field(default_factory=dict)  # per-method embeddings, e.g. the bridge's modified prompts
    view_prompts: object = None  # guidance.views.ViewPrompts of a 3D run: the cond rows follow the cameras
    perp_neg: bool = False  # the cameras' other views as Perp-Neg negatives (guidance/views.py)
    cameras: torch.Tensor | None = None  # this step's cameras, [B, 16] flattened camera-to-world (3D runs)

    def embeds(self, prompt: str) -> torch.Tensor:
        """Return the model's (cached) embedding of one prompt."""
        return self.model.get_text_embeds(prompt)

    def at_view(self, view) -> "StepContext":
        """Return the context of one step's view: for cameras (a 3D run), text embeddings with one cond row per
        camera (its view prompt) and the negative prompt's row repeated; for anything else, this context."""
        if self.view_prompts is None or view is None:
            return self
        uncond = self.text_embeddings[:1]
        cameras = torch.stack([camera.c2w().flatten() for camera in view]).float()
        if self.perp_neg:
            from guidance.views import PerpNegEmbeddings

            rows, weights = self.view_prompts.perp_neg_rows(self.model, view, uncond)
            return replace(self, text_embeddings=PerpNegEmbeddings(rows, weights), cameras=cameras)
        cond = self.view_prompts.embeddings(self.model, view)
        return replace(self, text_embeddings=torch.cat([uncond.expand(len(view), *uncond.shape[1:]), cond]),
                       cameras=cameras)


@dataclass(frozen=True)
class Method:
    """One distillation method: its paper, main.py defaults, what it needs, its cost, and the loss that is its step."""

    name: str
    title: str
    paper: str
    gradient: str  # the gradient w.r.t. the latents, in the notation of guidance/losses.py
    guidance_scale: float
    steps: int
    weighting: str  # the paper's w(t), used when --weighting is not given (and the loss's own default)
    unet_rows: str  # UNet batch rows per step (B: latents optimised together)
    loss: str | None = None  # the model's loss method, e.g. "get_sds_loss" (None: a sampler)
    # What the loss is called with: "prompt" (x, cat[u, prompt]), "edit" (x, cat[u, edit prompt]) or
    # "pair" (source, x, cat[u, prompt], cat[u, edit prompt]).
    conditioning: str = "prompt"
    edits: bool = False  # needs --edit_prompt and --src_img_path; the result is named after the edit prompt
    t_schedule: str = "random"
    t_range: tuple = DEFAULT_T_RANGE
    # The uncond CFG row's prompt when the run gives no --negative_prompt: the course's, NFSD's own, or "" (no
    # negative prompt: model.negative_embedding("") is the model's null embedding) where the authors' code uses "".
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    options: dict = field(default_factory=dict)  # method-specific flags (OPTION_FLAGS) and their defaults
    lora: bool = False  # trains a LoRA (VSD)
    step: Callable | None = None  # a step that is more than one loss call: (method, model, context, x, t, i) -> loss
    sampler: Callable | None = None  # (model, StepContext, x_T) -> latents: a sampler, not a loss (no optimisation)
    extra_prompts: Callable | None = None  # (config) -> the prompts a run encodes besides negative, prompt and edit

    def compute_loss(self, model, context: StepContext, latents: torch.Tensor, t: int, step: int) -> torch.Tensor:
        """Return this step's loss: the method's own step function, or one call of its loss."""
        if self.step is not None:
            return self.step(self, model, context, latents, t, step)
        return call_loss(self, model, context, latents, t)


def call_loss(method: Method, model, context: StepContext, latents: torch.Tensor, t: int, loss: str | None = None,
              text_embeddings: torch.Tensor | None = None, **keywords) -> torch.Tensor:
    """Return one call of the method's loss (or `loss`) on the latents with the run's guidance, weighting and options."""
    config = context.config
    keywords = dict(guidance_scale=config.guidance_scale, t=t, weighting=config.weighting, **keywords)
    for dest in method.options:
        if OPTION_FLAGS[dest].keyword is not None:
            keywords[OPTION_FLAGS[dest].keyword] = getattr(config, dest)
    if method.lora and context.cameras is not None:  # VSD's LoRA sees the camera (ProlificDreamer)
        keywords["cameras"] = context.cameras
    loss_fn = getattr(model, loss or method.loss)
    if method.conditioning == "pair":
        return loss_fn(context.src_latents, latents, context.text_embeddings, context.edit_embeddings, **keywords)
    if text_embeddings is None:
        text_embeddings = context.edit_embeddings if method.conditioning == "edit" else context.text_embeddings
    return loss_fn(latents, text_embeddings, **keywords)


def ddim_sample(model, context: StepContext, x_T: torch.Tensor) -> torch.Tensor:
    """Return the model's own deterministic sample of the prompt from x_T, CFG at the run's guidance scale.

    The moves are the model's diffusers scheduler's (schedule.sampler_steps: DDIMScheduler with the model's scheduler
    config for SD 1.x / 2.x / SDXL, e.g. SD 2.1's 981, 961, ..., 1, 0; FlowMatchEulerDiscreteScheduler with its shift
    for SD 3), so the result is the latents of the diffusers pipeline run from the same x_T, prompt, negative prompt,
    guidance and steps (tests/test_fidelity.py). The toy world takes SD 1.x / 2.x's config values.
    """
    steps = model.schedule.sampler_steps(context.config.ddim_steps)
    return model.ddim_sample(x_T, steps, context.text_embeddings, context.config.guidance_scale)


def null_prompt(config) -> list[str]:
    """Return the empty prompt: eps_null's condition (ScoreDistillation.null_embedding)."""
    return [""]


def bridge_prompts(config) -> list[str]:
    """Return the bridge's two prompts: the current image's distribution's and the target's."""
    return [config.prompt + config.bridge_src_modifier, config.prompt + config.bridge_tgt_modifier]


def run_prompts(config) -> list[str]:
    """Return every prompt a run encodes, so that a model can encode them all, then free its text encoders (a 3D
    run's view prompts too)."""
    method = METHODS[config.loss_type]
    prompts = [config.negative_prompt, config.prompt] + ([config.edit_prompt] if method.edits else [])
    if getattr(config, "generator", None) in ("nerf", "mesh") and not config.no_view_prompts:
        from guidance.views import VIEWS, view_prompt

        prompts += [view_prompt(config.prompt, view) for view in VIEWS]
    return prompts + (method.extra_prompts(config) if method.extra_prompts else [])


def bridge_step(method: Method, model, context: StepContext, latents, t: int, step: int) -> torch.Tensor:
    """Return SDS's loss for the first bridge_start of the steps, then the bridge's between the two modified prompts."""
    config = context.config
    if step < round(config.bridge_start * config.step):
        return call_loss(method, model, context, latents, t, loss="get_sds_loss")
    if "bridge" not in context.extra:
        context.extra["bridge"] = torch.cat([context.embeds(prompt) for prompt in bridge_prompts(config)])
    return call_loss(method, model, context, latents, t, text_embeddings=context.extra["bridge"])


def asd_step(method: Method, model, context: StepContext, latents, t: int, step: int) -> torch.Tensor:
    """Return ASD's loss with its shifted timestep t + d drawn over the run's t range."""
    t_plus = model.asd_t_plus(t, context.config.asd_ratio, min_step=context.min_step)
    return call_loss(method, model, context, latents, t, t_plus=t_plus)


METHODS = {m.name: m for m in (
    Method(name="sds", title="Score Distillation Sampling", paper="DreamFusion, Poole et al., ICLR 2023, eq. 3",
           gradient="w(t) (eps_cfg_s(x_t) - eps)", guidance_scale=25.0, steps=500, weighting="uniform",
           unet_rows="2B", loss="get_sds_loss"),
    Method(name="pds", title="Posterior Distillation Sampling", paper="Koo et al., CVPR 2024, eq. 9",
           gradient="z_tgt - z_src, z = (x_{t-1} - mu(x_t, x0_hat)) / std_t, shared noises", guidance_scale=7.5,
           steps=200, weighting="uniform", unet_rows="4", loss="get_pds_loss", conditioning="pair", edits=True,
           options={"pds_variant": "paper"}, negative_prompt=""),
    Method(name="vsd", title="Variational Score Distillation",
           paper="ProlificDreamer, Wang et al., NeurIPS 2023, eq. 9-10",
           gradient="w(t) (eps_cfg_s(x_t) - eps_phi(x_t; y)), eps_phi a LoRA trained on the particles",
           guidance_scale=7.5, steps=500, weighting="uniform", unet_rows="2B + B (LoRA) + LoRA training step",
           loss="get_vsd_loss", lora=True),
    Method(name="nfsd", title="Noise-Free Score Distillation", paper="Katzir et al., ICLR 2024, eq. 6-7",
           gradient="w(t) (s (eps_c - eps_null) + delta_D), delta_D = eps_null (t < 200) or eps_null - eps_neg",
           guidance_scale=7.5, steps=500, weighting="dreamfusion", unet_rows="3B", loss="get_nfsd_loss",
           extra_prompts=null_prompt, negative_prompt=NFSD_NEGATIVE_PROMPT),
    Method(name="csd", title="Classifier Score Distillation", paper="Yu et al., ICLR 2024, eq. 7",
           gradient="w(t) s (eps_c - eps_u)", guidance_scale=7.5, steps=500, weighting="dreamfusion", unet_rows="2B",
           loss="get_csd_loss"),
    Method(name="dds", title="Delta Denoising Score", paper="Hertz et al., ICCV 2023, eq. 5",
           gradient="w(t) (eps_cfg_s(z_t; y_tgt) - eps_cfg_s(zhat_t; y_src)), one eps and one t",
           guidance_scale=7.5, steps=200, weighting="uniform", unet_rows="4", loss="get_dds_loss",
           conditioning="pair", edits=True, t_range=(0.05, 0.95), negative_prompt=""),
    Method(name="bridge", title="SDS-Bridge", paper="McAllister et al., NeurIPS 2024 (2D)",
           gradient="w(t) s (eps(x_t; y + tgt_modifier) - eps(x_t; y + src_modifier)), after bridge_start of SDS",
           guidance_scale=40.0, steps=500, weighting="dreamfusion", unet_rows="2B", loss="get_bridge_loss",
           step=bridge_step, extra_prompts=bridge_prompts, negative_prompt="",
           options={"bridge_start": 0.5, "bridge_src_modifier": BRIDGE_SRC_MODIFIER,
                    "bridge_tgt_modifier": BRIDGE_TGT_MODIFIER}),
    Method(name="asd", title="Asynchronous Score Distillation", paper="Ma et al., ECCV 2024",
           gradient="w(t) (eps_cfg_s(x_t, t) - eps_c(x_{t+d}, t + d)), the same eps", guidance_scale=7.5, steps=500,
           weighting="dreamfusion", unet_rows="3B", loss="get_asd_loss", step=asd_step, options={"asd_ratio": 0.1}),
    Method(name="ism", title="Interval Score Matching", paper="LucidDreamer, Liang et al., CVPR 2024, eq. 17",
           gradient="w(t) (eps_cfg_s(x_t, t) - e_s), x_s by DDIM inversion to s = t - delta_t, x_t one DDIM step on",
           guidance_scale=7.5, steps=500, weighting="sigma_over_alpha", unet_rows="B x n_s (inversion) + B + 2B",
           loss="get_ism_loss", t_schedule="anneal", extra_prompts=null_prompt,
           options={"inversion_steps": 5, "ism_delta_t": 80, "ism_delta_s": 200}),
    Method(name="sdi", title="Score Distillation via Inversion", paper="Lukoianov et al., NeurIPS 2024, eq. 9",
           gradient="w(t) (eps_cfg_s(x_t) - kappa), x_t by DDIM inversion (CFG at -6.5, noise eta 0.3 per step), "
                    "kappa = (x_t - alpha_t x) / sigma_t",
           guidance_scale=7.5, steps=500, weighting="sigma_over_alpha",
           unet_rows="2B x inversion_steps + 2B (B x inversion_steps + 2B under the null prompt)",
           loss="get_sdi_loss", t_schedule="linear", extra_prompts=null_prompt,
           options={"inversion_steps": 10, "sdi_eta": 0.0, "sdi_inversion_guidance": SDI_INVERSION_GUIDANCE,
                    "sdi_inversion_eta": SDI_INVERSION_ETA}),
    # Baselines a comparison needs beside the losses: the model's own samples, and SDS started from the source.
    Method(name="ddim", title="DDIM sampling (the reference)", paper="Song et al., ICLR 2021, eq. 12 with eta = 0",
           gradient="none: x_{t'} = alpha_{t'} x0_hat(x_t) + sigma_{t'} eps_cfg_s(x_t), from x_T ~ N(0, I), on the "
                    "model's diffusers scheduler's timesteps (the pipeline's own sample)",
           guidance_scale=7.5, steps=50, weighting="uniform", unet_rows="2B per sampling step",
           options={"ddim_steps": 50}, sampler=ddim_sample),
    Method(name="sds_edit", title="SDS from the source (editing baseline)",
           paper="the baseline of the PDS and DDS papers",
           gradient="w(t) (eps_cfg_s(x_t; y_edit) - eps), x starting at the source", guidance_scale=7.5, steps=200,
           weighting="uniform", unet_rows="2B", loss="get_sds_loss", conditioning="edit", edits=True,
           negative_prompt=""),
)}
LOSS_TYPES = tuple(METHODS)


# ----------------------------------------------------------------------------------------------- tasks
# A task of a comparison (run_all.py --tasks) is a method, or a method with some of its own options set:
# "pds+pds_variant=official", "sdi+sdi_inversion_guidance=null+sdi_inversion_eta=0". Its runs go to OUT/<task>/.
def parse_task(task: str) -> tuple[Method, dict]:
    """Return (the task's method, {option: value}) for "METHOD" or "METHOD+OPTION=VALUE+...", or raise ValueError
    naming what is wrong (an unknown method, an option the method does not own, a value the option refuses)."""
    name, *settings = task.split("+")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} in task {task!r}: use one of {', '.join(METHODS)}")
    method, options = METHODS[name], {}
    for setting in settings:
        option, equals, text = setting.partition("=")
        if not equals or option not in method.options:
            owned = ", ".join(method.options) or "none"
            raise ValueError(f"task {task!r}: {setting!r} is not OPTION=VALUE with an option of {name} ({owned})")
        try:
            options[option] = OPTION_FLAGS[option].kind(text)
        except (argparse.ArgumentTypeError, ValueError) as err:
            raise ValueError(f"task {task!r}: {option}={text!r}: {err}") from None
    return method, options


def task_method(task: str) -> Method:
    """Return the method of a task ("pds" or "pds+pds_variant=official")."""
    return parse_task(task)[0]


def task_order(task: str) -> tuple:
    """Return a task's place in a comparison: the reference sampler, generation (LoRA methods last), edits; a
    method's variants after it."""
    method = task_method(task)
    return (method.edits, method.name != "ddim", method.lora, list(METHODS).index(method.name), task)


def method_help() -> str:
    """Return a few lines per method for --help: name, title, paper, gradient, defaults."""
    lines = []
    for m in METHODS.values():
        lines.append(f"  {m.name:<9}{m.title} ({m.paper}): grad = {m.gradient}; guidance {m.guidance_scale:g}, "
                     f"{m.steps} steps, w(t) {m.weighting}, t {m.t_schedule} in [{m.t_range[0]:g}, {m.t_range[1]:g}], "
                     f"UNet rows/step {m.unet_rows}.")
    return "\n".join(lines)
