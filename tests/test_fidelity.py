"""Fidelity to the authors' code: each behaviour that follows an authors' implementation (or a diffusers pipeline)
checked against an independent computation written here from that code, never through guidance/.

Models: tiny random-weight SD 2.x (epsilon: conftest's folder; v-prediction), SDXL and SD 3 folders
(benchmarks/random_sd.py, the pipelines' own save_pretrained), compared in float64 with the diffusers pipeline loaded
from the same folder, whose encode_prompt, denoiser and schedulers are the reference (tests/test_families.py's
helpers). Each test's docstring names the plausible bug that makes it fail.
"""
import math

import pytest
import torch

from benchmarks.random_sd import build_random_sd
from guidance.sd import StableDiffusion
from test_families import EDIT, NEGATIVE, PROMPT, SIZES, path, pipeline_condition, randn
from test_families import embeddings as cfg_rows  # cat[get_text_embeds(negative), get_text_embeds(prompt)]

ALL = ("sd2", "sd2v", "sdxl", "sd3")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_sd_dir) -> dict:
    """Return {family: folder}: SD 2.x epsilon (conftest's tiny folder), v-prediction, SDXL and SD 3."""
    root = tmp_path_factory.mktemp("fidelity")
    built = {family: build_random_sd(root / family, SIZES[family], seed=1) for family in ("sd2v", "sdxl", "sd3")}
    return {"sd2": tiny_sd_dir, **built}


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
    get_velocity's v = alpha noise - sigma x0; noise - x0 for SD 3's flow), and the LoRA's training step minimises
    exactly it. Fails if the LoRA trains on eps (at t = 900 that is alpha_t^2 = 0.02 times the v-loss on SD 2.x v),
    if the target's sign or coefficients are off, or if the step minimises something else than lora_loss."""
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
    # diffusers' schedulers hold alphas_cumprod (SD 3: sigmas) in float32: measured up to 4e-5 (SDXL)
    assert (got - expected).abs().max().item() <= 1e-4 * max(expected.abs().max().item(), 1.0)
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


# ----------------------------------------------------------------------------------------- PDS: paper and official
def test_paper_pds_is_dds_reweighted_by_t(sd64, embeddings):
    """With shared noises and the exact posterior at t - 1, the x_tgt - x_src terms cancel (c_x0 + c_xt alpha_t =
    alpha_{t-1}): PDS's gradient is w(t) times DDS's with w = c_x0 sigma_t / (alpha_t std), whatever noise_{t-1} is.
    Fails if the posterior's coefficients do not keep the marginal (a term in x_tgt - x_src survives) or if PDS's
    two sides did not share their noises."""
    from reference import ReferenceSchedule

    ref = ReferenceSchedule(_scheduler_config(sd64))
    gen = torch.Generator().manual_seed(3)
    src = torch.randn(sd64.latent_shape(), generator=gen, dtype=torch.float64)
    tgt = src + 0.5 * torch.randn(sd64.latent_shape(), generator=gen, dtype=torch.float64)
    noise_t = torch.randn(sd64.latent_shape(), generator=gen, dtype=torch.float64)
    for t in (30, 400, 950):
        abar_t, abar_s = ref.alphas_cumprod[t].item(), ref.alphas_cumprod[t - 1].item()
        beta_t = 1 - abar_t / abar_s  # DDPM's posterior of x_{t-1}: c_x0 = sqrt(abar_s) beta_t / (1 - abar_t), ...
        c_x0 = math.sqrt(abar_s) * beta_t / (1 - abar_t)
        std = math.sqrt(beta_t * (1 - abar_s) / (1 - abar_t))
        w = c_x0 * math.sqrt(1 - abar_t) / (math.sqrt(abar_t) * std)
        x = tgt.clone().requires_grad_(True)
        sd64.get_dds_loss(src, x, embeddings[0], embeddings[1], t=t, noise=noise_t).backward()
        dds = x.grad
        for seed in (4, 5):  # two different noise_{t-1}: the same gradient
            noise_s = torch.randn(sd64.latent_shape(), generator=torch.Generator().manual_seed(seed),
                                  dtype=torch.float64)
            x = tgt.clone().requires_grad_(True)
            sd64.get_pds_loss(src, x, embeddings[0], embeddings[1], t=t, noise=(noise_t, noise_s)).backward()
            assert torch.allclose(x.grad, w * dds, rtol=1e-8, atol=1e-10), (t, seed)
        assert (w * dds).abs().mean() > 1e-3


