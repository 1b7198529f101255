"""The toy 3D world (guidance/toy3d.py): its UNet is the exact MMSE predictor of its (object, view) mixture, its
prompts select objects and views, and its renderer agrees with guidance/cameras.py's projection.

What each test would catch: a wrong term in the colour-factored |mu|^2 or posterior mean, or the prior taken as a
log-prior (dense float64 brute force on a small grid, with an interpolated prior); a parser that ignores unknown
words as the 2D world does ("a photo of a cat" must fail); view phrases selecting the wrong azimuths or a mirrored
azimuth; a renderer in another camera convention (silhouette against projected corners; the front face at
azimuth 0); a scorer that does not grade.
"""
import pytest
import torch
from PIL import Image

from guidance.cameras import Camera
from guidance.common import UserError
from guidance.toy3d import (COLOURS, CUBE_HALF_SIDE, OBJECTS, SPHERE_RADIUS, Object3D, Toy3DDiffusion, Toy3DScorer,
                            ViewGrid, parse_prompt, render_object)

SMALL = ViewGrid(azimuths=8, elevations=2, distances=1, fovys=2)


@pytest.fixture(scope="module")
def small():
    return Toy3DDiffusion(grid=SMALL, size=16)


@pytest.fixture(scope="module")
def world():
    return Toy3DDiffusion()


@pytest.fixture(scope="module")
def dense_means(small):
    """The small world's [K, 3 * P] template bank, rendered one (object, view) at a time, k = o * V + v."""
    cameras = small.grid.cameras()
    return torch.stack([render_object(o, c, small.resolution)[:3].double().flatten() * 2 - 1
                        for o in OBJECTS for c in cameras])


def brute_force_eps(model, means, x_t, t, prior):
    """The mixture's MMSE noise prediction from the dense template bank, in float64, straight from its definition."""
    abar = model.schedule.alphas_cumprod[t]
    a, b = abar.sqrt(), (1 - abar).sqrt()
    v = a**2 * 0.05**2 + b**2
    x = x_t.double().reshape(x_t.shape[0], -1)
    log_p = torch.where(prior > 0, prior.double().log(), torch.full_like(prior.double(), -torch.inf))
    log_w = log_p - ((x[:, None] - a * means[None]) ** 2).sum(-1) / (2 * v)
    w = torch.softmax(log_w, 1)
    return b * (x - a * w @ means) / v


@pytest.mark.parametrize("t", [30, 400, 900])
def test_unet_is_the_exact_mmse_predictor_of_the_mixture(small, dense_means, t):
    # Mutants caught (each run): the embedding taken as a log-prior (fails at every t); the 8 c_b . c_f A.F cross
    # term of |mu|^2 dropped (A and F overlap only in edge pixels: fails at t = 900, where the posterior is broad).
    gen = torch.Generator().manual_seed(t)
    front = small.get_text_embeds("a red cube with a yellow front, front view")
    side = small.get_text_embeds("a red cube with a yellow front, side view")
    priors = torch.cat([front, 0.3 * front + 0.7 * side, small.get_text_embeds(""),
                        small.get_text_embeds("a sphere with a green front")])
    # x near a fronted cube's template, so that the posterior is sharp at small t and the cross term matters.
    cube = render_object(Object3D("cube", "red", "yellow"), SMALL.cameras()[1], 16)[:3] * 2 - 1
    x0 = cube[None].expand(4, -1, -1, -1) + 0.3 * torch.randn(4, 3, 16, 16, generator=gen)
    x_t = small.schedule.add_noise(x0, torch.randn(4, 3, 16, 16, generator=gen), t).float()
    eps = small.predict_eps(x_t, t, priors).double().reshape(4, -1)
    expected = brute_force_eps(small, dense_means, x_t, t, priors)
    torch.testing.assert_close(eps, expected, atol=2e-5, rtol=1e-5)


