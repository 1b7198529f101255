"""The NeRF generator (guidance/nerf.py): volume rendering against analytic fields, gradients, the front view,
checkpoints, every loss on a tiny random SD, and text-to-3D in the exact toy 3D world (the minimal loop is
benchmarks/toy3d.py's distil(), which also measures the Janus table).

What each test would catch: an inclusive transmittance or wrong interval lengths (a constant-density ball's
opacity is 1 - exp(-sigma * chord)); a background that is not composited by 1 - opacity; a parameter group cut off
from the loss (background MLP, planes through the normals); a front view at the wrong azimuth; a resume from another
configuration; a loss that cannot take one cond row per view; and, in the toy world, a renderer or loop that
ignores the camera (turntable against the true object's renders, the yellow front seen from the front only).
"""
import math
from types import SimpleNamespace

import pytest
import torch

from benchmarks.toy3d import distil, turntable_scores
from guidance.cameras import Camera, CameraSampler, turntable
from guidance.common import UserError
from guidance.nerf import NerfGenerator, render_rays
from guidance.views import ViewPrompts


class BallField(torch.nn.Module):
    """Density sigma inside |p| < radius, zero outside; yellow where x > 0.2, red elsewhere (logits)."""

    def __init__(self, sigma=3.0, radius=0.6):
        super().__init__()
        self.sigma, self.radius = sigma, radius

    def density(self, p):
        return self.sigma * (p.norm(dim=-1) < self.radius).to(p.dtype)

    def forward(self, p):
        yellow, red = torch.tensor([5.0, 5.0, -5.0]).to(p), torch.tensor([5.0, -5.0, -5.0]).to(p)
        return self.density(p), torch.where(p[:, :1] > 0.2, yellow, red)


def stub_model(resolution=32):
    return SimpleNamespace(device=torch.device("cpu"), resolution=resolution, latent_size=resolution,
                           latent_channels=3, encode_imgs=lambda imgs, requires_grad=False: imgs * 2 - 1)


# ----------------------------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("samples, importance, tolerance", [(128, 0, 0.05), (64, 64, 0.05)])
def test_constant_density_ball_opacity_is_one_minus_exp_of_the_chord(samples, importance, tolerance):
    # Mutant caught: transmittance including each sample's own alpha (opacity falls by up to ~0.3 here).
    ball = BallField(sigma=3.0, radius=0.6)
    camera = Camera(elevation=20.0, azimuth=40.0, distance=1.8, fovy=50.0)
    origins, directions = (r.reshape(-1, 3).double() for r in camera.rays(24, 24, dtype=torch.float64))
    out = render_rays(ball, origins, directions, samples, importance)
    # Distance of each ray's line to the centre, then the chord through the ball.
    miss = torch.linalg.cross(origins, directions).norm(dim=-1)
    chord = 2 * (0.6**2 - miss**2).clamp(min=0).sqrt()
    expected = 1 - torch.exp(-3.0 * chord)
    # Deterministic midpoint samples: each boundary misplaces at most half a bin (span / samples <= 2 / 128) of
    # optical depth sigma * 0.008 per side, so |error| <= 1 - exp(-0.047) < 0.05 per ray, and ~0 on average.
    error = (out["opacity"] - expected).abs()
    assert error.max() < tolerance and error.mean() < 0.01
    assert expected.max() > 0.95 and (chord == 0).sum() > 20  # rays through the middle and rays that miss


def test_image_is_the_colour_over_the_background_by_one_minus_opacity():
    gen = NerfGenerator(stub_model(), render_size=24, samples=96, importance=0, shading="albedo", background="white")
    gen.field = BallField(sigma=2.0, radius=0.5)  # translucent: opacities between 0 and 0.87
    camera = Camera(10.0, 0.0, 1.7, 50.0)
    out = gen.render_views([camera], training=False, background=(0.2, 0.4, 0.6))
    opacity = out["opacity"][0]
    rgba = gen.render_rgba(camera)  # the premultiplied colour: over black
    expected = rgba[:3] + (1 - opacity) * torch.tensor([0.2, 0.4, 0.6]).view(3, 1, 1)
    torch.testing.assert_close(out["image"][0], expected, atol=1e-6, rtol=0)
    assert 0.5 < float(opacity.max()) < 0.9 and float(opacity.min()) == 0.0
    # Mutant caught: a background added without the (1 - opacity) factor (the rays that miss are exact either way).
    assert float((out["image"][0] - rgba[:3] - torch.tensor([0.2, 0.4, 0.6]).view(3, 1, 1)).abs().max()) > 0.3


