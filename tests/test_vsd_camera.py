"""VSD's LoRA sees the camera as ProlificDreamer's does: eps_phi(x_t, t, y, c) through a camera embedding added to the
denoiser's timestep embedding while the adapters run; the pretrained branch and 2D runs never see it."""
import pytest
import torch

from benchmarks.random_sd import build_random_sd
from guidance.cameras import Camera
from guidance.sd import StableDiffusion
from guidance.toy3d import Toy3DDiffusion


def cameras(*azimuths) -> torch.Tensor:
    return torch.stack([Camera(15.0, az, 1.75, 55.0).c2w().flatten() for az in azimuths]).float()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_sd_dir):
    sd3 = build_random_sd(tmp_path_factory.mktemp("sd3") / "sd3", "tiny-sd3", seed=3, t5=False)
    return {"sd": StableDiffusion(str(tiny_sd_dir), device="cpu", lora_lr=1e-2),
            "sd3": StableDiffusion(str(sd3), device="cpu", lora_lr=1e-2),
            "toy3d": Toy3DDiffusion()}


@pytest.mark.parametrize("family", ["sd", "sd3", "toy3d"])
def test_the_lora_learns_to_tell_cameras_apart_and_the_pretrained_branch_ignores_them(models, family):
    """Mutants caught: a camera embedding added with the adapters off (the pretrained eps would move), or one never
    trained (its output stays zero: eps_phi would not depend on the camera)."""
    model = models[family]
    model.reset_lora()
    torch.manual_seed(0)
    x = torch.randn(model.latent_shape(2))
    text = torch.cat([model.get_text_embeds(""), model.get_text_embeds("a red cube")])
    cond = text[1:].expand(2, *text.shape[1:])
    two = cameras(0.0, 180.0)
    with torch.no_grad(), model.lora_disabled():
        plain = model.predict_eps(x, 500, cond)
    for _ in range(3):
        model.get_vsd_loss(x.clone().requires_grad_(True), text, t=500, cameras=two)
    assert model.lora_camera is not None and any(p.abs().sum() > 0 for p in model.lora_camera[2].parameters())
    with torch.no_grad():
        with model.lora_disabled(), model.lora_cameras(two):
            assert torch.equal(model.predict_eps(x, 500, cond), plain)  # the pretrained model never sees cameras
        with model.lora_cameras(two):
            front_back = model.predict_eps(x, 500, cond)
        with model.lora_cameras(cameras(180.0, 0.0)):
            back_front = model.predict_eps(x, 500, cond)
    assert (front_back - back_front).abs().max() > 1e-6  # eps_phi depends on the camera
    model.reset_lora()
    assert model.lora_camera is None


def test_vsd_without_cameras_adds_no_camera_embedding(models):
    model = models["sd"]
    model.reset_lora()
    text = torch.cat([model.get_text_embeds(""), model.get_text_embeds("a cat")])
    model.get_vsd_loss(torch.randn(model.latent_shape(1), requires_grad=True), text, t=300)
    assert getattr(model, "lora_camera", None) is None
    model.reset_lora()