def test_prompts_select_objects_and_views():
    assert parse_prompt("a red cube") == ([Object3D("cube", "red", "red")], None)
    blue = Object3D("sphere", "blue", "yellow")
    assert parse_prompt("A blue sphere with a yellow front, back view") == ([blue], "back")
    assert [str(o) for o in parse_prompt("a cube")[0]] == [f"a {c} cube" for c in COLOURS]
    assert len(parse_prompt("a sphere with a red front")[0]) == 4
    assert parse_prompt("")[0] == list(OBJECTS) and parse_prompt("low quality")[0] == list(OBJECTS)
    assert parse_prompt("a red cube, oversaturated, smooth, blurry")[0] == [Object3D("cube", "red", "red")]
    # Mutant caught: the 2D world's lenient parser, which ignores words it does not know.
    for bad in ("a photo of a cat", "a red cube and a blue sphere", "a purple cube", "red", "a red cube with a front"):
        with pytest.raises(UserError, match="colours red, green, blue, yellow"):
            parse_prompt(bad)


def test_view_phrases_select_their_azimuth_ranges(world):
    cameras = world.grid.cameras()
    selected = {}
    for view in ("front", "side", "back"):
        prior = world.get_text_embeds(f"a green cube, {view} view").view(len(OBJECTS), -1)
        on = prior[OBJECTS.index(Object3D("cube", "green", "green"))] > 0
        assert torch.allclose(prior.sum(), torch.tensor(1.0)) and prior.count_nonzero() == on.sum()
        selected[view] = sorted({round(cameras[v].azimuth) for v in on.nonzero().flatten().tolist()})
    # Azimuth cells centred every 10 degrees: front |az| < 45, back |az| > 135, side the rest (threestudio's).
    assert selected["front"] == list(range(-40, 50, 10))
    assert selected["back"] == [-180, -170, -160, -150, -140, 140, 150, 160, 170]
    assert selected["side"] == list(range(-130, -40, 10)) + list(range(50, 140, 10))
    with pytest.raises(UserError, match="no overhead view"):
        world.get_text_embeds("a green cube, overhead view")


def test_renderer_agrees_with_the_camera_projection():
    camera = Camera(elevation=25.0, azimuth=-35.0, distance=1.6, fovy=50.0)
    size = 48
    alpha = render_object(Object3D("cube", "red", "red"), camera, size, supersample=1)[3]
    # Independent silhouette: the union of the six projected faces (two triangles each) of the cube's corners.
    h = CUBE_HALF_SIDE
    corners = torch.tensor([[x, y, z] for x in (-h, h) for y in (-h, h) for z in (-h, h)], dtype=torch.float64)
    pixels, _ = camera.project(corners, size, size)
    faces = [(0, 1, 3, 2), (4, 5, 7, 6), (0, 1, 5, 4), (2, 3, 7, 6), (0, 2, 6, 4), (1, 3, 7, 5)]
    triangles = [(f[0], f[1], f[2]) for f in faces] + [(f[0], f[2], f[3]) for f in faces]
    cols, rows = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="xy")
    p = torch.stack([cols, rows], -1).double()
    inside = torch.zeros(size, size, dtype=torch.bool)
    for i, j, k in triangles:
        a, b, c = pixels[i], pixels[j], pixels[k]
        def side(u, v):
            return (v[0] - u[0]) * (p[..., 1] - u[1]) - (v[1] - u[1]) * (p[..., 0] - u[0])
        s1, s2, s3 = side(a, b), side(b, c), side(c, a)
        inside |= ((s1 >= 0) & (s2 >= 0) & (s3 >= 0)) | ((s1 <= 0) & (s2 <= 0) & (s3 <= 0))
    # Mutant caught: rows flipped (image y down vs up) or the camera on the other side: hundreds of pixels differ.
    assert int(((alpha > 0.5) != inside).sum()) <= 2
    # The sphere's silhouette: a disc whose radius the projection of its limb gives (to a pixel).
    disc = render_object(Object3D("sphere", "blue", "blue"), camera, size, supersample=1)[3] > 0.5
    centre, _ = camera.project(torch.zeros(1, 3, dtype=torch.float64), size, size)
    radius_px = ((disc.sum() / torch.pi) ** 0.5).item()
    d = camera.distance
    expected = camera.focal(size) * SPHERE_RADIUS / (d**2 - SPHERE_RADIUS**2) ** 0.5
    assert abs(radius_px - expected) < 0.5
    assert torch.allclose(centre[0], torch.tensor([size / 2, size / 2], dtype=torch.float64))


