"""The toy world: its model is the exact mixture predictor, and SDS, PDS and VSD show in it what they claim.

The four behaviour tests run main.run (the course's optimiser, unchanged) on the toy model; the mutation
tests rerun them with a plausible wrong gradient and check that the same checks then fail.
Per-seed numbers are printed (pytest -s shows them).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

import guidance.loop
import main
from guidance import losses
from guidance.sd import ScoreDistillation
from guidance.toy import (TEMPLATES, ExactMixtureEps, Template, ToyDiffusion, ToyScorer, nearest_template, parse_prompt,
                          patch_mask, prompt_set, prompt_templates, render_source, render_template, shape_mask,
                          template_means, to_pil)
from utils import UserError, load_image, pil_to_torch

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "data" / "toy_imgs" / "a_red_circle.png"  # a red circle at the centre, white patch top left
SOURCE_TEMPLATE = Template("red", "circle", 1, 1)
EDIT_TEMPLATE = Template("blue", "circle", 1, 1)
SDS_SEEDS = range(8)
SATURATION_SEEDS = (0, 1)
PDS_SEEDS = range(6)
CONTROL_SEEDS = (0, 1)

# The thresholds every behaviour test and its mutants are judged by.
SDS_MAX_MSE = 0.01
PATCH_KEPT = 0.8  # mean of the white patch (1.0 in the source, -1 in every template)
PATCH_ERASED = 0.0
PDS_MAX_OFF_PATCH_MSE = 0.005  # away from the patch the edit must equal the blue circle template
VSD_MAX_MSE = 0.02
VSD_MIN_BACKGROUND_STD = 0.03  # a sample has std 0.05 around its template; SDS's mode has about 0.007
LORA_LOSS_DROP = 5.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The toy's ops are tiny: on a busy 2-core machine, OpenMP threads spin-wait and make them ~20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return ToyDiffusion(device="cpu")


def distil(model, tmp_path, *argv: str, seed: int = 0) -> tuple[main.RunResult, torch.Tensor]:
    """Return main.run's result and its final latents (unclamped) for `main.py --model toy ARGV`."""
    args = main.parse_args(["--model", "toy", "--seed", str(seed), "--save_dir", str(tmp_path / f"seed_{seed}"),
                            "--log_step", "0", "--device", "cpu", "--overwrite", *argv])
    final = {}
    decode = model.decode_latents

    def capture(latents):
        final["latents"] = latents.detach().clone()
        return decode(latents)

    model.decode_latents = capture
    try:
        result = main.run(model, args, progress=False)
    finally:
        del model.decode_latents
    assert result.status == "finished" and result.image_path.is_file()
    return result, final["latents"]


# ------------------------------------------------------------------------------------------- checks
def sds_failures(latents: torch.Tensor) -> list[str]:
    """Return why an SDS result for "a red circle" fails behaviour 1 (empty when it passes)."""
    template, mse = nearest_template(latents[0])
    failures = []
    if (template.colour, template.shape) != ("red", "circle"):
        failures.append(f"nearest template is a {template}")
    if mse >= SDS_MAX_MSE:
        failures.append(f"mse {mse:.4f} >= {SDS_MAX_MSE}")
    return failures


def saturation_failures(max_pixel: dict) -> list[str]:
    """Return why {(guidance, seed): largest |pixel|} fails behaviour 2: it must grow with guidance."""
    failures = []
    for seed in SATURATION_SEEDS:
        values = [max_pixel[(g, seed)] for g in (7.5, 25.0, 100.0)]
        if not values[0] < values[1] < values[2]:
            failures.append(f"seed {seed}: max |pixel| {values} does not grow with guidance")
        if not (values[0] < 1.25 and values[2] > 1.5):
            failures.append(f"seed {seed}: max |pixel| {values}: want < 1.25 at 7.5 and > 1.5 at 100")
    return failures


def edit_metrics(latents: torch.Tensor) -> tuple[Template, float, float]:
    """Return (nearest template, mean of the white patch, mse to the blue circle away from the patch)."""
    image = latents[0]
    patch = patch_mask("top left")
    off_patch_mse = float(((image - render_template(EDIT_TEMPLATE).float())[:, ~patch] ** 2).mean())
    return nearest_template(image)[0], float(image[:, patch].mean()), off_patch_mse


