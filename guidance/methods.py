"""The one table of distillation methods: each row holds a method's paper, defaults, flags, cost and how a step
calls its loss. main.py, run_all.py, bench.py, app.py, `--help` and the README read it; adding a method is adding
a row here and a loss in guidance/losses.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

DEFAULT_T_RANGE = (0.02, 0.98)
BRIDGE_SRC_MODIFIER = (", oversaturated, smooth, pixelated, cartoon, foggy, hazy, blurry, bad structure, noisy, "
                       "malformed")
BRIDGE_TGT_MODIFIER = ", detailed high resolution, high quality, sharp"

# Method-specific flags of main.py: dest -> (type, help). Their defaults are per method (Method.options); a flag
# given to a method that does not own it is an error.
OPTION_FLAGS = {
    "bridge_start": (float, "bridge: fraction of the steps run as plain SDS before the bridge starts (default 0.5)"),
    "bridge_src_modifier": (str, "bridge: text appended to the prompt for the current image's distribution"),
    "bridge_tgt_modifier": (str, "bridge: text appended to the prompt for the target distribution"),
    "asd_ratio": (float, "asd: eta, the largest timestep shift d as a fraction of t - min_step (default 0.1)"),
    "inversion_steps": (int, "ism / sdi: DDIM inversion steps (default ism 5, sdi 10)"),
    "ism_delta_t": (int, "ism: interval delta_t between the inverted s and t (default 80)"),
    "ism_delta_s": (int, "ism: timesteps per inversion step delta_s (default 200)"),
    "ddim_steps": (int, "ddim: DDIM sampling steps (default 50)"),
    "sdi_eta": (float, "sdi: fraction of fresh noise blended into the inverted noise kappa (0: the paper's "
                       "deterministic inversion; 1: SDS)"),
}


@dataclass
class StepContext:
    """What a method's step needs besides the latents: the run's settings, embeddings and source (built once per run)."""

    model: object
    args: object
    text_embeddings: torch.Tensor  # cat[uncond (the negative prompt), cond (the prompt)]
    edit_embeddings: torch.Tensor | None = None  # cat[uncond, edit prompt] for editing methods
    src_latents: torch.Tensor | None = None  # the source image's latents for editing methods
    min_step: int = 20
    max_step: int = 980
    extra: dict = field(default_factory=dict)  # per-method embeddings, e.g. the bridge's modified prompts

    def embeds(self, prompt: str) -> torch.Tensor:
        """Return the model's (cached) embedding of one prompt."""
        return self.model.get_text_embeds(prompt)


@dataclass(frozen=True)
class Method:
    """One distillation method: its paper, main.py defaults, what it needs, its cost and its step."""

    name: str
    title: str
    paper: str
    gradient: str  # the gradient w.r.t. the latents, in the notation of guidance/losses.py
    guidance_scale: float
    steps: int
    weighting: str  # the paper's w(t), used when --weighting is not given
    step: Callable  # (model, StepContext, latents, t, step_index, total_steps) -> loss
    unet_rows: str  # UNet batch rows per step (B: latents optimised together)
    edits: bool = False  # needs --edit_prompt and --src_img_path; the result is named after the edit prompt
    t_schedule: str = "random"
    t_range: tuple = DEFAULT_T_RANGE
    options: dict = field(default_factory=dict)  # method-specific flags (OPTION_FLAGS) and their defaults
    lora: bool = False  # trains a LoRA (VSD)
    loss_name: str = ""  # the model method that computes it, e.g. get_sds_loss
    sampler: Callable | None = None  # (model, StepContext, x_T) -> latents: a sampler, not a loss (no optimisation)
    extra_prompts: Callable | None = None  # (args) -> the prompts a run encodes besides negative, prompt and edit