def test_the_front_is_plus_x_and_seen_from_azimuth_zero():
    obj = Object3D("cube", "red", "yellow")
    green = lambda az: float(render_object(obj, Camera(15.0, az, 1.75, 55.0), 32)[1, 16, 16])  # noqa: E731
    # Yellow (1, 1, 0.2) has green, red (1, 0.2, 0.2) has little: the front's shade is 0.5 + 0.5 * 0.6 / |l|.
    assert green(0.0) > 0.7 and green(180.0) < 0.15 and green(90.0) < 0.15 and green(-90.0) < 0.15
    assert green(30.0) > 0.7


def test_scorer_grades_front_views(world):
    scorer = Toy3DScorer()
    front = world.camera_ranges.middle()

    def image(obj):
        rgb = render_object(obj, front, 32)[:3]
        return Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))

    prompt = "a red cube with a yellow front"
    fronted, plain = image(Object3D("cube", "red", "yellow")), image(Object3D("cube", "red", "red"))
    noise = Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    scores = scorer.score([fronted, plain, noise, fronted], [prompt, prompt, prompt, "a cube with a yellow front"])
    # Mutant caught: a scorer that snaps (sigma 0.5: noise scores 0) or ignores the front (plain cube scores high).
    assert scores[0] > 0.95 and scores[1] < 1e-3 and scores[3] > 0.95
    assert 1e-3 < scores[2] < 0.1


def test_every_loss_runs_in_the_toy_3d_world_with_one_cond_row_per_view(small):
    # VSD's LoRA (the ToyUNet residual), ISM / SDI's inversion under "" and NFSD's null row must all take the
    # prior embeddings; the cond rows here differ per view, as view prompts make them.
    latents = (render_object(Object3D("cube", "red", "yellow"), SMALL.cameras()[0], 16)[:3] * 2 - 1)[None]
    latents = latents.repeat(2, 1, 1, 1).requires_grad_(True)
    cond = torch.cat([small.get_text_embeds("a red cube with a yellow front, front view"),
                      small.get_text_embeds("a red cube with a yellow front, back view")])
    embeddings = torch.cat([small.get_text_embeds("").expand(2, -1), cond])
    for name in ("sds", "vsd", "nfsd", "csd", "asd", "ism", "sdi", "bridge"):
        loss = getattr(small, f"get_{name}_loss")(latents, embeddings, guidance_scale=7.5, t=300)
        (grad,) = torch.autograd.grad(loss, latents)
        assert torch.isfinite(grad).all() and grad.shape == latents.shape, name
    assert small.last_lora_loss is not None
    small.reset_lora()
    # At a template of the front view's mixture, SDS pulls the back view's row away from it, not the front's.
    small.get_sds_loss(latents, embeddings, guidance_scale=1.0, t=50, noise=torch.zeros_like(latents))
    pull = small.last_guidance["grad"].abs().mean((1, 2, 3))
    assert pull[1] > 10 * pull[0]


def test_the_worlds_weighting_replaces_the_courses_uniform_only():
    """toy3d's sigma_over_alpha is what its results were measured with (main.py's 500-step fronted cube: eval.py
    0.92 against 0.01 under 'uniform'); methods whose papers give a weighting keep theirs; the 2D toy keeps uniform."""
    from guidance.config import RunConfig

    def weighting(model, method, **flags):
        return RunConfig(prompt="a red cube", model=model, loss_type=method, generator="nerf" if model == "toy3d"
                         else "latent", **flags).resolved().weighting

    assert weighting("toy3d", "sds") == weighting("toy3d", "vsd") == "sigma_over_alpha"
    assert weighting("toy3d", "nfsd") == "dreamfusion" and weighting("toy3d", "ism") == "sigma_over_alpha"
    assert weighting("toy3d", "sds", weighting="uniform") == "uniform"  # a flag still wins
    assert RunConfig(prompt="a red circle", model="toy", loss_type="sds").resolved().weighting == "uniform"
