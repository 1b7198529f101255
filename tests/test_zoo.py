"""The method zoo's gradients (NFSD, CSD, DDS, SDS-Bridge, ASD, ISM, SDI) against independent computations, the
exact identities between methods, their UNet batching, DDIM inversion, and the CLI for every method.

References are written here from the papers' equations with the independently loaded float64 UNet and schedule
of tests/reference.py (fixtures in conftest.py), never through guidance/; both sides run in float64.
"""
import json
from pathlib import Path
import math

import pytest
import torch

import main
from utils import UserError
from guidance.core import TimestepSchedule
from guidance.methods import METHODS
from guidance.schedule import NoiseSchedule
from reference import cfg_reference, randn

ATOL = 1e-5
SRC_IMG = "data/toy_imgs/a_red_circle.png"


def alpha_sigma(schedule, t):
    abar = schedule.alphas_cumprod[t]
    return abar.sqrt(), (1 - abar).sqrt()


def eps_reference(unet, x, t, embedding):
    """Return eps(x, t; one prompt) from the plain UNet, one prompt row per latent."""
    with torch.no_grad():
        return unet(x, torch.full((x.shape[0],), t), encoder_hidden_states=embedding.expand(x.shape[0], -1, -1)).sample


def ddim_invert_reference(schedule, unet, x, embedding, t, n):
    """Return DDIM inversion of x (taken at t = 0) to t in n steps t_k = round(k t / n), from the equations."""
    steps = [round(k * t / n) for k in range(n + 1)]
    for t_k, t_next in zip(steps[:-1], steps[1:]):
        e = eps_reference(unet, x, t_k, embedding)
        a_k, s_k = alpha_sigma(schedule, t_k)
        a_n, s_n = alpha_sigma(schedule, t_next)
        x = a_n * (x - s_k * e) / a_k + s_n * e
    return x


def grad_of(loss_fn, x):
    x = x.clone().requires_grad_(True)
    loss_fn(x).backward()
    return x.grad


@pytest.fixture(scope="module")
def null(sd64):
    return sd64.get_text_embeds("")


# ----------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("t", [100, 500])  # both branches of delta_D
def test_nfsd_gradient(sd64, reference, embeddings, null, t):
    schedule, unet = reference
    x, noise = randn(*sd64.latent_shape(2)), randn(*sd64.latent_shape(2))
    grad = grad_of(lambda v: sd64.get_nfsd_loss(v, embeddings[0], guidance_scale=7.5, t=t, noise=noise,
                                                weighting="dreamfusion"), x)
    a, s = alpha_sigma(schedule, t)
    x_t = a * x + s * noise
    neg, cond = embeddings[0].chunk(2)
    e_null, e_neg, e_cond = (eps_reference(unet, x_t, t, e) for e in (null, neg, cond))
    delta_d = e_null if t < 200 else e_null - e_neg
    expected = (1 - schedule.alphas_cumprod[t]) * (7.5 * (e_cond - e_null) + delta_d) / 2
    assert expected.abs().mean() > 1e-2
    assert torch.allclose(grad, expected, atol=ATOL)


def test_csd_gradient(sd64, reference, embeddings):
    schedule, unet = reference
    x, noise = randn(*sd64.latent_shape()), randn(*sd64.latent_shape())
    grad = grad_of(lambda v: sd64.get_csd_loss(v, embeddings[0], guidance_scale=12.0, grad_scale=0.5, t=300,
                                               noise=noise, weighting="dreamfusion"), x)
    a, s = alpha_sigma(schedule, 300)
    x_t = a * x + s * noise
    uncond, cond = embeddings[0].chunk(2)
    expected = 0.5 * (1 - schedule.alphas_cumprod[300]) * 12.0 * (eps_reference(unet, x_t, 300, cond)
                                                                 - eps_reference(unet, x_t, 300, uncond))
    assert expected.abs().mean() > 1e-2
    assert torch.allclose(grad, expected, atol=ATOL)


def test_dds_gradient(sd64, reference, embeddings):
    schedule, unet = reference
    src = randn(*sd64.latent_shape())
    tgt, noise = src + 0.4 * torch.randn_like(src), torch.randn_like(src)
    grad = grad_of(lambda v: sd64.get_dds_loss(src, v, embeddings[0], embeddings[1], guidance_scale=7.5, t=400,
                                               noise=noise), tgt)
    a, s = alpha_sigma(schedule, 400)
    expected = (cfg_reference(unet, a * tgt + s * noise, 400, embeddings[1], 7.5)
                - cfg_reference(unet, a * src + s * noise, 400, embeddings[0], 7.5))
    assert expected.abs().mean() > 1e-2
    assert torch.allclose(grad, expected, atol=ATOL)


