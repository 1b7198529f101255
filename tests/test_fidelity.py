"""Fidelity to the authors' code: each behaviour that follows an authors' implementation (or a diffusers pipeline)
checked against an independent computation written here from that code, never through guidance/.

Models: tiny random-weight SD 2.x (epsilon: conftest's folder; v-prediction), SDXL and SD 3 folders
(guidance/random_sd.py, the pipelines' own save_pretrained), compared in float64 with the diffusers pipeline loaded
from the same folder, whose encode_prompt, denoiser and schedulers are the reference (tests/test_families.py's
helpers). Each test's docstring names the plausible bug that makes it fail.
"""
import math

import pytest
import torch

from guidance.random_sd import build_random_sd
from guidance.sd import StableDiffusion
from test_families import NEGATIVE, PROMPT, SIZES, embeddings, path, pipeline_condition, randn

ALL = ("sd2", "sd2v", "sdxl", "sd3")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_sd_dir) -> dict:
    """Return {family: folder}: SD 2.x epsilon (conftest's tiny folder), v-prediction, SDXL and SD 3."""
    root = tmp_path_factory.mktemp("fidelity")
    built = {family: build_random_sd(root / family, SIZES[family], seed=1) for family in ("sd2v", "sdxl", "sd3")}
    return {"sd2": tiny_sd_dir, **built}


@pytest.fixture(scope="module")
def loaded(folders):
    """Return get(family) -> (our float64 model, the diffusers pipeline in float64), each loaded once."""
    from diffusers import DiffusionPipeline

    cache = {}

    def get(family):
        if family not in cache:
            ours = StableDiffusion(str(folders[family]), device="cpu", precision=torch.float64)
            pipe = DiffusionPipeline.from_pretrained(str(folders[family]), local_files_only=True).to(torch.float64)
            cache[family] = ours, pipe
        return cache[family]

    return get


def denoiser_output(pipe, x_t: torch.Tensor, timestep, prompts: list[str], height_width=None) -> torch.Tensor:
    """Return the pipeline's denoiser output (its native kind: eps, v or velocity) per row, from one call with its
    family's conditioning as the pipeline's __call__ builds it (SDXL: time ids of height_width, default the
    pipeline's size; SD 3: the timestep as a float, 1000 sigma)."""
    conditions = [pipeline_condition(pipe, p) for p in prompts]
    prompt_embeds = torch.cat([c[0] for c in conditions])
    batch = x_t.shape[0]
    timesteps = torch.as_tensor(timestep).reshape(-1).expand(batch)
    name = pipe.__class__.__name__
    with torch.no_grad():
        if name == "StableDiffusion3Pipeline":
            return pipe.transformer(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=prompt_embeds,
                                    pooled_projections=torch.cat([c[1] for c in conditions]), return_dict=False)[0]
        if name == "StableDiffusionXLPipeline":
            size = height_width or (pipe.default_sample_size * pipe.vae_scale_factor,) * 2
            time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=x_t.dtype,
                                              text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
            added = {"text_embeds": torch.cat([c[1] for c in conditions]), "time_ids": time_ids.repeat(batch, 1)}
            return pipe.unet(x_t, timesteps, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added,
                             return_dict=False)[0]
        return pipe.unet(x_t, timesteps, encoder_hidden_states=prompt_embeds, return_dict=False)[0]


# ----------------------------------------------------------------------------------------- VSD's LoRA target
@pytest.mark.parametrize("family", ALL)
def test_vsd_lora_trains_on_the_models_own_target(folders, loaded, family):
    """lora_loss is the MSE of the denoiser's native output to what the model was trained on (diffusers' own
    get_velocity's v = alpha noise - sigma x0; noise - x0 for SD 3's flow), and the LoRA's training step minimises exactly
    it. Fails if the LoRA trains on eps (at t = 900 that is alpha_t^2 = 0.02 times the v-loss on SD 2.x v), if the
    target's sign or coefficients are off, or if the step minimises something else than lora_loss."""
    _, pipe = loaded(family)
    model = StableDiffusion(str(folders[family]), device="cpu", precision=torch.float64, lora_lr=1e-2)
    model.enable_lora()  # fresh: lora_B = 0, so the LoRA's output is the pipeline's denoiser's
    t = 900
    x0, noise = randn(model, 11), randn(model, 12)
    cond = model.get_text_embeds(PROMPT)
    alpha, sigma = path(pipe, t)
    x_t = alpha * x0 + sigma * noise
    # the targets as the models were trained: eps; v = alpha noise - sigma x0 (diffusers' get_velocity, with the
    # float64 path); SD 3's velocity noise - x0 (diffusers' SD 3 training script)
    target = {"sd2": noise, "sdxl": noise, "sd2v": alpha * noise - sigma * x0, "sd3": noise - x0}[family]
    out = denoiser_output(pipe, x_t, float(t) if family == "sd3" else t, [PROMPT])
    expected = ((out - target) ** 2).mean()
    assert expected > 0.05
    assert torch.allclose(model.lora_loss(x0, t, noise, cond), expected, rtol=1e-9)
    model.lora_training_step(x0, t, cond, noise)
    assert torch.allclose(model.last_lora_loss, expected, rtol=1e-9)  # the step's loss is lora_loss
    assert model.lora_loss(x0, t, noise, cond) < expected  # and one step lowered it