def test_gradients_reach_every_parameter_group():
    # Mutants caught: a background composited from a detached MLP output, a group missing from param_groups.
    gen = NerfGenerator(stub_model(), render_size=16, samples=16, importance=8, grid_resolution=16, shading="random",
                        albedo_steps=0, background="mlp", regularizers={"orientation": 1.0, "sparsity": 1.0,
                                                                         "entropy": 1.0})
    sampler = CameraSampler(views_per_step=2, generator=torch.Generator().manual_seed(0))
    model = stub_model()
    for shading in ("lambertian", "textureless"):
        gen.shading = shading
        latents = gen.latents(model, sampler())
        assert latents.shape == (2, 3, 32, 32)
        weights = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
        reg = gen.regularization()
        assert float(reg.detach()) > 0
        for group in gen.param_groups():
            for p in group["params"]:
                p.grad = None
        ((latents * weights).sum() + reg).backward()
        for group in gen.param_groups():
            norm = sum(float(p.grad.norm()) for p in group["params"] if p.grad is not None)
            assert math.isfinite(norm) and norm > 0, (shading, group["name"])
    assert [g["name"] for g in gen.param_groups()] == ["grid", "mlp", "background"]
    assert [g["lr"] for g in gen.param_groups(0.2)] == [0.02, 0.002, 0.002]


def test_front_view_is_azimuth_zero_on_the_evaluation_background():
    model = SimpleNamespace(**vars(stub_model()), background=(0.0, 0.0, 0.0))
    gen = NerfGenerator(model, render_size=32, samples=96, importance=0, shading="albedo", background="random")
    gen.field = BallField(sigma=50.0)
    assert gen.front_camera() == Camera(17.5, 0.0, 1.75, 55.0)
    image = gen.image(model)
    assert image.shape == (1, 3, 32, 32)
    # The yellow cap (x > 0.2) faces azimuth 0; the corners are the black evaluation background.
    # Mutant caught: a front camera at azimuth 180 (the other common convention) sees red.
    torch.testing.assert_close(image[0, :, 16, 16], torch.sigmoid(torch.tensor([5.0, 5.0, -5.0])), atol=1e-4, rtol=0)
    assert float(image[0, :, 0, 0].abs().max()) == 0.0