def pds_failures(latents: torch.Tensor) -> list[str]:
    """Return why a PDS edit red circle -> blue circle fails behaviour 3 (identity kept, colour changed)."""
    template, patch_mean, off_patch_mse = edit_metrics(latents)
    failures = []
    if template != EDIT_TEMPLATE:
        failures.append(f"nearest template is a {template}, not a {EDIT_TEMPLATE}")
    if patch_mean <= PATCH_KEPT:
        failures.append(f"white patch mean {patch_mean:.3f} <= {PATCH_KEPT}")
    if off_patch_mse >= PDS_MAX_OFF_PATCH_MSE:
        failures.append(f"off-patch mse to the blue circle {off_patch_mse:.4f} >= {PDS_MAX_OFF_PATCH_MSE}")
    return failures


def background_std(image: torch.Tensor, template: Template) -> float:
    """Return the std of image - template over the template's background pixels."""
    mask = shape_mask(template.shape, template.row, template.col)
    return float((image - render_template(template).float())[:, ~mask].std())


def vsd_failures(latents: torch.Tensor, lora_losses: list[float]) -> list[str]:
    """Return why VSD particles for "a red circle" fail behaviour 4 (class members, samples, LoRA learns)."""
    failures = []
    for i, particle in enumerate(latents):
        template, mse = nearest_template(particle)
        if (template.colour, template.shape) != ("red", "circle") or mse >= VSD_MAX_MSE:
            failures.append(f"particle {i}: nearest {template} at mse {mse:.4f}")
        if background_std(particle, template) <= VSD_MIN_BACKGROUND_STD:
            failures.append(f"particle {i}: background std {background_std(particle, template):.4f} <= "
                            f"{VSD_MIN_BACKGROUND_STD}: a mode, not a sample")
    first, last = np.mean(lora_losses[:50]), np.mean(lora_losses[-50:])
    if not first > LORA_LOSS_DROP * last:
        failures.append(f"LoRA loss {first:.3f} -> {last:.3f} did not fall {LORA_LOSS_DROP}x")
    return failures


# ------------------------------------------------------------------------------------------- the world
def brute_force_eps(x_t: torch.Tensor, t: int, prompt: str, schedule) -> torch.Tensor:
    """Return eps*(x_t) from the formula, one component at a time, in float64 (independent of the model)."""
    abar = schedule.alpha_bar(t)
    a, b = abar**0.5, (1 - abar) ** 0.5
    v = a**2 * 0.05**2 + b**2
    x = x_t.double().flatten()
    selected = prompt_templates(prompt)
    means = [render_template(TEMPLATES[k]).flatten() for k in selected]
    log_w = torch.stack([-((x - a * mu) ** 2).sum() / (2 * v) for mu in means])
    w = torch.softmax(log_w, 0)
    return sum(w_k * b * (x - a * mu) / v for w_k, mu in zip(w, means)).view_as(x_t)


@pytest.mark.parametrize("t", [1, 20, 300, 999])
@pytest.mark.parametrize("prompt", ["a red circle", "a square", ""])
def test_unet_is_the_exact_mixture_predictor(model, t, prompt):
    torch.manual_seed(t)
    mu = render_template(Template("red", "circle", 0, 1)).float()
    abar = model.schedule.alpha_bar(t)
    # Half way between two templates' noised means, so that several posterior weights matter.
    x_t = (abar**0.5 * (mu + render_template(Template("green", "square", 0, 1)).float()) / 2
           + (1 - abar) ** 0.5 * torch.randn(3, 64, 64)).unsqueeze(0)
    eps = model.predict_eps(x_t, t, model.get_text_embeds(prompt))
    expected = brute_force_eps(x_t[0], t, prompt, model.schedule)
    torch.testing.assert_close(eps[0].double(), expected, rtol=1e-5, atol=1e-5)


def test_posterior_mean_of_a_template_sample_is_its_template(model):
    x0 = render_template(Template("yellow", "square", 2, 1)).float() + 0.05 * torch.randn(3, 64, 64)
    t = 100
    x_t = model.schedule.add_noise(x0, torch.randn(3, 64, 64), t).unsqueeze(0)
    weights = model.unet.exact.posterior(x_t, torch.tensor([t]), model.get_text_embeds("a square"))
    assert TEMPLATES[int(weights.argmax())] == Template("yellow", "square", 2, 1)
    assert float(weights.max()) > 0.999