# ----------------------------------------------------------------------------------------- ddim: the pipeline's sample
def pipeline_sample(pipe, x_T: torch.Tensor, steps: int, negative_prompt, guidance: float = 7.5,
                    float64_schedule: bool = False) -> torch.Tensor:
    """Return the diffusers pipeline's latents from x_T (output_type="latent"): for SD 1.x / 2.x and SDXL with a
    DDIMScheduler made from the model's scheduler config, for SD 3 with its own flow-matching scheduler (shift).
    float64_schedule: the DDIMScheduler's alphas_cumprod (float32 in diffusers) recomputed in float64 from its
    config, so that only the arithmetic of the sampler itself is compared."""
    from diffusers import DDIMScheduler

    from reference import ReferenceSchedule

    scheduler = pipe.scheduler
    if pipe.__class__.__name__ != "StableDiffusion3Pipeline":
        pipe.scheduler = DDIMScheduler.from_config(scheduler.config)
        if float64_schedule:
            exact = ReferenceSchedule(pipe.scheduler.config).alphas_cumprod
            pipe.scheduler.alphas_cumprod = exact
            pipe.scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) \
                if pipe.scheduler.config.set_alpha_to_one else exact[0]
    try:
        height, width = (side * pipe.vae_scale_factor for side in x_T.shape[-2:])
        with torch.no_grad():
            return pipe(prompt=PROMPT, negative_prompt=negative_prompt, guidance_scale=guidance,
                        num_inference_steps=steps, latents=x_T.clone(), height=height, width=width,
                        output_type="latent").images
    finally:
        pipe.scheduler = scheduler


def our_ddim(model, x_T: torch.Tensor, steps: int, uncond: torch.Tensor, guidance: float = 7.5) -> torch.Tensor:
    """Return what `--loss_type ddim` computes (methods.ddim_sample) from x_T."""
    from types import SimpleNamespace

    from guidance.methods import StepContext, ddim_sample

    config = SimpleNamespace(ddim_steps=steps, guidance_scale=guidance)
    context = StepContext(model, config, torch.cat([uncond, model.get_text_embeds(PROMPT)]))
    return ddim_sample(model, context, x_T)


@pytest.mark.parametrize("family", ALL)
def test_ddim_is_the_pipelines_own_sample(loaded, family):
    """--loss_type ddim from x_T gives the diffusers pipeline's latents from the same x_T, prompt, negative prompt,
    guidance and steps (to diffusers' float32 scheduler coefficients; to float64 rounding with them in float64).
    Fails with our old equal
    grid (999, 899, ...: SD's leading spacing with steps_offset 1 is 901, 801, ..., 1), without SD 3's shift (3.0),
    with the last move ending at clean data where the config says alpha-bar_0 (or the reverse: the tiny SDXL's
    Euler config leaves DDIM's set_alpha_to_one and clip_sample at their defaults, True), or on SDXL with time ids
    of another size."""
    model, pipe = loaded(family)
    steps = 10
    x_T = randn(model, 20)
    expected = pipeline_sample(pipe, x_T, steps, NEGATIVE)
    got = our_ddim(model, x_T, steps, model.get_text_embeds(NEGATIVE))
    assert (expected - x_T).abs().mean() > 0.1  # the sampler moved
    # diffusers' schedulers hold alphas_cumprod (SD 3: sigmas) in float32: measured up to 7e-6 (SDXL)
    assert (got - expected).abs().max().item() <= 2e-5 * max(expected.abs().max().item(), 1.0)
    if family != "sd3":  # with diffusers' DDIM coefficients in float64, the same to float64 rounding
        exact = pipeline_sample(pipe, x_T, steps, NEGATIVE, float64_schedule=True)
        assert (got - exact).abs().max().item() <= 1e-10 * max(exact.abs().max().item(), 1.0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset, set_alpha_to_one", [(0, True), (1, False)])
def test_sampler_steps_are_ddimschedulers_moves(spacing, offset, set_alpha_to_one):
    """Each (t, t_next) of sampler_steps is a DDIMScheduler.step: its set_timesteps grid, and the move it makes
    from t (to t - T // n, for trailing and linspace spacing not always the next grid point; below 0 to alpha-bar_0
    or to clean data), checked by running the scheduler's step on a made-up eps (its alphas_cumprod in float64).
    Fails if our grid or the move's end differ from diffusers' for any spacing, offset or final-alpha setting."""
    from diffusers import DDIMScheduler

    from guidance.schedule import DDIMConfig, NoiseSchedule
    from reference import ReferenceSchedule

    scheduler = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=set_alpha_to_one,
                              clip_sample=False, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    exact = ReferenceSchedule(scheduler.config).alphas_cumprod
    scheduler.alphas_cumprod = exact
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if set_alpha_to_one else exact[0]
    schedule = NoiseSchedule.from_scheduler(scheduler)
    assert schedule.ddim == DDIMConfig(spacing, offset, set_alpha_to_one, False)
    gen = torch.Generator().manual_seed(0)
    x, eps = (torch.randn(1, 4, 2, 2, generator=gen, dtype=torch.float64) for _ in range(2))
    for n in (7, 16, 50):
        scheduler.set_timesteps(n)
        steps = schedule.sampler_steps(n)
        assert [t for t, _ in steps] == scheduler.timesteps.tolist()
        for t, t_next in steps:
            expected = scheduler.step(eps, t, x).prev_sample
            assert torch.allclose(schedule.ddim_step(x, eps, t, t_next), expected, rtol=1e-12, atol=1e-12), (n, t)