def test_checkpoints_resume_and_refuse_another_configuration(tmp_path):
    model = stub_model()
    a = NerfGenerator(model, render_size=16, samples=8, importance=8, grid_resolution=16, shading="albedo",
                      background="mlp", generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(a.param_groups(), lr=0.1)
    camera = Camera(10.0, 30.0, 1.7, 50.0)
    for _ in range(2):
        optimizer.zero_grad()
        a.latents(model, [camera]).square().mean().backward()
        optimizer.step()
    path = a.save_checkpoint(tmp_path / "nerf.pt")
    b = NerfGenerator(model, render_size=16, samples=8, importance=8, grid_resolution=16, shading="albedo",
                      background="mlp", generator=torch.Generator().manual_seed(5))
    assert not torch.equal(a.render_rgba(camera), b.render_rgba(camera))
    b.restore(torch.load(path))
    torch.testing.assert_close(a.render_rgba(camera), b.render_rgba(camera), atol=0, rtol=0)
    assert b.steps == 2
    c = NerfGenerator(model, render_size=16, samples=8, importance=8, grid_resolution=32, shading="albedo",
                      background="mlp")
    with pytest.raises(UserError, match=r"grid_resolution 16 \(now 32\)"):
        c.restore(torch.load(path))


@pytest.mark.parametrize("options, message", [
    (dict(batch=2), "--views_per_step"), (dict(shading="phong"), "albedo, lambertian"),
    (dict(latent_render=True, shading="lambertian"), "--shading albedo"),
    (dict(regularizers={"tv": 1.0}), "orientation, sparsity, entropy"), (dict(background="grey"), "random, mlp"),
])
def test_bad_options_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        NerfGenerator(stub_model(), **options)


# ----------------------------------------------------------------------------------------------- tiny SD
LOSSES = {
    "sds": lambda m, x, e: m.get_sds_loss(x, e, guidance_scale=7.5),
    "vsd": lambda m, x, e: m.get_vsd_loss(x, e, guidance_scale=7.5),
    "nfsd": lambda m, x, e: m.get_nfsd_loss(x, e, guidance_scale=7.5),
    "csd": lambda m, x, e: m.get_csd_loss(x, e, guidance_scale=7.5),
    "asd": lambda m, x, e: m.get_asd_loss(x, e, guidance_scale=7.5),
    "ism": lambda m, x, e: m.get_ism_loss(x, e, guidance_scale=7.5, inversion_steps=2),
    "sdi": lambda m, x, e: m.get_sdi_loss(x, e, guidance_scale=7.5, inversion_steps=2),
    "bridge": lambda m, x, e: m.get_bridge_loss(x, e, guidance_scale=7.5),
}


@pytest.mark.parametrize("latent_render", [False, True])
def test_every_loss_trains_the_nerf_on_a_tiny_random_sd(tiny_sd, latent_render):
    # Two views per step, one cond row per view (view prompts); every loss's gradient must reach the field.
    prompts = ViewPrompts("a corgi")
    tiny_sd.encode_prompts(prompts.prompts() + ["", "low quality"])
    gen = NerfGenerator(tiny_sd, render_size=16, samples=8, importance=8, grid_resolution=16, grid_channels=4,
                        hidden=16, shading="albedo" if latent_render else "random", albedo_steps=1,
                        latent_render=latent_render, generator=torch.Generator().manual_seed(0))
    sampler = CameraSampler(views_per_step=2, generator=torch.Generator().manual_seed(0))
    uncond = tiny_sd.get_text_embeds("low quality")
    before = [p.detach().clone() for p in gen.parameters()]
    optimizer = torch.optim.AdamW(gen.param_groups(), lr=0.1)
    for name, loss_fn in LOSSES.items():
        cameras = sampler()
        latents = gen.latents(tiny_sd, cameras)
        assert latents.shape == (2, 4, 8, 8) and latents.requires_grad
        embeddings = torch.cat([uncond.expand(2, -1, -1), prompts.embeddings(tiny_sd, cameras)])
        optimizer.zero_grad()
        (2000 * loss_fn(tiny_sd, latents, embeddings) + gen.regularization()).backward()
        grads = [p.grad for p in gen.field.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
        optimizer.step()
    tiny_sd.reset_lora()
    assert all(not torch.equal(b, p) for b, p in zip(before, gen.parameters()))
    assert gen.image(tiny_sd).shape == (1, 3, 16, 16)


# ----------------------------------------------------------------------------------------------- the toy 3D world
@pytest.fixture(scope="module")
def world():
    from guidance.toy3d import Toy3DDiffusion

    return Toy3DDiffusion()


def mean(values):
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def fronted_cube(world):
    return distil(world, "a red cube with a yellow front", 300)


def test_nerf_sds_recovers_the_cube_and_its_front_in_the_toy_world(world, fronted_cube):
    prompt = "a red cube with a yellow front"
    scores = turntable_scores(world, fronted_cube, prompt)
    yellow = [s[2] for s in scores]  # frames at azimuths 0, 30, ..., 330
    # The starting blob (a ball of radius ~0.5) has IoU ~0.5 with the cube's silhouettes; a NeRF that learnt the
    # cube from every side scores above 0.75 (measured 0.83), with a colour error over the silhouettes' union
    # below 0.15 (measured 0.09; a red cube with a red front: 0.15, the starting blob 0.3).
    assert mean([s[0] for s in scores]) > 0.75, scores
    assert mean([s[1] for s in scores]) < 0.15, scores
    # The yellow face is seen from the front (true fractions 1.0, 0.77, 0.26 at azimuths 0, 30, 60) and from no
    # back view (azimuths 150, 180, 210: 0.0); measured 0.61, 0.53, 0.26 and 0.0 (seeds 1 and 2, the mean over
    # azimuths 0 and +-30: 0.44 and 0.60, and 0.0 behind; IoU 0.78 and 0.88: benchmarks/toy3d.py --seeds 1 2).
    assert yellow[0] > 0.5 and min(yellow[1], yellow[11]) > 0.3, yellow
    assert max(yellow[5:8]) < 0.05, yellow
    # Mutants, rendering at the wrong camera, fail that check: the other azimuth convention (a camera at azimuth 0
    # on -x: the front is seen from the back) and a renderer that ignores the azimuth (the front from every side).
    for mutant in (lambda azimuth: azimuth + 180.0, lambda azimuth: 0.0):
        seen = [s[2] for s in turntable_scores(world, fronted_cube, prompt, shown_azimuth=mutant)]
        assert max(seen[5:8]) > 0.5, seen


def test_nerf_sds_recovers_a_plain_spheres_colour(world):
    gen = distil(world, "a blue sphere", 100)
    scores = turntable_scores(world, gen, "a blue sphere")
    # Colour error over the silhouettes' union: the starting blob 0.25, a red sphere 0.35, a blue cube 0.09;
    # measured 0.13. The silhouette stays a disc (IoU with the sphere's: blob 0.81, blue cube 0.74, measured
    # 0.74): a sphere's views differ only by their shading, so its size trades against the cameras' zoom (the
    # world's 2 distances x 3 fovys), which no prompt names, and SDS leaves it loosely fixed.
    assert mean([s[1] for s in scores]) < 0.2 and mean([s[0] for s in scores]) > 0.6, scores
    # Not learnt in these steps: the baked light (the true sphere's centre is 0.93 x blue seen from azimuth 30, 0.5
    # from 210; the NeRF's differ by ~0.04).


def test_without_view_prompts_the_front_is_lost_not_duplicated(world, fronted_cube):
    # The claim: without view prompts SDS draws the front on every side (Janus). In this exact world it does not:
    # the views that show the front are a minority of the prompt's mixture, and the front colour is lost instead
    # (measured: yellow 0.0 in front and behind after 300 steps at seeds 0, 1, 2, and in every frame after 200 steps
    # at seed 0), while view prompts recover it (previous test).
    gen = distil(world, "a red cube with a yellow front", 200, view_prompts=False)
    yellow = [s[2] for s in turntable_scores(world, gen, "a red cube with a yellow front")]
    assert max(yellow) < 0.05, yellow
    with_views = [s[2] for s in turntable_scores(world, fronted_cube, "a red cube with a yellow front")]
    assert with_views[0] > yellow[0] + 0.5


def test_the_mesh_of_the_distilled_cube_matches_its_turntable(fronted_cube, tmp_path):
    import numpy as np
    import trimesh
    from PIL import Image
    from test_export import rasterise

    fronted_cube.turntable_frames, fronted_cube.turntable_size, fronted_cube.mesh_resolution = 6, 32, 64
    paths = fronted_cube.save(tmp_path, "cube")
    mesh = trimesh.load(tmp_path / "cube.obj", force="mesh", process=False)
    ious = []
    for k, camera in enumerate(turntable(6, distance=1.75, fovy=55.0)):
        alpha = torch.from_numpy(np.array(Image.open(tmp_path / "cube" / "turntable" / f"frame_{k:03d}.png"))[..., 3])
        silhouette = rasterise(np.asarray(mesh.vertices), np.asarray(mesh.faces), camera, 32)
        covered = alpha > 127
        ious.append(float((silhouette & covered).sum() / (silhouette | covered).sum()))
    assert min(ious) > 0.75, ious
    assert len(paths) == 6 + 2 + 2