def test_bridge_gradient(sd64, reference, embeddings):
    schedule, unet = reference
    src_emb, tgt_emb = embeddings[0][1:], embeddings[1][1:]
    x, noise = randn(*sd64.latent_shape()), randn(*sd64.latent_shape())
    grad = grad_of(lambda v: sd64.get_bridge_loss(v, torch.cat([src_emb, tgt_emb]), guidance_scale=40, t=600,
                                                  noise=noise, weighting="uniform"), x)
    a, s = alpha_sigma(schedule, 600)
    x_t = a * x + s * noise
    expected = 40 * (eps_reference(unet, x_t, 600, tgt_emb) - eps_reference(unet, x_t, 600, src_emb))
    assert expected.abs().mean() > 1e-2
    assert torch.allclose(grad, expected, atol=ATOL)


def test_asd_gradient_and_its_timestep_shift(sd64, reference, embeddings):
    schedule, unet = reference
    x, noise = randn(*sd64.latent_shape()), randn(*sd64.latent_shape())
    grad = grad_of(lambda v: sd64.get_asd_loss(v, embeddings[0], guidance_scale=7.5, t=300, t_plus=340, noise=noise,
                                               weighting="dreamfusion"), x)
    a, s = alpha_sigma(schedule, 300)
    a_plus, s_plus = alpha_sigma(schedule, 340)
    eps_plus = eps_reference(unet, a_plus * x + s_plus * noise, 340, embeddings[0][1:])
    expected = (1 - schedule.alphas_cumprod[300]) * (cfg_reference(unet, a * x + s * noise, 300, embeddings[0], 7.5)
                                                     - eps_plus)
    assert expected.abs().mean() > 1e-2
    assert torch.allclose(grad, expected, atol=ATOL)
    # d = max(1, floor(eta (t - min_step) u)), t + d <= T - 1
    assert sd64.asd_t_plus(520, 0.1, u=0.5) == 520 + math.floor(0.1 * (520 - sd64.min_step) * 0.5)
    assert sd64.asd_t_plus(21, 0.1, u=0.5) == 22
    assert sd64.asd_t_plus(998, 1.0, u=1.0) == 999


@pytest.mark.parametrize("t, expected_s, n_s", [(500, 420, 3), (60, 0, 0)])
def test_ism_gradient(sd64, reference, embeddings, null, t, expected_s, n_s):
    schedule, unet = reference
    x = randn(*sd64.latent_shape())
    grad = grad_of(lambda v: sd64.get_ism_loss(v, embeddings[0], guidance_scale=7.5, t=t, delta_t=80, delta_s=200,
                                               inversion_steps=5, weighting="sigma_over_alpha"), x)
    s = max(0, t - 80)
    assert s == expected_s and n_s == (0 if s == 0 else min(5, math.ceil(s / 200)))
    x_s = x if s == 0 else ddim_invert_reference(schedule, unet, x, null, s, n_s)
    e_s = eps_reference(unet, x_s, s, null)
    a_s, s_s = alpha_sigma(schedule, s)
    a_t, s_t = alpha_sigma(schedule, t)
    x_t = a_t * (x_s - s_s * e_s) / a_s + s_t * e_s
    expected = s_t / a_t * (cfg_reference(unet, x_t, t, embeddings[0], 7.5) - e_s)
    assert expected.abs().mean() > 1e-2
    assert torch.allclose(grad, expected, atol=ATOL)


def test_sdi_gradient_is_x_minus_x0_hat_of_the_inverted_latent(sd64, reference, embeddings, null):
    schedule, unet = reference
    x = randn(*sd64.latent_shape())
    # the deterministic null-prompt inversion (the authors' CFG inversion with noise: tests/test_fidelity.py)
    grad = grad_of(lambda v: sd64.get_sdi_loss(v, embeddings[0], guidance_scale=7.5, t=300, inversion_steps=4,
                                               weighting="sigma_over_alpha", inversion_guidance=None,
                                               inversion_eta=0.0), x)
    x_t = ddim_invert_reference(schedule, unet, x, null, 300, 4)
    a, s = alpha_sigma(schedule, 300)
    kappa = (x_t - a * x) / s
    expected = s / a * (cfg_reference(unet, x_t, 300, embeddings[0], 7.5) - kappa)
    x0_hat = (x_t - s * cfg_reference(unet, x_t, 300, embeddings[0], 7.5)) / a
    assert torch.allclose(expected, x - x0_hat, atol=1e-10)  # the paper's target, x0_hat(x_t)
    assert expected.abs().mean() > 1e-2
    assert torch.allclose(grad, expected, atol=ATOL)


