"""Generators x = g(theta): pixels, 2D Gaussians and vector shapes under every loss (guidance/generators.py).

What each test would catch: a compositor that drops, reorders or double-counts shapes (dense reference); chunks
composed wrongly or recomputed differently in backward (chunked == unchunked); a hard inside test or a distance
without gradients (control points' finite differences); an SVG that paints in another order, scale or colour
than the render (cairosvg); a parameter group cut off from the loss (tiny SD gradients); a generator that cannot
reach a prompt's template in the toy world with main.py's defaults.
"""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import main
import guidance.generators as generators
from guidance.generators import GENERATORS, apply_views, build_generator, composite, random_views
from guidance.toy import ToyDiffusion, from_pil, nearest_template
from utils import UserError, pil_to_torch

RENDERED = ("pixels", "gaussians", "vector")


@pytest.fixture(scope="module")
def toy():
    return ToyDiffusion()


def cairo_render(svg: str, width: int, height: int) -> np.ndarray:
    cairosvg = pytest.importorskip("cairosvg", reason="the SVG check needs cairosvg (pip) and libcairo2 (apt)")
    png = cairosvg.svg2png(bytestring=svg.encode(), output_width=width, output_height=height)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255


# ----------------------------------------------------------------------------------------------- the rasteriser
def test_local_compositing_equals_a_dense_front_to_back_reference(toy):
    gen = build_generator("gaussians", toy, render_size=32, num_shapes=40, seed=3)
    with torch.no_grad():
        g = gen.constrained(0)
        coords = (torch.arange(32) + 0.5) / 16 - 1
        y, x = torch.meshgrid(coords, coords, indexing="ij")
        u1 = (x - g["centre"][:, 0, None, None]) / g["a"][:, None, None]
        u2 = (y - g["centre"][:, 1, None, None] - g["b"][:, None, None] * u1) / g["c"][:, None, None]
        inside_box = (u1.abs() <= 3) & ((y - g["centre"][:, 1, None, None]).abs()
                                        <= 3 * torch.sqrt(g["b"]**2 + g["c"]**2)[:, None, None])
        alpha = g["opacity"][:, None, None] * torch.exp(-0.5 * (u1**2 + u2**2)) * inside_box
        image, transmittance = torch.zeros(3, 32, 32), torch.ones(32, 32)
        for k in range(40):  # shape 0 in front
            image += g["colour"][k, :, None, None] * alpha[k] * transmittance
            transmittance = transmittance * (1 - alpha[k])
        image += g["background"][:, None, None] * transmittance
        torch.testing.assert_close(gen.render()[0], image, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", ["gaussians", "vector"])
def test_chunks_recomputed_in_backward_give_the_same_image_and_gradients(toy, monkeypatch, name):
    gen = build_generator(name, toy, render_size=32, num_shapes=40, seed=3)
    weights = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def image_and_grads():
        for p in gen.parameters():
            p.grad = None
        image = gen.render()
        (image * weights).sum().backward()
        return image.detach(), [p.grad.clone() for p in gen.parameters()]

    whole, whole_grads = image_and_grads()
    real = composite
    calls = []
    monkeypatch.setattr(generators, "composite",
                        lambda *a, **k: (calls.append(1), real(*a, **{**k, "fragment_budget": 300}))[1])
    chunked, chunked_grads = image_and_grads()
    assert calls  # the chunked path really ran
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    for a, b in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("group", ["points", "circles"])
def test_vector_outline_gradient_matches_finite_differences(toy, group):
    """A hard inside test (or a detached distance) leaves the control points with no gradient: this fails then."""
    gen = build_generator("vector", toy, render_size=32, num_shapes=8, seed=1)
    param = gen.points if group == "points" else gen.circle_centre
    direction = torch.randn(param.shape, generator=torch.Generator().manual_seed(2)).double()
    weights = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)).double()

    def objective():
        return (gen.render().double() * weights).sum()

    objective().backward()
    analytic = float((param.grad.double() * direction).sum())
    h = 1e-3
    with torch.no_grad():
        param.add_(h * direction.float())
        plus = float(objective())
        param.sub_(2 * h * direction.float())
        minus = float(objective())
        param.add_(h * direction.float())
    numeric = (plus - minus) / (2 * h)
    assert abs(analytic) > 1e-2
    assert analytic == pytest.approx(numeric, rel=0.05)


