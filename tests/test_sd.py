"""The gradient contract of SDS, PDS and VSD, checked against an independent computation on a tiny SD.

The reference side is written out here from the papers' equations, with a separately loaded plain UNet and
the schedule recomputed from the scheduler's config, never through guidance/schedule.py or sd.py, so a slip
in our schedule math, CFG or batching shows up as a mismatch. The contract is checked in float64 on both
sides: in float32 the gradient's conditioning (guidance scale x UNet Lipschitz x rounding of x_t) alone
exceeds 1e-5 at guidance 25, so float32 is checked separately at a tolerance that says so.
"""
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from guidance.schedule import NoiseSchedule
from guidance.sd import StableDiffusion
from reference import ReferenceSchedule, cfg_reference, randn

ATOL = 1e-5


def test_schedule_matches_diffusers(tiny_sd_dir):
    scheduler = DDPMScheduler.from_pretrained(tiny_sd_dir, subfolder="scheduler")
    ours = NoiseSchedule.scaled_linear()
    assert torch.allclose(ours.alphas_cumprod.float(), scheduler.alphas_cumprod, atol=1e-6)
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for t in (20, 500, 980):
        expected = scheduler.add_noise(x0, noise, torch.tensor([t]))
        assert torch.allclose(ours.add_noise(x0, noise, t), expected, atol=1e-6)


@pytest.mark.parametrize("weighting,grad_scale,scale,t", [("uniform", 1.0, 25.0, 500), ("dreamfusion", 2.5, 100.0, 37)])
def test_sds_gradient_is_eps_hat_minus_noise(sd64, reference, embeddings, weighting, grad_scale, scale, t):
    scheduler, unet = reference
    x = randn(*sd64.latent_shape()).requires_grad_(True)
    noise = torch.randn_like(x)
    sd64.get_sds_loss(x, embeddings[0], guidance_scale=scale, grad_scale=grad_scale, t=t, noise=noise,
                      weighting=weighting).backward()
    x_t = scheduler.add_noise(x.detach(), noise, t)
    w = 1.0 if weighting == "uniform" else 1.0 - scheduler.alphas_cumprod[t].item()
    expected = grad_scale * w * (cfg_reference(unet, x_t, t, embeddings[0], scale) - noise)
    assert expected.abs().mean() > 0.1  # the comparison below is not between two near-zero tensors
    assert torch.allclose(x.grad, expected, atol=ATOL)


def test_sds_gradient_is_averaged_over_a_batch(sd64, reference, embeddings):
    scheduler, unet = reference
    x = randn(*sd64.latent_shape(3)).requires_grad_(True)
    noise = torch.randn_like(x)
    sd64.get_sds_loss(x, embeddings[0], guidance_scale=7.5, t=300, noise=noise).backward()
    x_t = scheduler.add_noise(x.detach(), noise, 300)
    expected = (cfg_reference(unet, x_t, 300, embeddings[0], 7.5) - noise) / 3
    assert torch.allclose(x.grad, expected, atol=ATOL)


def test_float32_sds_agrees_with_float64_reference_within_rounding(tiny_sd, reference, embeddings):
    scheduler, unet = reference
    x, noise = randn(*tiny_sd.latent_shape()), randn(*tiny_sd.latent_shape())
    x32 = x.float().requires_grad_(True)
    tiny_sd.get_sds_loss(x32, embeddings[0].float(), guidance_scale=25, t=500, noise=noise.float()).backward()
    expected = cfg_reference(unet, scheduler.add_noise(x, noise, 500), 500, embeddings[0], 25) - noise
    assert x32.grad.dtype == torch.float32
    # float32 rounding of x_t (~1e-7) times the UNet's gain times guidance 25: a few 1e-5 at most
    assert torch.allclose(x32.grad.double(), expected, atol=25 * 4e-6)


