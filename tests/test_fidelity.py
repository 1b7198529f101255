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