def _common(c: StepContext, t: int) -> dict:
    return dict(guidance_scale=c.args.guidance_scale, t=t, weighting=c.args.weighting)


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Return a DDIM sampler's descending timesteps: steps values from T - 1 down, then 0.

    The sample is x at t = 0, as Stable Diffusion's DDIM (set_alpha_to_one=False) returns it; jumping to x0_hat
    from the last step instead would return a posterior mean, smoother than a sample (measured in the toy world:
    a residual of 0.017 to the nearest template instead of 0.044; the data's std is 0.05).
    """
    return [round((num_train_timesteps - 1) * (1 - k / steps)) for k in range(steps)] + [0]


def _ddim_sample(m, c: StepContext, x_T):
    """The model's own deterministic DDIM sample (eta 0) of the prompt, CFG at the run's guidance scale."""
    steps = ddim_timesteps(m.schedule.num_train_timesteps, c.args.ddim_steps)
    return m.ddim_sample(x_T, steps, c.text_embeddings, c.args.guidance_scale)


def _null_prompt(args) -> list[str]:
    return [""]  # eps_null's condition (ScoreDistillation.null_embedding)


def _bridge_prompts(args) -> list[str]:
    """Return the bridge's two prompts: the current image's distribution's and the target's."""
    return [args.prompt + args.bridge_src_modifier, args.prompt + args.bridge_tgt_modifier]


def run_prompts(args) -> list[str]:
    """Return every prompt a run of args encodes, so that a model can encode them all, then free its text encoders."""
    method = METHODS[args.loss_type]
    prompts = [args.negative_prompt, args.prompt] + ([args.edit_prompt] if method.edits else [])
    return prompts + (method.extra_prompts(args) if method.extra_prompts else [])


def _bridge_step(m, c: StepContext, x, t, i, n):
    """SDS for the first bridge_start of the steps, then the bridge between the two modified prompts."""
    if i < round(c.args.bridge_start * n):
        return m.get_sds_loss(x, c.text_embeddings, **_common(c, t))
    if "bridge" not in c.extra:
        c.extra["bridge"] = torch.cat([c.embeds(prompt) for prompt in _bridge_prompts(c.args)])
    return m.get_bridge_loss(x, c.extra["bridge"], **_common(c, t))


METHODS = {m.name: m for m in (
    Method("sds", "Score Distillation Sampling", "DreamFusion, Poole et al., ICLR 2023, eq. 3",
           "w(t) (eps_cfg_s(x_t) - eps)", 25.0, 500, "uniform",
           lambda m, c, x, t, i, n: m.get_sds_loss(x, c.text_embeddings, **_common(c, t)), "2B",
           loss_name="get_sds_loss"),
    Method("pds", "Posterior Distillation Sampling", "Koo et al., CVPR 2024, eq. 9",
           "z_tgt - z_src, z = (x_{t-1} - mu(x_t, x0_hat)) / std_t, shared noises", 7.5, 200, "uniform",
           lambda m, c, x, t, i, n: m.get_pds_loss(c.src_latents, x, c.text_embeddings, c.edit_embeddings,
                                                   **_common(c, t)), "4", edits=True, loss_name="get_pds_loss"),
    Method("vsd", "Variational Score Distillation", "ProlificDreamer, Wang et al., NeurIPS 2023, eq. 9-10",
           "w(t) (eps_cfg_s(x_t) - eps_phi(x_t; y)), eps_phi a LoRA trained on the particles", 7.5, 500, "uniform",
           lambda m, c, x, t, i, n: m.get_vsd_loss(x, c.text_embeddings, **_common(c, t)),
           "2B + B (LoRA) + LoRA training step", lora=True, loss_name="get_vsd_loss"),
    Method("nfsd", "Noise-Free Score Distillation", "Katzir et al., ICLR 2024, eq. 6-7",
           "w(t) (s (eps_c - eps_null) + delta_D), delta_D = eps_null (t < 200) or eps_null - eps_neg", 7.5, 500,
           "dreamfusion", lambda m, c, x, t, i, n: m.get_nfsd_loss(x, c.text_embeddings, **_common(c, t)), "3B",
           loss_name="get_nfsd_loss", extra_prompts=_null_prompt),
    Method("csd", "Classifier Score Distillation", "Yu et al., ICLR 2024, eq. 7",
           "w(t) s (eps_c - eps_u)", 7.5, 500, "dreamfusion",
           lambda m, c, x, t, i, n: m.get_csd_loss(x, c.text_embeddings, **_common(c, t)), "2B",
           loss_name="get_csd_loss"),
    Method("dds", "Delta Denoising Score", "Hertz et al., ICCV 2023, eq. 5",
           "w(t) (eps_cfg_s(z_t; y_tgt) - eps_cfg_s(zhat_t; y_src)), one eps and one t", 7.5, 200, "uniform",
           lambda m, c, x, t, i, n: m.get_dds_loss(c.src_latents, x, c.text_embeddings, c.edit_embeddings,
                                                   **_common(c, t)), "4", edits=True, t_range=(0.05, 0.95),
           loss_name="get_dds_loss"),
    Method("bridge", "SDS-Bridge", "McAllister et al., NeurIPS 2024 (2D)",
           "w(t) s (eps(x_t; y + tgt_modifier) - eps(x_t; y + src_modifier)), after bridge_start of SDS", 40.0, 500,
           "dreamfusion", _bridge_step, "2B",
           options={"bridge_start": 0.5, "bridge_src_modifier": BRIDGE_SRC_MODIFIER,
                    "bridge_tgt_modifier": BRIDGE_TGT_MODIFIER}, loss_name="get_bridge_loss",
           extra_prompts=_bridge_prompts),
    Method("asd", "Asynchronous Score Distillation", "Ma et al., ECCV 2024",
           "w(t) (eps_cfg_s(x_t, t) - eps_c(x_{t+d}, t + d)), the same eps", 7.5, 500, "dreamfusion",
           lambda m, c, x, t, i, n: m.get_asd_loss(x, c.text_embeddings, asd_ratio=c.args.asd_ratio,
                                                   t_plus=m.asd_t_plus(t, c.args.asd_ratio, min_step=c.min_step),
                                                   **_common(c, t)), "3B", options={"asd_ratio": 0.1},
           loss_name="get_asd_loss"),
    Method("ism", "Interval Score Matching", "LucidDreamer, Liang et al., CVPR 2024, eq. 17",
           "w(t) (eps_cfg_s(x_t, t) - e_s), x_s by DDIM inversion to s = t - delta_t, x_t one DDIM step on",
           7.5, 500, "sigma_over_alpha",
           lambda m, c, x, t, i, n: m.get_ism_loss(x, c.text_embeddings, delta_t=c.args.ism_delta_t,
                                                   delta_s=c.args.ism_delta_s,
                                                   inversion_steps=c.args.inversion_steps, **_common(c, t)),
           "B x n_s (inversion) + B + 2B", t_schedule="anneal",
           options={"inversion_steps": 5, "ism_delta_t": 80, "ism_delta_s": 200}, loss_name="get_ism_loss",
           extra_prompts=_null_prompt),
    Method("sdi", "Score Distillation via Inversion", "Lukoianov et al., NeurIPS 2024, eq. 9",
           "w(t) (eps_cfg_s(x_t) - kappa), x_t by DDIM inversion, kappa = (x_t - alpha_t x) / sigma_t", 7.5, 500,
           "sigma_over_alpha",
           lambda m, c, x, t, i, n: m.get_sdi_loss(x, c.text_embeddings, inversion_steps=c.args.inversion_steps,
                                                   eta=c.args.sdi_eta, **_common(c, t)),
           "B x inversion_steps + 2B", t_schedule="linear", options={"inversion_steps": 10, "sdi_eta": 0.0},
           loss_name="get_sdi_loss", extra_prompts=_null_prompt),
)}
# Baselines a comparison needs beside the losses: the model's own samples, and SDS started from the source.
METHODS.update({m.name: m for m in (
    Method("ddim", "DDIM sampling (the reference)", "Song et al., ICLR 2021, eq. 12 with eta = 0",
           "none: x_{t'} = alpha_{t'} x0_hat(x_t) + sigma_{t'} eps_cfg_s(x_t), from x_T ~ N(0, I)", 7.5, 50,
           "uniform", None, "2B per sampling step", options={"ddim_steps": 50}, sampler=_ddim_sample),
    Method("sds_edit", "SDS from the source (editing baseline)", "the baseline of the PDS and DDS papers",
           "w(t) (eps_cfg_s(x_t; y_edit) - eps), x starting at the source", 7.5, 200, "uniform",
           lambda m, c, x, t, i, n: m.get_sds_loss(x, c.edit_embeddings, **_common(c, t)), "2B", edits=True,
           loss_name="get_sds_loss"),
)})
LOSS_TYPES = tuple(METHODS)
GENERATION_METHODS = tuple(name for name, m in METHODS.items() if not m.edits)
EDITING_METHODS = tuple(name for name, m in METHODS.items() if m.edits)


def method_help() -> str:
    """Return a few lines per method for --help: name, title, paper, gradient, defaults."""
    lines = []
    for m in METHODS.values():
        lines.append(f"  {m.name:7s}{m.title} ({m.paper}): grad = {m.gradient}; guidance {m.guidance_scale:g}, "
                     f"{m.steps} steps, w(t) {m.weighting}, t {m.t_schedule} in [{m.t_range[0]:g}, {m.t_range[1]:g}], "
                     f"UNet rows/step {m.unet_rows}")
    return "\n".join(lines)
