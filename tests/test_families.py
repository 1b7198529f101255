"""Every Stable Diffusion family through the same losses: SD 2.x with v-prediction, SDXL and SD 3 (rectified flow).

Tiny random-weight pipelines are built from configs (benchmarks/random_sd.py: the diffusers pipeline's own
save_pretrained, so model_index.json is what the hub's folders have) and loaded through the user's path,
`StableDiffusion(folder)`. The reference side loads the same folder as the diffusers pipeline, independently, and
uses only its `encode_prompt`, its denoiser and, for SDXL, its `_get_add_time_ids`; the noise path, the output ->
eps conversion, CFG and the PDS posterior are written out here from the equations, never through guidance/.
Float64 on both sides, so the tolerance (1e-8) is rounding of a few hundred float64 operations, far below the
gradients compared (each asserted to be of order 0.1 or more).
"""
import json
import math

import pytest
import torch
from PIL import Image

import main
import run_all
from guidance.common import UserError
from guidance.methods import METHODS, run_prompts
from benchmarks.random_sd import build_random_sd
from guidance.schedule import NoiseSchedule, RectifiedFlow
from guidance.sd import StableDiffusion
from reference import ReferenceSchedule
from utils import run_cli

ATOL = 1e-8
FAMILIES = ("sd2v", "sdxl", "sd3")
SIZES = {"sd2v": "tiny-v", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3"}
NEGATIVE, PROMPT, EDIT = "low quality", "a castle next to a river", "a golden castle next to a river"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """Return {family: folder} of tiny random-weight pipelines, plus 'sd3_no_t5' (an SD 3 folder without T5)."""
    root = tmp_path_factory.mktemp("families")
    built = {family: build_random_sd(root / family, SIZES[family], seed=1) for family in FAMILIES}
    built["sd3_no_t5"] = build_random_sd(root / "sd3_no_t5", "tiny-sd3", seed=2, t5=False)
    return built


# ----------------------------------------------------------------------------------------- the reference
def pipeline_condition(pipe, prompt: str) -> tuple:
    """Return (prompt_embeds, pooled or None) from the pipeline's own encode_prompt (no CFG: one prompt), under
    no_grad as the pipeline's __call__ runs it (with autograd on, CPU attention may take another kernel)."""
    with torch.no_grad():
        out = pipe.encode_prompt(prompt, device=torch.device("cpu"), num_images_per_prompt=1,
                                 do_classifier_free_guidance=False) \
            if pipe.__class__.__name__ != "StableDiffusion3Pipeline" \
            else pipe.encode_prompt(prompt, None, None, device=torch.device("cpu"), num_images_per_prompt=1,
                                    do_classifier_free_guidance=False)
    return (out[0], out[2]) if len(out) == 4 else (out[0], None)


def path(pipe, t: int) -> tuple[float, float]:
    """Return (alpha_t, sigma_t): DDPM sqrt(abar_t), sqrt(1 - abar_t) from the scheduler's config; SD 3's rectified
    flow sigma_t = t / 1000, alpha_t = 1 - sigma_t."""
    if pipe.__class__.__name__ == "StableDiffusion3Pipeline":
        sigma = t / pipe.scheduler.config.num_train_timesteps
        return 1.0 - sigma, sigma
    abar = ReferenceSchedule(pipe.scheduler.config).alphas_cumprod[t].item()
    return math.sqrt(abar), math.sqrt(1.0 - abar)


def reference_eps(pipe, x_t: torch.Tensor, t: int, prompts: list[str]) -> torch.Tensor:
    """Return eps(x_t, t; prompt) per row from ONE call of the pipeline's denoiser with its family's conditioning."""
    conditions = [pipeline_condition(pipe, p) for p in prompts]
    prompt_embeds = torch.cat([c[0] for c in conditions])
    batch = x_t.shape[0]
    name = pipe.__class__.__name__
    with torch.no_grad():
        if name == "StableDiffusion3Pipeline":
            # diffusers passes timestep = sigma * 1000 (scheduler.timesteps); on our path that is t itself
            timestep = torch.full((batch,), path(pipe, t)[1] * 1000.0, dtype=torch.float64)
            out = pipe.transformer(hidden_states=x_t, timestep=timestep, encoder_hidden_states=prompt_embeds,
                                   pooled_projections=torch.cat([c[1] for c in conditions]), return_dict=False)[0]
        elif name == "StableDiffusionXLPipeline":
            size = (pipe.default_sample_size * pipe.vae_scale_factor,) * 2  # the pipeline's default height, width
            time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=torch.float64,
                                              text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
            added = {"text_embeds": torch.cat([c[1] for c in conditions]), "time_ids": time_ids.repeat(batch, 1)}
            out = pipe.unet(x_t, torch.full((batch,), t), encoder_hidden_states=prompt_embeds,
                            added_cond_kwargs=added, return_dict=False)[0]
        else:
            out = pipe.unet(x_t, torch.full((batch,), t), encoder_hidden_states=prompt_embeds, return_dict=False)[0]
    alpha, sigma = path(pipe, t)
    kind = "flow" if name == "StableDiffusion3Pipeline" else pipe.scheduler.config.prediction_type
    if kind == "epsilon":
        return out
    if kind == "v_prediction":  # v = alpha eps - sigma x0  =>  eps = alpha v + sigma x_t
        return alpha * out + sigma * x_t
    return x_t + (1.0 - sigma) * out  # flow velocity v = eps - x0  =>  eps = x_t + (1 - sigma) v


def reference_cfg(pipe, x_t, t, uncond: list[str], cond: list[str], scale: float) -> torch.Tensor:
    """Return eps_u + s (eps_c - eps_u), the batch laid out as [x_t; x_t] against [uncond rows; cond rows]."""
    eps_u, eps_c = reference_eps(pipe, torch.cat([x_t, x_t]), t, uncond + cond).chunk(2)
    return eps_u + scale * (eps_c - eps_u)


def embeddings(model, negative: str, prompt: str) -> torch.Tensor:
    """Return the course's cat[get_text_embeds(negative), get_text_embeds(prompt)]."""
    return torch.cat([model.get_text_embeds(negative), model.get_text_embeds(prompt)])


def randn(model, seed: int) -> torch.Tensor:
    return torch.randn(model.latent_shape(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------- family and conditioning
@pytest.mark.parametrize("family, class_name, prediction_type, schedule, shape", [
    ("sd2v", "StableDiffusion", "v_prediction", NoiseSchedule, (1, 4, 8, 8)),
    ("sdxl", "StableDiffusionXL", "epsilon", NoiseSchedule, (1, 4, 8, 8)),
    ("sd3", "StableDiffusion3", "flow", RectifiedFlow, (1, 16, 8, 8)),
])
def test_the_family_comes_from_the_folder(loaded, family, class_name, prediction_type, schedule, shape):
    model, _ = loaded(family)
    assert type(model).__name__ == class_name and isinstance(model, StableDiffusion)
    assert model.prediction_type == prediction_type and type(model.schedule) is schedule
    assert model.latent_shape() == shape and model.resolution == 16


@pytest.mark.parametrize("family", FAMILIES)
def test_text_embeddings_are_the_pipelines_encode_prompt(loaded, family):
    model, pipe = loaded(family)
    for prompt in (PROMPT, ""):
        ours = model.get_text_embeds(prompt)
        prompt_embeds, pooled = pipeline_condition(pipe, prompt)
        if pooled is None:  # SD 1.x / 2.x: the hidden states alone
            assert ours.shape == prompt_embeds.shape and torch.equal(ours, prompt_embeds)
            continue
        # SDXL and SD 3: the pooled vector rides as one more row, zero-padded to the hidden width
        assert ours.shape == (1, prompt_embeds.shape[1] + 1, prompt_embeds.shape[2])
        assert torch.equal(ours[:, :-1], prompt_embeds)
        assert torch.equal(ours[:, -1, :pooled.shape[1]], pooled)
        assert not ours[:, -1, pooled.shape[1]:].any()
        assert pooled.abs().mean() > 0.1 and prompt_embeds.abs().mean() > 0.1
    if family == "sd3":  # CLIPs (77) + T5 (256), T5's part not zeros: its encoder ran
        assert ours.shape[1] == 77 + 256 + 1 and ours[:, 77:-1].abs().mean() > 0.01


def test_sd3_without_t5_has_zeros_in_its_place_as_diffusers_does(folders):
    from diffusers import StableDiffusion3Pipeline

    folder = str(folders["sd3"])
    ours = StableDiffusion(folder, device="cpu", precision=torch.float64, no_t5=True)
    assert ours.text_encoder_3 is None and ours.tokenizer_3 is None
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None).to(torch.float64)
    prompt_embeds, pooled = pipeline_condition(pipe, PROMPT)
    embeds = ours.get_text_embeds(PROMPT)
    assert torch.equal(embeds[:, :-1], prompt_embeds) and not embeds[:, 77:-1].any()
    assert torch.equal(embeds[:, -1, :pooled.shape[1]], pooled)


def test_an_sd3_folder_without_t5_runs_and_says_so_once(folders):
    with pytest.warns(UserWarning, match="has no T5 text encoder") as record:
        model = StableDiffusion(str(folders["sd3_no_t5"]), device="cpu")
        model.get_text_embeds(PROMPT), model.get_text_embeds(EDIT)
    assert sum("T5" in str(w.message) for w in record) == 1
    assert not model.get_text_embeds(PROMPT)[:, 77:-1].any()


# ----------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("t, scale", [(500, 7.5), (37, 25.0)])
def test_sds_gradient_matches_the_pipelines_own_conditioning(loaded, family, t, scale):
    model, pipe = loaded(family)
    x = randn(model, 0).requires_grad_(True)
    noise = randn(model, 1)
    model.get_sds_loss(x, embeddings(model, NEGATIVE, PROMPT), guidance_scale=scale, t=t, noise=noise).backward()
    alpha, sigma = path(pipe, t)
    x_t = alpha * x.detach() + sigma * noise
    expected = reference_cfg(pipe, x_t, t, [NEGATIVE], [PROMPT], scale) - noise
    assert expected.abs().mean() > 0.1
    assert torch.allclose(x.grad, expected, atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_pds_gradient_matches_the_general_gaussian_posterior(loaded, family):
    model, pipe = loaded(family)
    t, s, scale = 400, 399, 7.5
    src = randn(model, 2)
    tgt = (src + 0.3 * randn(model, 3)).requires_grad_(True)
    noise_t, noise_s = randn(model, 4), randn(model, 5)
    model.get_pds_loss(src, tgt, embeddings(model, NEGATIVE, PROMPT), embeddings(model, NEGATIVE, EDIT),
                       guidance_scale=scale, t=t, noise=(noise_t, noise_s)).backward()
    (alpha_t, sigma_t), (alpha_s, sigma_s) = path(pipe, t), path(pipe, s)
    x0 = torch.cat([src, tgt.detach()])
    x_t, x_s = alpha_t * x0 + sigma_t * noise_t, alpha_s * x0 + sigma_s * noise_s
    eps = reference_cfg(pipe, x_t, t, [NEGATIVE, NEGATIVE], [PROMPT, EDIT], scale)  # row 0 source, row 1 target
    x0_hat = (x_t - sigma_t * eps) / alpha_t
    alpha_ts = alpha_t / alpha_s
    sigma_ts_sq = sigma_t**2 - alpha_ts**2 * sigma_s**2
    mean = alpha_ts * sigma_s**2 / sigma_t**2 * x_t + alpha_s * sigma_ts_sq / sigma_t**2 * x0_hat
    std = math.sqrt(sigma_ts_sq) * sigma_s / sigma_t
    z_src, z_tgt = ((x_s - mean) / std).chunk(2)
    expected = z_tgt - z_src
    assert expected.abs().mean() > 1e-3  # far above the tolerance: the check below can fail
    assert torch.allclose(tgt.grad, expected, atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_first_vsd_gradient_and_its_lora_on_the_attention_projections(folders, loaded, family):
    _, pipe = loaded(family)
    model = StableDiffusion(str(folders[family]), device="cpu", precision=torch.float64, lora_lr=1e-2)
    t, scale = 300, 7.5
    x = randn(model, 6).requires_grad_(True)
    noise = randn(model, 7)
    model.get_vsd_loss(x, embeddings(model, NEGATIVE, PROMPT), guidance_scale=scale, t=t, noise=noise).backward()
    alpha, sigma = path(pipe, t)
    x_t = alpha * x.detach() + sigma * noise
    # A fresh LoRA is zero (peft's B = 0), so eps_phi is the pretrained conditional prediction itself.
    expected = reference_cfg(pipe, x_t, t, [NEGATIVE], [PROMPT], scale) - reference_eps(pipe, x_t, t, [PROMPT])
    assert expected.abs().mean() > 0.1
    assert torch.allclose(x.grad, expected, atol=ATOL)
    # The LoRA wraps every attention projection of the denoiser (SD 3: both attentions of a dual block) and learned.
    denoiser = pipe.transformer if family == "sd3" else pipe.unet  # the pipeline's own, without a LoRA
    projections = {name for name, module in denoiser.named_modules()
                   if isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0"))}
    wrapped = {name for name, module in model.unet.named_modules() if hasattr(module, "lora_A")}
    assert projections and wrapped == projections
    if family == "sd3":
        assert "transformer_blocks.0.attn2.to_q" in wrapped and "transformer_blocks.1.attn.to_out.0" in wrapped
    assert any(p.abs().max() > 0 for name, p in model.unet.named_parameters() if "lora_B" in name)


# ----------------------------------------------------------------------------------------- the path
def test_rectified_flow_path_posterior_and_velocity_to_eps():
    flow = RectifiedFlow(1000)
    assert flow.alpha(250) == 0.75 and flow.sigma(250) == 0.25 and (flow.alpha(-1), flow.sigma(-1)) == (1.0, 0.0)
    table = flow.alpha_sigma_table()
    assert torch.equal(table[:, 1], torch.arange(1000, dtype=torch.float64) / 1000)
    assert torch.equal(table[:, 0] + table[:, 1], torch.ones(1000, dtype=torch.float64))
    x0, eps = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    x_t = flow.add_noise(x0, eps, 600)
    assert torch.allclose(x_t, 0.4 * x0 + 0.6 * eps, atol=1e-15)
    a, b = flow.eps_coefficients("flow")[600]
    assert torch.allclose(a * (eps - x0) + b * x_t, eps, atol=1e-14)  # velocity v = eps - x0 -> eps
    assert torch.allclose(flow.predict_x0(x_t, eps, 600), x0, atol=1e-14)
    for t, s in ((600, 599), (900, 100), (2, 1)):
        # q(x_s | x_t, x0) must keep the path's marginal at s: c_x0 + c_xt alpha_t = alpha_s and
        # c_xt^2 sigma_t^2 + std^2 = sigma_s^2.
        c_x0, c_xt, std = flow.posterior_coefficients(t, s)
        assert math.isclose(c_x0 + c_xt * flow.alpha(t), flow.alpha(s), abs_tol=1e-12)
        assert math.isclose(c_xt**2 * flow.sigma(t) ** 2 + std**2, flow.sigma(s) ** 2, abs_tol=1e-12)
    with pytest.raises(ValueError, match="point mass"):
        flow.posterior_coefficients(1, 0)
    with pytest.raises(TypeError, match="no alpha-bar"):
        flow.alpha_bar(10)


# ----------------------------------------------------------------------------------------- the CLI
def method_argv(name: str, folder, save_dir, src) -> list[str]:
    argv = ["--model", str(folder), "--prompt", "a red circle", "--loss_type", name, "--save_dir", str(save_dir),
            "--step", "2", "--log_step", "0", "--device", "cpu"]
    if METHODS[name].edits:
        argv += ["--edit_prompt", "a blue circle", "--src_img_path", str(src)]
    return argv


@pytest.fixture(scope="module")
def src_img(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "src.png"
    Image.new("RGB", (24, 16), (200, 30, 30)).save(path)  # not square: PDS resizes it to the model's multiple
    return path


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_from_main_on_every_family(folders, src_img, tmp_path, family, name):
    # main.main encodes the run's prompts (run_prompts), frees the text encoders, then runs: a prompt that
    # run_prompts missed fails here
    assert main.main(method_argv(name, folders[family], tmp_path, src_img)) == 0
    stem = "a_blue_circle" if METHODS[name].edits else "a_red_circle"
    config = json.loads((tmp_path / stem / "run_config.json").read_text())
    assert config["status"] == "finished" and config["loss_type"] == name
    assert Image.open(tmp_path / f"{stem}.png").size == ((24, 16) if METHODS[name].edits else (16, 16))
    assert math.isfinite(config["max_abs"]) and config["unet_rows"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_run_all_runs_every_method_on_every_family(folders, src_img, tmp_path, family, monkeypatch):
    loaded_models = []
    real_build = main.build_model
    monkeypatch.setattr(main, "build_model", lambda args: loaded_models.append(real_build(args)) or loaded_models[-1])
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"a_cat": {"prompt": "a cat", "edit_prompt": "a dog", "img_path": str(src_img)}}))
    out = tmp_path / "out"
    argv = ["--model", str(folders[family]), "--prompts", str(prompts), "--out", str(out), "--tasks", *run_all.TASKS,
            "--step", "2", "--log_step", "0", "--device", "cpu", "--no_eval", "--no_report"]
    assert run_all.main(argv) == 0
    for task in run_all.TASKS:
        stem = "a_dog" if METHODS[task].edits else "a_cat"
        assert (out / task / f"{stem}.png").is_file(), task
    model, = loaded_models  # one model for every run, its text encoders freed after the batch's prompts
    assert model.text_encoder is None and model._text_encoders_freed


def test_run_prompts_lists_what_a_run_encodes(tmp_path):
    base = ["--model", "toy", "--prompt", "a circle", "--save_dir", str(tmp_path)]
    args = main.parse_args(base + ["--loss_type", "bridge"])
    assert run_prompts(args) == ["", "a circle", "a circle" + args.bridge_src_modifier,  # the bridge's uncond: ""
                                 "a circle" + args.bridge_tgt_modifier]
    assert "" in run_prompts(main.parse_args(base + ["--loss_type", "nfsd"]))


def test_free_text_encoders_keeps_the_cache_and_refuses_new_prompts(folders):
    model = StableDiffusion(str(folders["sdxl"]), device="cpu")
    model.encode_prompts([NEGATIVE, PROMPT, NEGATIVE])
    before = model.get_text_embeds(PROMPT)
    model.free_text_encoders()
    assert model.text_encoder is None and model.text_encoder_2 is None
    assert model.get_text_embeds(PROMPT) is before
    with pytest.raises(RuntimeError, match="freed"):
        model.get_text_embeds("a new prompt")


def test_sdxl_vae_stays_float32_in_fp16_unless_it_is_an_fp16_fix(folders, tmp_path):
    import shutil

    model = StableDiffusion(str(folders["sdxl"]), device="cpu", precision="fp16")
    assert model.unet.dtype == torch.float16 and model.vae.dtype == torch.float32
    assert StableDiffusion(str(folders["sdxl"]), device="cpu", precision="bf16").vae.dtype == torch.bfloat16
    fixed = shutil.copytree(folders["sdxl"], tmp_path / "fixed")
    config = json.loads((fixed / "vae" / "config.json").read_text())
    (fixed / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    assert StableDiffusion(str(fixed), device="cpu", precision="fp16").vae.dtype == torch.float16


# ----------------------------------------------------------------------------------------- errors
def run_main(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: main.main(argv))
    _, err = capsys.readouterr()
    return exc.value.code, err


def broken(folders, tmp_path, case: str):
    """Return a folder (or name) for one kind of unsupported or broken model."""
    import shutil

    folder = tmp_path / case
    if case == "flux_index":
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    elif case == "flux_transformer":
        (folder / "transformer").mkdir(parents=True)
        (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    elif case == "unknown_class":
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    elif case == "bad_json":
        folder.mkdir()
        (folder / "model_index.json").write_text("{not json")
    elif case == "missing_part":
        shutil.copytree(folders["sdxl"], folder)
        shutil.rmtree(folder / "text_encoder_2")
    elif case == "damaged_weights":
        shutil.copytree(folders["sd3"], folder)
        (folder / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    elif case == "empty":
        folder.mkdir()
    else:
        return case
    return str(folder)


@pytest.mark.parametrize("case, words", [
    ("flux_index", ["is a FluxPipeline", "FLUX.1 is not supported", "guidance-distilled", "true classifier-free"]),
    ("flux_transformer", ["FluxTransformer2DModel", "FLUX.1 is not supported"]),
    ("unknown_class", ["KandinskyV22Pipeline", "does not load", "StableDiffusionXLPipeline"]),
    ("bad_json", ["model_index.json is not valid JSON"]),
    ("missing_part", ["not a complete SDXL folder: text_encoder_2/ missing"]),
    ("damaged_weights", ["could not load the SD 3 model in", "incomplete or damaged"]),
    ("empty", ["not a diffusers Stable Diffusion folder"]),
    ("sd35m", ["could not load Stable Diffusion weights from 'sd35m'", "gated",
               "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium", "hf auth login"]),
    ("sdxl", ["could not load Stable Diffusion weights from 'sdxl'"]),
    ("black-forest-labs/FLUX.1-dev", ["could not load Stable Diffusion weights", "guidance-distilled"]),
])
def test_unsupported_and_broken_models_get_one_clear_error(folders, tmp_path, capsys, case, words):
    code, err = run_main(["--model", broken(folders, tmp_path, case), "--prompt", "a cat", "--device", "cpu",
                          "--save_dir", str(tmp_path / "out")], capsys)
    # transformers' "Loading weights" progress bars (the parts that loaded before the broken one) may precede it
    message = [line for line in err.replace("\r", "\n").splitlines() if line and not line.startswith("Loading weights")]
    assert code == 2 and "Traceback" not in err and len(message) == 1
    for word in words:
        assert word in err


@pytest.mark.parametrize("flags, model, words", [
    (["--no_t5"], "sdxl", "--no_t5 leaves SD 3's T5 text encoder unloaded, but"),
    (["--cpu_offload"], "sd3", "--cpu_offload moves the text encoders and the VAE"),
    (["--no_t5"], "toy", "--no_t5 is for Stable Diffusion models, not the toy world"),
    (["--lora_checkpointing"], "sdxl", "--lora_checkpointing is for the methods that train a LoRA (vsd), not sds"),
    (["--lora_checkpointing", "--loss_type", "vsd"], "toy", "--lora_checkpointing is for Stable Diffusion models"),
])
def test_family_flags_are_checked(folders, tmp_path, capsys, flags, model, words):
    code, err = run_main(["--model", str(folders.get(model, model)), "--prompt", "a cat", "--device", "cpu",
                          "--save_dir", str(tmp_path), *flags], capsys)
    assert code == 2 and words in err


@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_sds_gradient_stays_near_float32(folders, family):
    """fp16 / bf16 denoisers (SDXL's VAE in fp32) give float32 gradients within their rounding of fp32's: measured
    relative errors ~3e-3 (fp16) and ~2-3e-2 (bf16); conditioning lost or garbled by a cast (the pooled row, the
    time ids, T5's part) would be O(1)."""
    grads = {}
    for precision in ("fp32", "fp16", "bf16"):
        model = StableDiffusion(str(folders[family]), device="cpu", precision=precision)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(model.latent_shape(), generator=generator).requires_grad_(True)
        noise = torch.randn(model.latent_shape(), generator=generator)
        model.get_sds_loss(x, embeddings(model, NEGATIVE, PROMPT), guidance_scale=7.5, t=500, noise=noise).backward()
        assert x.grad.dtype == torch.float32
        grads[precision] = x.grad
    for precision, tolerance in (("fp16", 1e-2), ("bf16", 6e-2)):
        error = ((grads[precision] - grads["fp32"]).norm() / grads["fp32"].norm()).item()
        assert error < tolerance, (precision, error)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_checkpointing_recomputes_in_the_backward_and_changes_nothing_else(folders, family):
    """--lora_checkpointing: two VSD steps give the same gradients and LoRA weights as without it, and the
    denoiser's last block runs again inside the LoRA's backward (a hook counts its calls)."""
    runs = {}
    for checkpointing in (False, True):
        model = StableDiffusion(str(folders[family]), device="cpu", precision=torch.float64, lora_lr=1e-2,
                                lora_checkpointing=checkpointing)
        # what diffusers checkpoints: each MMDiT block; a UNet block's resnets and attentions one by one
        block = model.unet.transformer_blocks[-1] if family == "sd3" else model.unet.up_blocks[0].resnets[-1]
        forwards = []
        # a pre-hook: checkpointing's recompute stops once it has what the backward needs, before a block returns
        block.register_forward_pre_hook(lambda *_: forwards.append(torch.is_grad_enabled()))
        grads = []
        torch.manual_seed(0)  # the LoRA trains at a fresh t and noise drawn from the global generator
        for step in range(2):
            x = randn(model, 10 + step).requires_grad_(True)
            model.get_vsd_loss(x, embeddings(model, NEGATIVE, PROMPT), guidance_scale=7.5, t=300 + step,
                               noise=randn(model, 20 + step)).backward()
            grads.append(x.grad)
        lora = {name: p.detach().clone() for name, p in model.unet.named_parameters() if "lora_" in name}
        runs[checkpointing] = grads, lora, forwards
    (grads, lora, plain), (grads_ckpt, lora_ckpt, recomputed) = runs[False], runs[True]
    for g, g_ckpt in zip(grads, grads_ckpt):
        assert torch.allclose(g, g_ckpt, atol=1e-10)
    assert lora.keys() == lora_ckpt.keys() and all(torch.allclose(lora[k], lora_ckpt[k], atol=1e-12) for k in lora)
    # per VSD step: the no_grad CFG pass, the LoRA's no_grad pass at x_t (fresh t), its training forward; with
    # checkpointing the training forward runs once more, with autograd, in the backward
    assert plain.count(True) == 2 and recomputed.count(True) == 4