def test_cfg_stays_finite_for_excluded_templates(model):
    """A prompt excludes templates with a large finite log-prior; CFG at scale 100 must not make NaN."""
    embeddings = torch.cat([model.get_text_embeds("low quality"), model.get_text_embeds("a blue square")])
    for t in (1, 500, 999):
        for x in (torch.zeros(2, 3, 64, 64), 10 * torch.randn(2, 3, 64, 64)):
            assert torch.isfinite(model.get_noise_preds(x, t, embeddings, 100.0)).all()


def test_the_world_keeps_its_promises():
    red, blue = render_template(Template("red", "circle", 1, 1)), render_template(Template("blue", "circle", 1, 1))
    moved = render_template(Template("red", "circle", 1, 2))
    assert ((red - blue) ** 2).sum() < ((red - moved) ** 2).sum()  # recolouring moves an image less
    assert template_means().abs().max() == 1.0
    assert len(TEMPLATES) == 4 * 2 * 9
    for corner in ("top left", "top right", "bottom left", "bottom right"):  # no template reaches a patch
        assert (template_means()[:, patch_mask(corner).repeat(3, 1, 1).flatten()] == -1).all()
    assert render_source(SOURCE_TEMPLATE, "top left")[:, patch_mask("top left")].eq(1).all()


@pytest.mark.parametrize("prompt, n_templates", [
    ("a red circle", 9), ("A blue square on a black background", 9), ("a circle", 36), ("red", 18),
    ("red and blue circles", 18), ("", 72), ("low quality", 72), ("a red circle with a white patch", 9),
])
def test_prompt_selects_templates(prompt, n_templates):
    selected = [TEMPLATES[k] for k in prompt_templates(prompt)]
    assert len(selected) == n_templates
    colours, shapes = parse_prompt(prompt)
    assert all((not colours or tpl.colour in colours) and (not shapes or tpl.shape in shapes) for tpl in selected)


@pytest.mark.parametrize("prompt, word", [("a purple triangle", "purple"), ("a red star", "star"),
                                          ("two orange squares", "orange")])
def test_prompt_outside_the_world_is_an_error_listing_the_vocabulary(prompt, word):
    with pytest.raises(UserError, match=word) as err:
        ToyDiffusion(device="cpu").get_text_embeds(prompt)
    assert "red, green, blue, yellow" in str(err.value) and "circle, square" in str(err.value)


def test_interface_identity_vae_and_sizes(model):
    imgs = torch.rand(2, 3, 64, 64)
    latents = model.encode_imgs(imgs)
    torch.testing.assert_close(latents, 2 * imgs - 1)
    torch.testing.assert_close(model.decode_latents(latents), imgs)
    assert model.decode_latents(torch.full((1, 3, 64, 64), 3.0)).max() == 1.0
    assert model.source_size(512, 768) == (64, 64) and model.latent_shape(4) == (4, 3, 64, 64)
    assert model.dtype == torch.float32 and model.model_name == "toy"
    emb = model.get_text_embeds("a red circle")
    assert emb.shape == (1, len(TEMPLATES)) and torch.isfinite(emb).all()


def test_lora_starts_at_zero_and_then_learns():
    model = ToyDiffusion(device="cpu")
    x_t, emb = torch.randn(2, 3, 64, 64), model.get_text_embeds("a red circle")
    exact = ExactMixtureEps(model.schedule.alphas_cumprod)(x_t, torch.tensor([300, 300]), emb.repeat(2, 1))
    torch.testing.assert_close(model.predict_eps(x_t, 300, emb.repeat(2, 1)), exact)
    model.enable_lora()
    torch.testing.assert_close(model.predict_eps(x_t, 300, emb.repeat(2, 1)), exact)  # lora_B = 0
    latents = torch.randn(2, 3, 64, 64)
    for _ in range(3):
        model.train_lora(latents, emb.repeat(2, 1))
    assert all(float(p.detach().abs().max()) > 0 for p in model.lora_parameters)  # gradients reached A and B
    assert not torch.allclose(model.predict_eps(x_t, 300, emb.repeat(2, 1)), exact)
    with model.lora_disabled():
        torch.testing.assert_close(model.predict_eps(x_t, 300, emb.repeat(2, 1)), exact)