def test_svg_paints_what_the_render_shows(toy):
    gen = build_generator("vector", toy, render_size=64, seed=1)  # 256 overlapping, half-transparent shapes
    with torch.no_grad():
        gen.points.add_(0.05 * torch.randn(gen.points.shape, generator=torch.Generator().manual_seed(0)))
    render = gen.image(toy)[0].permute(1, 2, 0).numpy()
    svg = cairo_render(gen.svg(0), 64, 64)
    assert np.abs(render - svg).mean() < 0.03  # measured 0.012: edges are everywhere in this scene
    # The same shapes painted in the other order (a plausible bug) are visibly another picture.
    with torch.no_grad():
        for p in (gen.points, gen.fill):
            p.copy_(p.flip(1))
    assert np.abs(render - cairo_render(gen.svg(0), 64, 64)).mean() > 0.05


def test_random_view_without_crop_or_distortion_is_the_identity_and_views_differ(toy):
    imgs = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    same = apply_views(imgs, random_views(2, torch.Generator().manual_seed(1), crop_area=(1.0, 1.0), distortion=0.0))
    torch.testing.assert_close(same, imgs, atol=1e-5, rtol=0)
    view = apply_views(imgs, random_views(2, torch.Generator().manual_seed(1)))
    assert view.shape == imgs.shape and (view - imgs).abs().mean() > 0.05
    view.sum().backward()
    assert imgs.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------- the interface
def test_latent_generator_is_the_latents_themselves(toy):
    latents = torch.randn(2, 3, 64, 64)
    gen = build_generator("latent", toy, batch=2, init_latents=latents)
    assert gen.latents(toy) is latents and latents.requires_grad
    assert [g["params"] for g in gen.param_groups(0.05)] == [[latents]]
    assert [g["lr"] for g in gen.param_groups(0.05)] == [0.05]
    torch.testing.assert_close(gen.image(toy), toy.decode_latents(latents))


@pytest.mark.parametrize("name", RENDERED)
def test_fit_reproduces_an_image(toy, name):
    source = from_pil(Image.open("data/toy_imgs/a_red_circle.png"))[None]  # a template plus a white patch
    gen = build_generator(name, toy, num_shapes=128 if name == "vector" else 256, fit_latents=source, fit_steps=150)
    image = gen.image(toy)
    assert float(((image - (source + 1) / 2) ** 2).mean()) < {"pixels": 1e-3, "gaussians": 4e-3, "vector": 4e-3}[name]
    assert nearest_template(image[0] * 2 - 1)[0].colour == "red"


@pytest.mark.parametrize("name", RENDERED)
def test_every_parameter_group_gets_a_gradient_through_the_vae(tiny_sd, name):
    gen = build_generator(name, tiny_sd, batch=2, num_shapes=32, augment=True)
    embeddings = torch.cat([tiny_sd.get_text_embeds(""), tiny_sd.get_text_embeds("a cat")])
    latents = gen.latents(tiny_sd)
    assert latents.shape == tiny_sd.latent_shape(2)
    tiny_sd.get_sds_loss(latents, embeddings, guidance_scale=7.5).backward()
    for group in gen.param_groups():
        for p in group["params"]:
            assert p.grad is not None and p.grad.abs().sum() > 0, group["name"]