def _scheduler_config(model):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_pretrained(model.source.path, subfolder="scheduler").config


def official_pds_reference(pipe, src, tgt, noise_t, noise_s, index: int, scale: float, prompts: tuple):
    """Return (t, the official PDS gradient z_tgt - z_src) written from KAIST-Visual-AI-Group/PDS's pds.py: t and
    t_prev from DDIMScheduler.from_config(...).set_timesteps(500) reversed at index and index - 1; beta_t = betas[t],
    alpha_t = alphas[t] (one step), alpha-bar at t and t_prev (float64 from the config); SD 3, which has no betas:
    the same with sqrt(alphas[t]) = alpha_t / alpha_{t-1}, beta_t = sigma_t^2 - (alpha_t / alpha_{t-1})^2
    sigma_{t-1}^2 and 1 - alpha-bar = sigma^2, on SD's grid (leading, steps_offset 1)."""
    from diffusers import DDIMScheduler

    from reference import ReferenceSchedule
    from test_families import reference_cfg

    is_sd3 = pipe.__class__.__name__ == "StableDiffusion3Pipeline"
    grid = DDIMScheduler(steps_offset=1) if is_sd3 else DDIMScheduler.from_config(pipe.scheduler.config)
    grid.set_timesteps(500)
    ascending = list(reversed(grid.timesteps.tolist()))
    t, t_prev = ascending[index], ascending[index - 1]
    if is_sd3:
        (alpha_t, sigma_t), (alpha_p, sigma_p) = path(pipe, t), path(pipe, t_prev)
        alpha_1, sigma_1 = path(pipe, t - 1)
        sqrt_alpha_step = alpha_t / alpha_1
        beta_t = sigma_t**2 - sqrt_alpha_step**2 * sigma_1**2
        one_minus_abar_t, one_minus_abar_p, sqrt_abar_p = sigma_t**2, sigma_p**2, alpha_p
    else:
        ref = ReferenceSchedule(pipe.scheduler.config)
        beta_t, sqrt_alpha_step = ref.betas[t].item(), math.sqrt(ref.alphas[t].item())
        abar_t, abar_p = ref.alphas_cumprod[t].item(), ref.alphas_cumprod[t_prev].item()
        alpha_t, sigma_t = math.sqrt(abar_t), math.sqrt(1 - abar_t)
        one_minus_abar_t, one_minus_abar_p, sqrt_abar_p = 1 - abar_t, 1 - abar_p, math.sqrt(abar_p)
        alpha_p, sigma_p = math.sqrt(abar_p), math.sqrt(1 - abar_p)
    std = math.sqrt(one_minus_abar_p / one_minus_abar_t * beta_t)
    c0 = sqrt_abar_p * beta_t / one_minus_abar_t
    c1 = sqrt_alpha_step * one_minus_abar_p / one_minus_abar_t
    x0 = torch.cat([src, tgt])
    x_t = alpha_t * x0 + sigma_t * torch.cat([noise_t, noise_t])
    negative, src_prompt, tgt_prompt = prompts
    eps = reference_cfg(pipe, x_t, t, [negative, negative], [src_prompt, tgt_prompt], scale)  # rows: src, tgt
    pred_x0 = (x_t - sigma_t * eps) / alpha_t
    x_prev = alpha_p * x0 + sigma_p * torch.cat([noise_s, noise_s])
    z_src, z_tgt = ((x_prev - (c0 * pred_x0 + c1 * x_t)) / std).chunk(2)
    return t, t_prev, z_tgt - z_src


@pytest.mark.parametrize("family", ALL)
def test_official_pds_is_the_authors_pds_py(loaded, family):
    """variant='official' is pds.py's gradient: t on its 500-step grid (a t off the grid moves to the point below),
    t_prev the grid point before, the one-step posterior coefficients. Fails if t_prev were t - 1, the grid another
    (steps_offset ignored: 2k instead of 2k + 1), the coefficients the exact posterior's, or the mismatch term's sign
    flipped. (pds.py reads the UNet's output as eps; on v and flow models ours converts it to eps first.)"""
    model, pipe = loaded(family)
    src = randn(model, 30)
    tgt = src + 0.5 * randn(model, 31)
    noise_t, noise_s = randn(model, 32), randn(model, 33)
    for index in (12, 250, 480):
        t, t_prev, expected = official_pds_reference(pipe, src, tgt, noise_t, noise_s, index, 7.5,
                                                     (NEGATIVE, PROMPT, EDIT))
        assert t_prev == t - 2
        for pinned in (t, t + 1):  # on the grid, and just above it
            x = tgt.clone().requires_grad_(True)
            model.get_pds_loss(src, x, cfg_rows(model, NEGATIVE, PROMPT), cfg_rows(model, NEGATIVE, EDIT),
                               guidance_scale=7.5, t=pinned, noise=(noise_t, noise_s), variant="official").backward()
            assert model.last_guidance["t"] == t
            assert expected.abs().mean() > 1e-3  # far above the tolerance
            assert torch.allclose(x.grad, expected, rtol=1e-7, atol=1e-9), (index, pinned)