def test_sds_draws_t_in_range_and_fresh_noise(tiny_sd, embeddings):
    seen = []
    original = tiny_sd.predict_eps
    tiny_sd.predict_eps = lambda x, t, e: (seen.append(t), original(x, t, e))[1]
    try:
        x = torch.randn(tiny_sd.latent_shape(), requires_grad=True)
        torch.manual_seed(0)
        for _ in range(200):
            tiny_sd.get_sds_loss(x, embeddings[0].float(), guidance_scale=7.5)
    finally:
        tiny_sd.predict_eps = original
    assert min(seen) >= 20 and max(seen) <= 980
    assert len(set(seen)) > 150  # uniform over 961 values: 200 draws are nearly all distinct


def pds_reference(scheduler, unet, src, tgt, src_emb, tgt_emb, scale, t, noise_t, noise_prev):
    """Return z_tgt - z_src from the issue's equations, with diffusers' tensors (float32) throughout."""
    abar = scheduler.alphas_cumprod
    alpha_t, beta_t = scheduler.alphas[t], scheduler.betas[t]  # one-step posterior: t_prev = t - 1
    abar_t, abar_prev = abar[t], abar[t - 1]

    x0 = torch.cat([src, tgt])
    x_t = abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * noise_t
    x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * noise_prev
    # Row 0 is the source with its prompt pair, row 1 the target with its own: one batch-4 UNet call.
    pair_embeddings = torch.cat([src_emb[:1], tgt_emb[:1], src_emb[1:], tgt_emb[1:]])
    eps = cfg_reference(unet, x_t, t, pair_embeddings, scale)
    x0_hat = (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    mu = abar_prev.sqrt() * beta_t / (1 - abar_t) * x0_hat + alpha_t.sqrt() * (1 - abar_prev) / (1 - abar_t) * x_t
    sigma = ((1 - abar_prev) / (1 - abar_t) * beta_t).sqrt()
    z_src, z_tgt = (x_prev - mu) / sigma
    return (z_tgt - z_src).unsqueeze(0)


@pytest.mark.parametrize("t,grad_scale", [(20, 1.0), (400, 1.0), (980, 0.5)])
def test_pds_gradient_is_z_tgt_minus_z_src(sd64, reference, embeddings, t, grad_scale):
    scheduler, unet = reference
    src = randn(*sd64.latent_shape())
    tgt = (src + 0.3 * torch.randn_like(src)).requires_grad_(True)
    noise_t, noise_prev = torch.randn_like(src), torch.randn_like(src)
    sd64.get_pds_loss(src, tgt, embeddings[0], embeddings[1], guidance_scale=7.5, grad_scale=grad_scale, t=t,
                         noise=(noise_t, noise_prev)).backward()
    expected = grad_scale * pds_reference(scheduler, unet, src, tgt.detach(), *embeddings, 7.5, t, noise_t, noise_prev)
    assert expected.abs().mean() > 1e-3  # far above the 1e-5 tolerance: the check below can fail
    assert torch.allclose(tgt.grad, expected, atol=ATOL)


def test_pds_gradient_vanishes_when_target_equals_source(sd64, embeddings):
    src = randn(*sd64.latent_shape())
    tgt = src.clone().requires_grad_(True)
    sd64.get_pds_loss(src, tgt, embeddings[0], embeddings[0], t=300).backward()
    assert tgt.grad.abs().max() < 1e-10  # same image, same prompt, shared noise: z_tgt == z_src


def test_pds_runs_source_and_target_in_one_batch_of_four(tiny_sd, embeddings):
    batches = []
    handle = tiny_sd.unet.register_forward_hook(lambda m, args, kwargs_out: batches.append(args[0].shape[0]))
    try:
        src = torch.randn(tiny_sd.latent_shape())
        tgt = src.clone().requires_grad_(True)
        tiny_sd.get_pds_loss(src, tgt, *(e.float() for e in embeddings), t=100)
    finally:
        handle.remove()
    assert batches == [4]


def test_unet_calls_run_without_autograd_for_sds_and_pds(tiny_sd, embeddings):
    grad_modes = []
    handle = tiny_sd.unet.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    try:
        x = torch.randn(tiny_sd.latent_shape(), requires_grad=True)
        tiny_sd.get_sds_loss(x, embeddings[0].float(), t=100)
        tiny_sd.get_pds_loss(x.detach(), x, *(e.float() for e in embeddings), t=100)
    finally:
        handle.remove()
    assert grad_modes == [False, False]


@pytest.fixture
def fresh_sd(tiny_sd_dir):
    """Return a float64 StableDiffusion of its own (VSD adds a LoRA to its UNet)."""
    return StableDiffusion(str(tiny_sd_dir), device="cpu", precision=torch.float64)


@pytest.mark.parametrize("mode", ["fresh", "shared"])
def test_vsd_first_step_gradient_and_lora_update(fresh_sd, reference, embeddings, mode):
    scheduler, unet = reference
    fresh_sd.vsd_lora_timestep = mode
    x = randn(*fresh_sd.latent_shape(2)).requires_grad_(True)
    noise = torch.randn_like(x)
    t, scale = 600, 7.5
    fresh_sd.get_vsd_loss(x, embeddings[0], guidance_scale=scale, t=t, noise=noise).backward()

    # A fresh LoRA (lora_B = 0) predicts exactly what the pretrained UNet does for the conditional prompt.
    x_t = scheduler.add_noise(x.detach(), noise, t)
    cond = embeddings[0].chunk(2)[1].expand(2, -1, -1)
    with torch.no_grad():
        eps_phi = unet(x_t, torch.full((2,), t), encoder_hidden_states=cond).sample
    expected = (cfg_reference(unet, x_t, t, embeddings[0], scale) - eps_phi) / 2
    assert expected.abs().mean() > 0.01
    assert torch.allclose(x.grad, expected, atol=ATOL)

    # The LoRA took one AdamW step: lora_B moved away from zero, the base weights did not move.
    lora_b = [p for n, p in fresh_sd.unet.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 4 * 2 * 4  # to_q/k/v/out.0 x (self, cross) x 4 transformer blocks of the tiny UNet
    assert all(p.abs().max() > 0 for p in lora_b)
    assert fresh_sd.last_lora_loss is not None and torch.isfinite(fresh_sd.last_lora_loss)
    base = dict(unet.named_parameters())
    for name, p in fresh_sd.unet.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base[name.replace(".base_layer", "")]), name


def test_vsd_pretrained_branch_has_adapters_disabled(fresh_sd, reference, embeddings):
    _, unet = reference
    fresh_sd.enable_lora()
    with torch.no_grad():
        for p in fresh_sd.lora_parameters:
            p.add_(0.5 * torch.randn_like(p))  # a strongly trained LoRA
    x_t = randn(*fresh_sd.latent_shape())
    with fresh_sd.lora_disabled():
        got = fresh_sd.get_noise_preds(x_t, 300, embeddings[0], 7.5)
    assert torch.allclose(got, cfg_reference(unet, x_t, 300, embeddings[0], 7.5), atol=ATOL)
    with_lora = fresh_sd.get_noise_preds(x_t, 300, embeddings[0], 7.5)
    assert (with_lora - got).abs().mean() > 1e-3  # and the LoRA really changes the prediction when enabled


def test_vsd_lora_loss_falls_when_trained_repeatedly(fresh_sd, embeddings):
    torch.manual_seed(0)
    fresh_sd.lora_lr = 1e-2
    latents = randn(*fresh_sd.latent_shape(2))
    cond = embeddings[0].chunk(2)[1]
    fresh_sd.enable_lora()

    def mean_lora_loss(n=40):
        torch.manual_seed(123)  # the same t and noise draws each time
        with torch.no_grad():
            losses = []
            for _ in range(n):
                t = int(torch.randint(0, 1000, (1,)))
                noise = torch.randn_like(latents)
                x_t = fresh_sd.schedule.add_noise(latents, noise, t)
                losses.append(torch.nn.functional.mse_loss(fresh_sd.predict_eps(x_t, t, cond.expand(2, -1, -1)), noise).item())
        return sum(losses) / n

    before = mean_lora_loss()
    torch.manual_seed(1)
    for _ in range(60):
        fresh_sd.train_lora(latents, cond.expand(2, -1, -1))
    assert mean_lora_loss() < 0.9 * before


def test_half_precision_keeps_float32_latents_and_adapters(tiny_sd_dir, embeddings):
    sd = StableDiffusion(str(tiny_sd_dir), device="cpu", precision=torch.float16)
    assert sd.unet.dtype == torch.float16 and sd.vae.dtype == torch.float16
    x = torch.randn(sd.latent_shape(), requires_grad=True)
    loss = sd.get_vsd_loss(x, embeddings[0].float(), t=500)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert all(p.dtype == torch.float32 for p in sd.lora_parameters)
    assert sd.decode_latents(x.detach()).dtype == torch.float32
    assert sd.encode_imgs(torch.rand(1, 3, 16, 16)).dtype == torch.float32


def test_v_prediction_is_converted_to_eps(tiny_sd, tiny_sd_dir):
    scheduler = DDPMScheduler.from_pretrained(tiny_sd_dir, subfolder="scheduler")
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = 700
    x_t = scheduler.add_noise(x0, noise, torch.tensor([t]))
    v = scheduler.get_velocity(x0, noise, torch.tensor([t]))
    assert torch.allclose(tiny_sd.schedule.eps_from_v(x_t, v, t), noise, atol=1e-5)


def test_long_prompt_warns_that_it_is_truncated(tiny_sd):
    with pytest.warns(UserWarning, match="truncated"):
        emb = tiny_sd.get_text_embeds("a very " * 60 + "long prompt")
    assert emb.shape[1] == 77


def test_source_size_short_side_and_multiples(tiny_sd):
    # tiny SD: resolution 16, sizes multiples of 4 (SD 2.1: 512 and 64)
    assert tiny_sd.source_size(512, 512) == (16, 16)
    assert tiny_sd.source_size(333, 517) == (16, 24)
    h, w = tiny_sd.source_size(1000, 37)
    assert w == 16 and h % 4 == 0


def test_constructible_from_the_course_skeletons_args(tiny_sd_dir):
    import argparse

    args = argparse.Namespace(model=str(tiny_sd_dir), device="cpu", precision="fp16")
    sd = StableDiffusion(args, t_range=[0.02, 0.98])
    assert sd.unet.dtype == torch.float16 and sd.device.type == "cpu" and (sd.min_step, sd.max_step) == (20, 980)


def test_sds_and_pds_use_the_pretrained_model_even_after_vsd_trained_a_lora(fresh_sd, reference, embeddings):
    scheduler, unet = reference
    fresh_sd.enable_lora()
    with torch.no_grad():
        for p in fresh_sd.lora_parameters:
            p.add_(0.5 * torch.randn_like(p))
    x = randn(*fresh_sd.latent_shape()).requires_grad_(True)
    noise = torch.randn_like(x)
    fresh_sd.get_sds_loss(x, embeddings[0], guidance_scale=7.5, t=200, noise=noise).backward()
    expected = cfg_reference(unet, scheduler.add_noise(x.detach(), noise, 200), 200, embeddings[0], 7.5) - noise
    assert torch.allclose(x.grad, expected, atol=ATOL)
    tgt = (x.detach() + 0.5).requires_grad_(True)
    noises = (torch.randn_like(x), torch.randn_like(x))
    fresh_sd.get_pds_loss(x.detach(), tgt, *embeddings, t=300, noise=noises).backward()
    expected = pds_reference(scheduler, unet, x.detach(), tgt.detach(), *embeddings, 7.5, 300, *noises)
    assert torch.allclose(tgt.grad, expected, atol=ATOL)