# ----------------------------------------------------------------------------------------------- main.py
@pytest.mark.parametrize("name", RENDERED)
def test_toy_sds_with_every_generator_paints_the_prompt(tmp_path, name):
    """The issue's command, at main.py's defaults (500 steps): its nearest template is a blue square."""
    out = tmp_path / "out"
    code = main.main(["--model", "toy", "--generator", name, "--prompt", "a blue square", "--loss_type", "sds",
                      "--save_dir", str(out)])
    assert code == 0
    png = Image.open(out / "a_blue_square.png")
    template, _ = nearest_template(from_pil(png))
    assert (template.colour, template.shape) == ("blue", "square")
    if name == "vector":
        svg = cairo_render((out / "a_blue_square.svg").read_text(), 64, 64)
        assert np.abs(svg - pil_to_torch(png)[0].permute(1, 2, 0).numpy()).mean() < 0.01  # measured 0.0012
    if name == "gaussians":
        saved = torch.load(out / "a_blue_square.gaussians.pt")
        assert saved["images"][0]["centre"].shape == (256, 2)


@pytest.mark.parametrize("loss_type", ["sds", "pds", "vsd"])
@pytest.mark.parametrize("name", RENDERED)
def test_cli_runs_every_loss_with_every_generator_on_tiny_sd(tiny_sd_dir, tmp_path, monkeypatch, name, loss_type):
    monkeypatch.setattr(generators, "FIT_STEPS", 10)  # the edit's fit to its source: a few steps are enough here
    source = tmp_path / "src.png"
    Image.new("RGB", (40, 24), (200, 30, 30)).save(source)
    out = tmp_path / "out"
    argv = ["--model", str(tiny_sd_dir), "--prompt", "a cat", "--loss_type", loss_type, "--step", "2",
            "--log_step", "1", "--save_dir", str(out), "--device", "cpu", "--generator", name, "--num_shapes", "16"]
    if name == "pixels":
        argv = argv[:-2] + ["--pixel_size", "8"]
    if loss_type == "pds":
        argv += ["--edit_prompt", "a dog", "--src_img_path", str(source)]
    if loss_type == "vsd":
        argv += ["--num_particles", "2"]
    assert main.main(argv) == 0
    stem = "a_dog" if loss_type == "pds" else "a_cat"
    # An edit keeps its source's shape (40x24 -> 28x16 for the tiny model); generation is the model's 16x16.
    assert Image.open(out / f"{stem}.png").size == ((28, 16) if loss_type == "pds" else (16, 16))
    assert (out / f"{stem}.svg").exists() == (name == "vector")
    if name == "vector" and loss_type == "vsd":
        assert (out / stem / "particles" / "particle_1.svg").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--render_size", "128"], "--render_size is for --generator pixels / gaussians / vector / nerf / mesh, not latent"),
    (["--generator", "pixels", "--num_shapes", "8"], "--num_shapes is for --generator gaussians / vector"),
    (["--augment"], "--augment is for"),
    (["--generator", "vector", "--num_shapes", "0"], "--num_shapes 0 must be between 1 and"),
    (["--generator", "gaussians", "--render_size", "4"], "--render_size 4 must be between 8 and"),
])
def test_bad_generator_flags_fail_before_loading(tmp_path, flags, fragment):
    with pytest.raises(UserError, match=fragment):
        main.parse_args(["--model", "toy", "--prompt", "a red circle", "--save_dir", str(tmp_path)] + flags)


def test_generator_names_are_the_clis(tmp_path):
    assert GENERATORS == ("latent", "pixels", "gaussians", "vector", "nerf", "mesh")
    config = main.parse_args(["--model", "toy", "--prompt", "a red circle", "--save_dir", str(tmp_path)])
    assert config.generator == "latent"
    choices = next(a for a in main.build_parser()._actions if a.dest == "generator").choices
    assert tuple(choices) == GENERATORS


def test_bench_reports_every_generator_against_the_floor(tiny_sd_dir, capsys):
    import json

    import bench

    assert bench.main(["--model", str(tiny_sd_dir), "--device", "cpu", "--generators", "latent", "vector",
                       "--render_size", "64", "--num_shapes", "32", "--steps", "2", "--warmup", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["generators"]) == ["latent", "vector"] and result["render_size"] == 64
    vector = result["generators"]["vector"]
    for item in ("render", "encode", "step"):
        assert vector[item] > 0 and vector[f"{item}_x_floor"] > 0
    assert "render" not in result["generators"]["latent"]  # the latent renders nothing: no figure, not a zero
    assert 0 < vector["render_peak_added_mb"] < 2000