def test_official_pds_is_dds_plus_a_pull_toward_the_source(sd64, embeddings):
    """The official form's gradient is w'(t) DDS + k(t) (x_tgt - x_src) with k = (alpha_s - c0 - c1 alpha_t) / std > 0
    (pds.py's coefficients, s = t - 2): gradient descent moves the edit back toward the source, most at small t
    (k = 1.61 at t = 21, 0.032 at t = 501, 0.0042 at t = 979 on SD's path). Fails if the term's sign or size were
    other than the coefficients imply."""
    from reference import ReferenceSchedule

    ref = ReferenceSchedule(_scheduler_config(sd64))
    gen = torch.Generator().manual_seed(6)
    src = torch.randn(sd64.latent_shape(), generator=gen, dtype=torch.float64)
    tgt = src + 0.5 * torch.randn(sd64.latent_shape(), generator=gen, dtype=torch.float64)
    noise_t, noise_s = (torch.randn(sd64.latent_shape(), generator=gen, dtype=torch.float64) for _ in range(2))
    for t, k_expected in ((21, 1.61), (501, 0.032), (979, 0.0042)):
        s = t - 2
        beta_t, abar_t, abar_s = ref.betas[t].item(), ref.alphas_cumprod[t].item(), ref.alphas_cumprod[s].item()
        c0 = math.sqrt(abar_s) * beta_t / (1 - abar_t)
        c1 = math.sqrt(1 - beta_t) * (1 - abar_s) / (1 - abar_t)
        std = math.sqrt((1 - abar_s) / (1 - abar_t) * beta_t)
        k = (math.sqrt(abar_s) - c0 - c1 * math.sqrt(abar_t)) / std
        w = c0 * math.sqrt(1 - abar_t) / (math.sqrt(abar_t) * std)
        assert k == pytest.approx(k_expected, rel=0.01)
        x = tgt.clone().requires_grad_(True)
        sd64.get_dds_loss(src, x, embeddings[0], embeddings[1], t=t, noise=noise_t).backward()
        dds = x.grad
        x = tgt.clone().requires_grad_(True)
        sd64.get_pds_loss(src, x, embeddings[0], embeddings[1], t=t, noise=(noise_t, noise_s),
                          variant="official").backward()
        assert torch.allclose(x.grad, w * dds + k * (tgt - src), rtol=1e-8, atol=1e-10), t


# ----------------------------------------------------------------------------------------- SDXL: empty prompt, size
@pytest.mark.parametrize("force_zeros", [True, False])
def test_sdxl_null_prompt_and_time_ids_follow_the_pipeline(folders, loaded, tmp_path, force_zeros):
    """null_embedding() is the unconditional the SDXL pipeline uses without a negative prompt: zeros (hidden states
    and pooled) under model_index.json's force_zeros_for_empty_prompt, the encoded "" without it; and the time ids
    follow the latents' size (a non-square 16 x 24 image). Checked as whole samples: ddim from x_T equals
    pipeline(negative_prompt=None, height=16, width=24). Fails with "" encoded where the config forces zeros (or
    zeros where it does not), or with time ids of the native square size."""
    import json
    import shutil

    from diffusers import DiffusionPipeline

    if force_zeros:
        model, pipe = loaded("sdxl")
    else:
        folder = shutil.copytree(folders["sdxl"], tmp_path / "sdxl")
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
        model = StableDiffusion(str(folder), device="cpu", precision=torch.float64)
        pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True).to(torch.float64)
    null = model.null_embedding()
    assert (not null.any()) == force_zeros
    if not force_zeros:
        assert torch.equal(null, model.get_text_embeds(""))
    x_T = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(40), dtype=torch.float64)
    expected = pipeline_sample(pipe, x_T, 10, None)
    got = our_ddim(model, x_T, 10, null)
    assert (got - expected).abs().max().item() <= 1e-4 * max(expected.abs().max().item(), 1.0)
    exact = pipeline_sample(pipe, x_T, 10, None, float64_schedule=True)
    assert (got - exact).abs().max().item() <= 1e-10 * max(exact.abs().max().item(), 1.0)