# ------------------------------------------------------------------------------------------- prompt set, scorer
def test_committed_prompt_set_is_what_the_renderer_makes():
    committed = json.loads((ROOT / "data" / "toy_prompts.json").read_text())
    assert committed == prompt_set()
    for key, entry in committed.items():
        assert set(entry) == {"prompt", "edit_prompt", "img_path"}
        template = nearest_template(2 * pil_to_torch(load_image(ROOT / entry["img_path"]))[0] - 1)[0]
        assert f"a {template.colour} {template.shape}" == entry["prompt"]
        parse_prompt(entry["edit_prompt"])
    from guidance.toy import PROMPT_SET

    for (template, corner, _), entry in zip(PROMPT_SET, committed.values()):
        committed_pixels = np.asarray(Image.open(ROOT / entry["img_path"]).convert("RGB"))
        assert np.array_equal(committed_pixels, np.asarray(to_pil(render_source(template, corner))))


def test_scorer_grades_how_well_an_image_matches_its_prompt():
    scorer = ToyScorer()
    red = render_template(SOURCE_TEMPLATE)
    noisy = red + 0.3 * torch.randn(red.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    halfway = (red + render_template(EDIT_TEMPLATE)) / 2
    images = [to_pil(x) for x in (red, noisy, halfway, torch.zeros_like(red) - 1, render_template(EDIT_TEMPLATE))]
    scores = scorer.score(images, ["a red circle"] * len(images))
    assert scores[0] > 0.95 and scores[-1] < 0.01
    assert scores[0] >= scores[1] > scores[2] > scores[4]
    assert all(0 <= s <= 1 for s in scores)
    assert scorer.score([to_pil(red).resize((128, 128))], ["a red circle"])[0] > 0.95
    with pytest.raises(UserError, match="names no colour or shape"):
        scorer.score([images[0]], ["A castle next to a river"])


# ------------------------------------------------------------------------------------------- behaviours
_SDS_CACHE: dict = {}


def sds_latents(model, tmp_path, guidance: float, seed: int) -> torch.Tensor:
    if (guidance, seed) not in _SDS_CACHE:
        _SDS_CACHE[(guidance, seed)] = distil(model, tmp_path, "--prompt", "a red circle", "--loss_type", "sds",
                                              "--guidance_scale", str(guidance), seed=seed)[1]
    return _SDS_CACHE[(guidance, seed)]


def test_1_sds_makes_a_red_circle_for_every_seed(model, tmp_path):
    for seed in SDS_SEEDS:
        latents = sds_latents(model, tmp_path, 25.0, seed)
        template, mse = nearest_template(latents[0])
        print(f"SDS seed {seed}: {template}, mse {mse:.5f}, max |pixel| {latents.abs().max():.3f}")
        assert not sds_failures(latents), sds_failures(latents)


def test_2_sds_oversaturates_more_with_more_guidance(model, tmp_path):
    max_pixel = {(g, seed): float(sds_latents(model, tmp_path, g, seed).abs().max())
                 for g in (7.5, 25.0, 100.0) for seed in SATURATION_SEEDS}
    print("SDS largest |pixel| (guidance, seed):", {k: round(v, 3) for k, v in max_pixel.items()})
    assert not saturation_failures(max_pixel), saturation_failures(max_pixel)


def pds_edit(model, tmp_path, seed: int) -> torch.Tensor:
    return distil(model, tmp_path, "--prompt", "a red circle", "--edit_prompt", "a blue circle", "--src_img_path",
                  str(SOURCE), "--loss_type", "pds", seed=seed)[1]


def test_3_pds_recolours_and_keeps_the_identity_that_sds_erases(model, tmp_path, monkeypatch):
    for seed in PDS_SEEDS:
        latents = pds_edit(model, tmp_path, seed)
        template, patch_mean, off_patch_mse = edit_metrics(latents)
        print(f"PDS seed {seed}: {template}, patch mean {patch_mean:.3f}, off-patch mse {off_patch_mse:.5f}")
        assert not pds_failures(latents), pds_failures(latents)

    # Control: SDS with the target prompt, started from the source image (main.run starts SDS from noise).
    source = model.encode_imgs(pil_to_torch(load_image(SOURCE)))
    monkeypatch.setattr(guidance.loop, "initial_latents", lambda model, config, folder: (source.clone(), None))
    for seed in CONTROL_SEEDS:
        latents = distil(model, tmp_path, "--prompt", "a blue circle", "--loss_type", "sds", "--guidance_scale",
                         "7.5", "--step", "200", seed=seed)[1]
        template, patch_mean, _ = edit_metrics(latents)
        print(f"SDS-from-source seed {seed}: {template}, patch mean {patch_mean:.3f}")
        assert template == EDIT_TEMPLATE
        assert patch_mean < PATCH_ERASED


def vsd_run(tmp_path, seed: int = 0, patch=None) -> tuple[torch.Tensor, list[float]]:
    """Return the VSD particles and the LoRA's losses of a run on a fresh model (the LoRA lives in the model)."""
    model = ToyDiffusion(device="cpu")
    lora_losses = []
    train_lora = model.train_lora

    def recording_train_lora(latents, cond):
        loss = train_lora(latents, cond)
        lora_losses.append(float(loss))
        return loss

    model.train_lora = recording_train_lora
    if patch is not None:
        patch(model)
    latents = distil(model, tmp_path, "--prompt", "a red circle", "--loss_type", "vsd", "--num_particles", "4",
                     seed=seed)[1]
    return latents, lora_losses


def test_4_vsd_particles_are_samples_of_the_class_and_the_lora_learns(tmp_path):
    latents, lora_losses = vsd_run(tmp_path)
    for i, particle in enumerate(latents):
        template, mse = nearest_template(particle)
        print(f"VSD particle {i}: {template}, mse {mse:.5f}, background std {background_std(particle, template):.4f},"
              f" max |pixel| {particle.abs().max():.3f}")
    print(f"VSD LoRA loss: first 50 steps {np.mean(lora_losses[:50]):.3f}, last 50 {np.mean(lora_losses[-50:]):.3f}")
    assert not vsd_failures(latents, lora_losses), vsd_failures(latents, lora_losses)


# ------------------------------------------------------------------------------------------- mutants
def test_sds_with_the_wrong_sign_fails_behaviour_1(model, tmp_path, monkeypatch):
    reparam_loss = losses.reparam_loss
    monkeypatch.setattr(losses, "reparam_loss", lambda x, grad: reparam_loss(x, -grad))
    latents = distil(model, tmp_path, "--prompt", "a red circle", "--loss_type", "sds", "--step", "200")[1]
    assert sds_failures(latents)


def test_sds_without_cfg_fails_behaviour_2(model, tmp_path, monkeypatch):
    """eps_hat = eps_cond whatever the scale: the result no longer depends on guidance (200 steps suffice)."""
    monkeypatch.setattr(model, "get_noise_preds", lambda x_t, t, embeddings, guidance_scale:
                        ScoreDistillation.get_noise_preds(model, x_t, t, embeddings, 1.0))
    max_pixel = {}
    for g in (7.5, 25.0, 100.0):
        for seed in SATURATION_SEEDS:
            latents = distil(model, tmp_path, "--prompt", "a red circle", "--loss_type", "sds", "--guidance_scale",
                             str(g), "--step", "200", seed=seed)[1]
            max_pixel[(g, seed)] = float(latents.abs().max())
    print("SDS without CFG, largest |pixel|:", {k: round(v, 3) for k, v in max_pixel.items()})
    assert saturation_failures(max_pixel)


def test_pds_without_shared_noise_fails_behaviour_3(model, tmp_path, monkeypatch):
    """Source and target noised with independent (noise_t, noise_{t-1}) pairs: same mean, no identity."""
    add_noise, get_pds_loss = model.schedule.add_noise, model.get_pds_loss
    src_noises = []

    def pds_with_own_source_noise(*args, **kwargs):
        src_noises[:] = [torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)]
        return get_pds_loss(*args, **kwargs)

    def add_noise_with_independent_source(x0, noise, t):
        if x0.shape[0] == 2 and src_noises:  # PDS's batch cat[src, tgt]: give src its own noise
            noise = torch.cat([src_noises.pop(0), noise[1:]])
        return add_noise(x0, noise, t)

    monkeypatch.setattr(model, "get_pds_loss", pds_with_own_source_noise)
    monkeypatch.setattr(model.schedule, "add_noise", add_noise_with_independent_source)
    latents = pds_edit(model, tmp_path, seed=0)
    template, patch_mean, off_patch_mse = edit_metrics(latents)
    print(f"PDS without shared noise: {template}, patch mean {patch_mean:.3f}, off-patch mse {off_patch_mse:.4f}")
    assert pds_failures(latents)