def test_sdi_eta_one_is_sds(sd64, embeddings):
    x, noise = randn(*sd64.latent_shape()), randn(*sd64.latent_shape())
    sdi = grad_of(lambda v: sd64.get_sdi_loss(v, embeddings[0], t=300, inversion_steps=4, weighting="uniform",
                                              eta=1.0, noise=noise), x)
    sds = grad_of(lambda v: sd64.get_sds_loss(v, embeddings[0], guidance_scale=7.5, t=300, noise=noise,
                                              weighting="uniform"), x)
    assert torch.allclose(sdi, sds, atol=1e-12)


# ----------------------------------------------------------------------------------------- identities
def test_csd_is_sds_minus_sds_at_guidance_zero(sd64, embeddings):
    x, noise = randn(*sd64.latent_shape()), randn(*sd64.latent_shape())
    kw = dict(t=250, noise=noise, weighting="dreamfusion")
    csd = grad_of(lambda v: sd64.get_csd_loss(v, embeddings[0], guidance_scale=7.5, **kw), x)
    sds = grad_of(lambda v: sd64.get_sds_loss(v, embeddings[0], guidance_scale=7.5, **kw), x)
    sds0 = grad_of(lambda v: sd64.get_sds_loss(v, embeddings[0], guidance_scale=0.0, **kw), x)
    assert csd.abs().mean() > 1e-2
    assert torch.allclose(csd, sds - sds0, atol=1e-12)


def test_nfsd_minus_sds_with_the_null_prompt_is_the_noise_for_small_t(sd64, embeddings, null):
    x, noise = randn(*sd64.latent_shape()), randn(*sd64.latent_shape())
    kw = dict(guidance_scale=7.5, t=150, noise=noise, weighting="dreamfusion")
    nfsd = grad_of(lambda v: sd64.get_nfsd_loss(v, embeddings[0], **kw), x)
    sds = grad_of(lambda v: sd64.get_sds_loss(v, torch.cat([null, embeddings[0][1:]]), **kw), x)
    w = sd64.schedule.weight(150, "dreamfusion")
    assert torch.allclose(nfsd - sds, w * noise, atol=1e-12)


def test_dds_vanishes_for_the_same_image_and_prompt(sd64, embeddings):
    src = randn(*sd64.latent_shape())
    grad = grad_of(lambda v: sd64.get_dds_loss(src, v, embeddings[0], embeddings[0], t=300), src)
    assert grad.abs().max() < 1e-12


def test_bridge_vanishes_with_equal_modifiers(sd64, embeddings):
    x = randn(*sd64.latent_shape())
    cond = embeddings[0][1:]
    grad = grad_of(lambda v: sd64.get_bridge_loss(v, torch.cat([cond, cond]), t=300), x)
    assert grad.abs().max() < 1e-12


def test_asd_at_no_shift_is_csd_scaled_by_s_minus_one_over_s(sd64, embeddings):
    x, noise = randn(*sd64.latent_shape()), randn(*sd64.latent_shape())
    kw = dict(guidance_scale=7.5, t=400, noise=noise, weighting="uniform")
    asd = grad_of(lambda v: sd64.get_asd_loss(v, embeddings[0], t_plus=400, **kw), x)
    csd = grad_of(lambda v: sd64.get_csd_loss(v, embeddings[0], **kw), x)
    assert torch.allclose(asd, (7.5 - 1) / 7.5 * csd, atol=1e-12)


def test_general_gaussian_posterior_is_ddpms_on_the_ddpm_path():
    schedule = NoiseSchedule.scaled_linear()
    abar = schedule.alphas_cumprod
    for t, s in ((1, 0), (20, 19), (500, 499), (999, 998), (600, 300)):
        beta = 1 - abar[t] / abar[s]
        ddpm = (abar[s].sqrt() * beta / (1 - abar[t]), (abar[t] / abar[s]).sqrt() * (1 - abar[s]) / (1 - abar[t]),
                ((1 - abar[s]) / (1 - abar[t]) * beta).sqrt())
        assert torch.allclose(torch.tensor(schedule.posterior_coefficients(t, s), dtype=torch.float64), torch.stack(ddpm),
                              rtol=1e-9)
    assert schedule.weight(500, "sigma_over_alpha") == pytest.approx(((1 - abar[500]) / abar[500]).sqrt().item())
    assert schedule.weight(500, "dreamfusion") == pytest.approx(1 - abar[500].item())