# ----------------------------------------------------------------------------------------- SDI: the authors' inversion
def sdi_reference(pipe, x, t: int, n: int, noises, scale: float, inversion_scale_threestudio: float, eta: float):
    """Return SDI's gradient x - x0_hat(x_t) with x_t from the inversion of threestudio's
    stable_diffusion_sdi_guidance.py, written from its code in its own CFG convention, eps = eps_c + s (eps_c - eps_u):
    each step a DDIM step (x0 from eps, then alpha_next x0 + sigma_next eps) plus
    inversion_eta * z * sqrt(DDIMScheduler._get_variance(t_next, t_k))
    = (1 - abar_k) / (1 - abar_next) (1 - abar_next / abar_k) (SD 3: the same Gaussian posterior's variance,
    sigma_k^2 / sigma_next^2 (sigma_next^2 - (alpha_next / alpha_k)^2 sigma_k^2)); on our equal grid round(k t / n)."""
    from test_families import reference_cfg, reference_eps

    steps = [round(k * t / n) for k in range(n + 1)]
    latents = x
    for k, (t_k, t_next) in enumerate(zip(steps[:-1], steps[1:])):
        eps_u, eps_c = reference_eps(pipe, torch.cat([latents, latents]), t_k, [NEGATIVE, PROMPT]).chunk(2)
        eps = eps_c + inversion_scale_threestudio * (eps_c - eps_u)
        (a_k, s_k), (a_n, s_n) = path(pipe, t_k), path(pipe, t_next)
        latents = a_n * (latents - s_k * eps) / a_k + s_n * eps
        if pipe.__class__.__name__ == "StableDiffusion3Pipeline":
            variance = s_k**2 / s_n**2 * (s_n**2 - (a_n / a_k) ** 2 * s_k**2)
        else:
            abar_k, abar_n = a_k**2, a_n**2
            variance = (1 - abar_k) / (1 - abar_n) * (1 - abar_n / abar_k)
        latents = latents + eta * noises[k] * math.sqrt(variance)
    alpha, sigma = path(pipe, t)
    kappa = (latents - alpha * x) / sigma
    eps_hat = reference_cfg(pipe, latents, t, [NEGATIVE], [PROMPT], scale)
    return sigma / alpha * (eps_hat - kappa)


@pytest.mark.parametrize("family", ALL)
def test_sdi_inverts_as_the_authors_code(loaded, family):
    """The default SDI inversion is threestudio's: CFG on the run's rows at -6.5 (their -7.5 in eps_c + s (eps_c -
    eps_u)) and 0.3 times the step's posterior std of noise after each step; with inversion_eta 0 and a pinned t it
    is deterministic. Fails if the guidance were -7.5 in our convention (the convention shift), the noise's scale
    another step's variance, the noise added before the step, or the CFG rows swapped."""
    model, pipe = loaded(family)
    t, n = 300, 4
    x = randn(model, 50)
    noises = [randn(model, 51 + k) for k in range(n)]
    rows = cfg_rows(model, NEGATIVE, PROMPT)
    for eta in (0.3, 0.0):
        expected = sdi_reference(pipe, x, t, n, noises, 7.5, -7.5, eta)
        grads = []
        for _ in range(2):
            v = x.clone().requires_grad_(True)
            kwargs = {} if eta else {"inversion_eta": 0.0}  # the defaults are the authors' -6.5 and 0.3
            model.get_sdi_loss(v, rows, guidance_scale=7.5, t=t, inversion_steps=n, inversion_noise=noises,
                               **kwargs).backward()
            grads.append(v.grad)
        assert expected.abs().mean() > 1e-2
        assert torch.allclose(grads[0], expected, rtol=1e-7, atol=1e-9), eta
        assert torch.equal(grads[0], grads[1])