def test_vsd_with_eps_phi_replaced_by_the_noise_fails_behaviour_4(tmp_path):
    """eps_phi := the sampled noise turns VSD into SDS (the LoRA still trains): particles are modes, not samples."""

    def as_sds(model):
        def vsd_as_sds(latents, text_embeddings, guidance_scale=7.5, **kwargs):
            model.train_lora(latents.detach().float(), text_embeddings.chunk(2)[1].repeat(latents.shape[0], 1))
            with model.lora_disabled():  # the pretrained model, as in VSD's eps_pretrained
                return model.get_sds_loss(latents, text_embeddings, guidance_scale)

        model.get_vsd_loss = vsd_as_sds

    latents, lora_losses = vsd_run(tmp_path, patch=as_sds)
    print("VSD as SDS:", vsd_failures(latents, lora_losses))
    assert vsd_failures(latents, lora_losses)


# ------------------------------------------------------------------------------------------- command line
def run_cli(tmp_path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "main.py", "--model", "toy", "--save_dir", str(tmp_path), *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_runs_sds_pds_and_vsd_offline(tmp_path, monkeypatch):
    done = run_cli(tmp_path, "--prompt", "a red circle", "--loss_type", "sds", "--step", "30", "--log_step", "10")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a_red_circle.png").is_file()
    # every 10th step and the last one (29): a progress strip ends with the run's final step
    assert len(list((tmp_path / "a_red_circle" / "progress").glob("step_*.png"))) == 4
    # PDS and VSD through main.main in this process (a subprocess each would only re-import torch).
    monkeypatch.chdir(ROOT)  # the prompt set's img_path is relative to the repository root
    entry = prompt_set()["a_green_square"]
    common = ["--model", "toy", "--device", "cpu", "--save_dir", str(tmp_path), "--step", "20"]
    assert main.main([*common, "--prompt", entry["prompt"], "--edit_prompt", entry["edit_prompt"],
                      "--src_img_path", entry["img_path"], "--loss_type", "pds"]) == 0
    assert (tmp_path / "a_yellow_square.png").is_file()
    assert main.main([*common, "--prompt", "a square", "--loss_type", "vsd", "--num_particles", "2"]) == 0
    assert (tmp_path / "a_square.png").is_file() and (tmp_path / "a_square" / "particles").is_dir()


def test_cli_rejects_a_prompt_outside_the_world(tmp_path):
    done = run_cli(tmp_path, "--prompt", "a purple triangle", "--step", "5")
    assert done.returncode == 2
    assert "purple" in done.stderr and "circle, square" in done.stderr and "Traceback" not in done.stderr


def test_eval_scores_a_toy_output_folder(tmp_path):
    import eval

    for template in (SOURCE_TEMPLATE, Template("green", "square", 0, 0)):
        to_pil(render_template(template)).save(tmp_path / f"a_{template.colour}_{template.shape}.png")
    to_pil(render_template(EDIT_TEMPLATE)).save(tmp_path / "a_yellow_circle.png")  # wrong colour: low score
    result = eval.evaluate_dir(tmp_path, scorer="toy")
    scores = {Path(k).name: v for k, v in result.items() if k.endswith(".png")}
    assert scores["a_red_circle.png"] > 0.95 and scores["a_green_square.png"] > 0.95
    assert scores["a_yellow_circle.png"] < 0.05
    assert json.loads((tmp_path / "eval.json").read_text())["score"] == pytest.approx(result["score"])