def test_output_to_eps_for_each_prediction_type():
    schedule = NoiseSchedule.scaled_linear()
    x0, eps = randn(2, 4, 3, 3), randn(2, 4, 3, 3)
    t = 700
    a, s = schedule.alpha(t), schedule.sigma(t)
    x_t = a * x0 + s * eps
    for kind, output in (("epsilon", eps), ("v_prediction", a * eps - s * x0)):
        coef = schedule.eps_coefficients(kind)[t]
        assert torch.allclose(coef[0] * output + coef[1] * x_t, eps, atol=1e-12)
    # flow velocity v = eps - x0 on the path alpha = 1 - sigma: eps = x_t + alpha v
    coef = schedule.eps_coefficients("flow")[t]
    flow_x_t = (1 - s) * x0 + s * eps
    assert torch.allclose(coef[0] * (eps - x0) + coef[1] * flow_x_t, eps + (a - (1 - s)) * (eps - x0), atol=1e-12)


def test_timestep_schedules():
    linear = TimestepSchedule("linear", 20, 980, 500, 500)
    assert linear(0) == 980 and linear(499) == 20 and linear(250) == round(980 - 960 * 250 / 499)
    torch.manual_seed(0)
    anneal = TimestepSchedule("anneal", 20, 980, 500, 500)
    late = [anneal(499) for _ in range(200)]
    early = [anneal(0) for _ in range(200)]
    assert max(late) <= 500 and min(late) >= 20 and max(early) > 900
    assert min(TimestepSchedule("random", 20, 980, 10, 500)(3) for _ in range(100)) >= 20


# ----------------------------------------------------------------------------------------- DDIM
def test_ddim_inversion_then_sampling_reconstructs_in_the_toy_world():
    from guidance.toy import TEMPLATES, ToyDiffusion, render_template

    torch.set_num_threads(1)
    toy = ToyDiffusion()
    x = (render_template(TEMPLATES[5]) + 0.05 * torch.randn(3, 64, 64, dtype=torch.float64)).float()[None]
    null = toy.null_embedding()
    errors = {}
    for n in (2, 10, 50, 200):
        x_t = toy.ddim_invert(x, null, 600, n)
        steps = [round(k * 600 / n) for k in range(n, -1, -1)]
        back = toy.ddim_sample(x_t, list(zip(steps[:-1], steps[1:])), null)
        errors[n] = float((back - x).pow(2).mean().sqrt())
    print("toy DDIM invert+sample RMS error vs steps:", errors)
    # Measured 2026-12-02: 0.035, 0.028, 0.017, 0.007: the error of a first-order ODE solver, falling like 1 / n.
    assert errors[200] < 0.01 and errors[200] < errors[50] < errors[10] < errors[2]


def test_ddim_inversion_refuses_more_steps_than_timesteps(sd64):
    with pytest.raises(ValueError, match="needs 1 <= steps <= t"):
        sd64.ddim_invert(randn(*sd64.latent_shape()), sd64.null_embedding(), 5, 10)


# ----------------------------------------------------------------------------------------- batching
EXPECTED_CALLS = {  # (rows, timesteps) of each UNet call for one latent
    "nfsd": lambda t: [(3, {t})],
    "csd": lambda t: [(2, {t})],
    "bridge": lambda t: [(2, {t})],
    "asd": lambda t: [(3, {t, t + 10})],
    "ism": lambda t: [(1, {0}), (1, {140}), (1, {280}), (1, {420}), (2, {t})],  # t=500: s=420 in 3 steps, e_s, CFG
    "sdi": lambda t: [(2, {0}), (2, {125}), (2, {250}), (2, {375}), (2, {t})],  # CFG inversion (the authors')
}


@pytest.mark.parametrize("name", list(EXPECTED_CALLS) + ["dds"])
def test_each_loss_makes_the_unet_calls_it_must_and_no_more(tiny_sd, embeddings, name):
    calls = []
    handle = tiny_sd.unet.register_forward_hook(
        lambda m, args, kw, out: calls.append((args[0].shape[0], set(args[1].tolist()), torch.is_grad_enabled())),
        with_kwargs=True)
    x = torch.randn(tiny_sd.latent_shape(), requires_grad=True)
    emb = embeddings[0].float()
    try:
        if name == "dds":
            tiny_sd.get_dds_loss(x.detach(), x, emb, embeddings[1].float(), t=500)
        elif name == "asd":
            tiny_sd.get_asd_loss(x, emb, t=500, t_plus=510)
        elif name == "sdi":
            tiny_sd.get_sdi_loss(x, emb, t=500, inversion_steps=4)
        else:
            getattr(tiny_sd, METHODS[name].loss)(x, emb, t=500)
    finally:
        handle.remove()
    expected = [(4, {500})] if name == "dds" else EXPECTED_CALLS[name](500)
    assert [(rows, steps) for rows, steps, _ in calls] == expected
    assert not any(grad for _, _, grad in calls)