def test_sdi_null_prompt_inversion_is_the_old_default_and_eta_draws_fresh_noise(sd64, embeddings):
    """inversion_guidance None and "null" give the same gradient (the deterministic null-prompt inversion: what SDI
    computed before, checked against the equations in tests/test_zoo.py); inversion_eta > 0 without pinned noises
    draws fresh noise each call (two calls differ), at 0 it does not (two calls agree). Fails if "null" were read as
    a guidance, or the inversion noise were drawn once and reused."""
    x = torch.randn(sd64.latent_shape(), generator=torch.Generator().manual_seed(60), dtype=torch.float64)

    def grad(**kwargs):
        v = x.clone().requires_grad_(True)
        sd64.get_sdi_loss(v, embeddings[0], t=300, inversion_steps=4, **kwargs).backward()
        return v.grad

    null = grad(inversion_guidance=None, inversion_eta=0.0)
    assert torch.equal(null, grad(inversion_guidance="null", inversion_eta=0.0))
    assert not torch.allclose(null, grad(inversion_eta=0.0), atol=1e-6)  # the CFG inversion is another
    assert torch.equal(grad(inversion_eta=0.0), grad(inversion_eta=0.0))
    assert not torch.allclose(grad(), grad(), atol=1e-6)


# ----------------------------------------------------------------------------------------- negative prompts, NFSD
@pytest.mark.parametrize("family, t, small", [("sd2", 199, True), ("sd2", 200, False), ("sd3", 363, True),
                                              ("sd3", 364, False)])
def test_nfsd_small_t_branch_is_a_noise_level(loaded, family, t, small):
    """NFSD's delta_D drops the negative prompt below t = 200 on SD's DDPM path (the authors' code: `t < 200`); on
    SD 3's rectified flow the same noise level, sigma_t / alpha_t < that of SD's t = 200 (0.572), is t <= 363. The
    gradient is w(t) (s (eps_c - eps_null) + delta_D) with the method's negative prompt (the authors' string), from
    the pipeline's denoiser. Fails with the timestep index compared on SD 3 (t < 200 there is far less noise) or
    the branch's boundary off by one."""
    from guidance.methods import METHODS

    model, pipe = loaded(family)
    negative = METHODS["nfsd"].negative_prompt
    x, noise = randn(model, 70), randn(model, 71)
    v = x.clone().requires_grad_(True)
    model.get_nfsd_loss(v, cfg_rows(model, negative, PROMPT), guidance_scale=7.5, t=t, noise=noise).backward()
    from test_families import reference_eps

    alpha, sigma = path(pipe, t)
    x_t = alpha * x + sigma * noise
    eps_null, eps_neg, eps_cond = reference_eps(pipe, torch.cat([x_t] * 3), t, ["", negative, PROMPT]).chunk(3)
    sd_ratio = math.sqrt(1 - _sd_alphas_cumprod()[200]) / math.sqrt(_sd_alphas_cumprod()[200])
    assert (sigma / alpha < sd_ratio) == small
    delta_d = eps_null if small else eps_null - eps_neg
    expected = sigma**2 * (7.5 * (eps_cond - eps_null) + delta_d)
    assert (eps_neg - eps_null).abs().mean() > 1e-2  # the branch matters
    assert torch.allclose(v.grad, expected, rtol=1e-8, atol=1e-10)


def _sd_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_methods_negative_prompts_are_the_authors_and_the_toy_ignores_them():
    """NFSD's negative prompt is the paper's; DDS, PDS, SDS-from-the-source (pds.py) and the bridge's SDS stage
    (SDS-Bridge's 2D code) use "" where the course uses "low quality"; every other method keeps the course's. The toy
    world's prompt parser reads none of these words, so its NFSD, PDS, DDS and bridge runs do not change (the same
    log-prior as "low quality"). Fails if a row lost its negative prompt or the toy started reading one."""
    from guidance.methods import DEFAULT_NEGATIVE_PROMPT, METHODS
    from guidance.toy import ToyDiffusion

    assert METHODS["nfsd"].negative_prompt == ("unrealistic, blurry, low quality, out of focus, ugly, low contrast, "
                                               "dull, dark, low-resolution, gloomy")
    empty = {"pds", "dds", "bridge", "sds_edit"}
    for name, method in METHODS.items():
        if name != "nfsd":
            assert method.negative_prompt == ("" if name in empty else DEFAULT_NEGATIVE_PROMPT), name
    toy = ToyDiffusion()
    for method in METHODS.values():
        assert torch.equal(toy.negative_embedding(method.negative_prompt), toy.get_text_embeds("low quality"))