# ----------------------------------------------------------------------------------------- CLI
def method_argv(name, save_dir):
    argv = ["--prompt", "a red circle", "--loss_type", name, "--save_dir", str(save_dir), "--log_step", "0"]
    if METHODS[name].edits:
        argv += ["--edit_prompt", "a blue circle", "--src_img_path", SRC_IMG]
    return argv


@pytest.mark.parametrize("name", [m for m in METHODS if m not in ("sds", "pds", "vsd")])
def test_every_method_runs_from_the_cli_on_a_tiny_sd_and_the_toy(tiny_sd_dir, tmp_path, name, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    for model in (str(tiny_sd_dir), "toy"):
        out = tmp_path / ("sd" if model != "toy" else "toy")
        assert main.main(["--model", model, "--device", "cpu", "--step", "3", *method_argv(name, out)]) == 0
        name_stem = "a_blue_circle" if METHODS[name].edits else "a_red_circle"
        assert (out / f"{name_stem}.png").is_file()
        config = json.loads((out / name_stem / "run_config.json").read_text())
        assert config["status"] == "finished" and config["loss_type"] == name


@pytest.mark.parametrize("argv, words", [
    (["--loss_type", "dds", "--edit_prompt", "a blue circle"], "DDS edits an image: give the source image"),
    (["--loss_type", "dds", "--src_img_path", SRC_IMG], "DDS edits an image: give the target text"),
    (["--loss_type", "sdi", "--inversion_steps", "50"], "--inversion_steps 50 is larger than the smallest t (20)"),
    (["--loss_type", "sds", "--asd_ratio", "0.2"], "--asd_ratio belongs to --loss_type asd, not sds"),
    (["--loss_type", "csd", "--inversion_steps", "3"], "--inversion_steps belongs to --loss_type ism / sdi"),
    (["--loss_type", "sds", "--t_range", "0.9", "0.1"], "--t_range 0.9 0.1 is invalid"),
    (["--loss_type", "sdi", "--sdi_eta", "2"], "--sdi_eta 2 must be in [0, 1]"),
])
def test_bad_method_flags_fail_before_any_model_loads(tmp_path, argv, words, monkeypatch):
    monkeypatch.setattr(main, "build_model", lambda args: pytest.fail("a model was loaded"))
    with pytest.raises(UserError) as err:
        main.parse_args(["--model", "toy", "--prompt", "a red circle", "--save_dir", str(tmp_path), *argv])
    assert words in str(err.value)


def test_paper_defaults_fill_in_and_explicit_flags_win(tmp_path):
    base = ["--model", "toy", "--prompt", "a red circle", "--save_dir", str(tmp_path)]
    sdi = main.parse_args(base + ["--loss_type", "sdi"])
    assert (sdi.weighting, sdi.t_schedule, sdi.inversion_steps, sdi.guidance_scale) == ("sigma_over_alpha", "linear", 10, 7.5)
    ism = main.parse_args(base + ["--loss_type", "ism", "--weighting", "uniform", "--inversion_steps", "2"])
    assert (ism.weighting, ism.t_schedule, ism.inversion_steps, ism.ism_delta_t) == ("uniform", "anneal", 2, 80)
    dds = main.parse_args(base + ["--loss_type", "dds", "--edit_prompt", "a blue circle", "--src_img_path", SRC_IMG])
    assert dds.t_range == (0.05, 0.95) and dds.step == 200
    sds = main.parse_args(base + ["--loss_type", "sds"])
    assert (sds.weighting, sds.guidance_scale, sds.step, sds.asd_ratio) == ("uniform", 25.0, 500, None)


def test_each_loss_defaults_to_its_papers_weighting_as_the_table_says():
    """One source of truth: a loss called without `weighting` uses the weighting its table row names (a model-level
    setting, or a loss defaulting to uniform while the table says dreamfusion, fails)."""
    import inspect

    from guidance.losses import ScoreDistillation

    for name, method in METHODS.items():
        if method.loss is None:
            continue
        default = inspect.signature(getattr(ScoreDistillation, method.loss)).parameters["weighting"].default
        expected = "uniform" if name == "sds_edit" else method.weighting  # sds_edit calls SDS's loss
        assert default == expected, name
