"""Text-to-3D and mesh texturing through main.py, as a user runs them: the loop draws cameras, gives each view its
prompt, writes every output, checkpoints and resumes; and every bad input is one line, exit 2. The generators'
own maths is tested in test_nerf.py, test_mesh.py, test_raster.py, test_export.py and test_toy3d.py."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import guidance.loop
import main
from guidance.cameras import camera_from_c2w

CUBE = "a red cube with a yellow front"
YELLOW = np.array([1.0, 1.0, 0.2])


def yellow_fraction(frame: Path) -> float:
    """Return the fraction of the object's pixels (alpha > 0.5) that are yellow (red and green both high)."""
    rgba = np.asarray(Image.open(frame), dtype=np.float64) / 255
    alpha = rgba[..., 3]
    rgb = rgba[..., :3] / np.maximum(alpha[..., None], 1e-6)  # frames are premultiplied over black
    yellow = (rgb[..., 0] > 0.6) & (rgb[..., 1] > 0.6) & (rgb[..., 2] < 0.45)
    covered = alpha > 0.5
    return float((yellow & covered).sum() / max(covered.sum(), 1))


@pytest.fixture(scope="module")
def cube_run(tmp_path_factory):
    """A 300-step SDS NeRF of the fronted cube in the toy 3D world, through main.py (~20-40 s)."""
    out = tmp_path_factory.mktemp("cube")
    argv = ["--model", "toy3d", "--generator", "nerf", "--prompt", CUBE, "--loss_type", "sds", "--step", "300",
            "--log_step", "100", "--turntable_frames", "12", "--checkpoint_every", "150", "--save_dir", str(out)]
    assert main.main(argv) == 0
    return out


def test_a_3d_run_writes_every_output(cube_run):
    name = CUBE.replace(" ", "_")
    run = cube_run / name
    assert (cube_run / f"{name}.png").is_file() and Image.open(cube_run / f"{name}.png").size == (32, 32)
    frames = sorted((run / "turntable").glob("frame_*.png"))
    assert len(frames) == 12 and all(Image.open(f).mode == "RGBA" for f in frames)
    transforms = json.loads((run / "turntable" / "transforms.json").read_text())
    assert [f["file_path"] for f in transforms["frames"]] == [f.name for f in frames]
    first = camera_from_c2w(torch.tensor(transforms["frames"][0]["transform_matrix"]), 55.0)
    assert abs(first.azimuth) < 1e-6 and first.elevation == pytest.approx(15.0)  # frame 0 is the front
    assert (run / "turntable.gif").is_file() and (run / "nerf.pt").is_file()
    import trimesh

    mesh = trimesh.load(cube_run / f"{name}.glb", force="mesh")
    assert len(mesh.faces) > 100 and np.abs(mesh.vertices).max() < 1.0  # inside the unit sphere, not empty
    assert (cube_run / f"{name}.obj").is_file()
    record = json.loads((run / "run_config.json").read_text())
    assert record["status"] == "finished" and record["generator"] == "nerf" and record["steps_done"] == 300
    assert torch.load(run / "latents.pt").shape == (1, 3, 32, 32)  # the front view's latents
    assert sorted(p.name for p in (run / "progress").iterdir()) == [
        "step_00000.png", "step_00100.png", "step_00200.png", "step_00299.png"]


def test_the_yellow_front_is_seen_from_the_front_only(cube_run):
    """Each camera gets its view's prompt through the loop (a loop that gave every view the bare prompt loses the
    front: 0.0 yellow at every azimuth in the toy world, benchmarks/toy3d.py)."""
    frames = sorted((cube_run / CUBE.replace(" ", "_") / "turntable").glob("frame_*.png"))  # azimuths 0, 30, ..., 330
    front = [yellow_fraction(frames[k]) for k in (0, 1, 11)]
    back = [yellow_fraction(frames[k]) for k in (5, 6, 7)]
    print("yellow fraction, front:", front, "back:", back)
    assert min(front[0], max(front)) > 0.2  # the true object's front view is 85% yellow; the learnt one is softer
    assert max(back) < 0.05


@pytest.mark.parametrize("method", ["sds", "vsd"])
def test_resume_goes_on_exactly_where_the_checkpoint_stopped(tmp_path, cli, method):
    """A run interrupted after its checkpoint at step 10 and resumed from it ends as an uninterrupted run does (VSD:
    its LoRA, camera embedding and their optimiser come back with theta)."""
    base = ["--model", "toy3d", "--generator", "nerf", "--prompt", "a blue sphere", "--step", "20", "--log_step", "0",
            "--checkpoint_every", "10", "--turntable_frames", "2", "--loss_type", method]
    assert cli(base + ["--save_dir", str(tmp_path / "straight")])[0] == 0
    straight = json.loads((tmp_path / "straight" / "a_blue_sphere" / "run_config.json").read_text())

    config = main.parse_args(base + ["--save_dir", str(tmp_path / "cut")])
    model = main.build_model(config)
    steps = iter(range(100))
    result = main.run(model, config, progress=False, should_stop=lambda: next(steps) >= 15)
    assert result.status == "interrupted" and result.steps_done == 15
    checkpoint = tmp_path / "cut" / "a_blue_sphere" / "nerf.pt"
    assert torch.load(checkpoint, weights_only=False)["steps_done"] == 10
    assert cli(base + ["--save_dir", str(tmp_path / "cut"), "--resume", str(checkpoint)])[0] == 0
    resumed = json.loads((tmp_path / "cut" / "a_blue_sphere" / "run_config.json").read_text())
    losses = [np.loadtxt(tmp_path / d / "a_blue_sphere" / "loss.csv", delimiter=",", skiprows=1)[:, 1]
              for d in ("straight", "cut")]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    assert resumed["steps_done"] == straight["steps_done"] == 20
    assert resumed["max_abs"] == pytest.approx(straight["max_abs"], rel=1e-5)

    code, _, err = cli(base + ["--save_dir", str(tmp_path / "other"), "--resume", str(checkpoint), "--lr", "0.05"])
    assert code == 2 and "another run" in err and "lr 0.1" in err


def test_a_nan_keeps_the_last_finite_checkpoint(tmp_path, cli, monkeypatch):
    real = guidance.loop.RunState.loss

    def nan_at_step_13(self, latents, step, view):
        loss = real(self, latents, step, view)
        return loss * float("nan") if step == 13 else loss

    monkeypatch.setattr(guidance.loop.RunState, "loss", nan_at_step_13)
    argv = ["--model", "toy3d", "--generator", "nerf", "--prompt", "a blue sphere", "--step", "20", "--log_step", "0",
            "--checkpoint_every", "5", "--turntable_frames", "2", "--save_dir", str(tmp_path)]
    code, _, err = cli(argv)
    assert code == 1 and "NaN" in err
    saved = torch.load(tmp_path / "a_blue_sphere" / "nerf.pt", weights_only=False)
    assert saved["steps_done"] == 10 and all(torch.isfinite(v).all() for v in saved["generator"]["field"].values())


@pytest.mark.parametrize("flags, words", [
    (["--loss_type", "pds", "--edit_prompt", "a blue cube", "--src_img_path", "data/toy_imgs/a_red_circle.png"],
     "edits an image"),
    (["--elevation_range", "50", "10"], "MIN is above MAX"),
    (["--distance_range", "0.5", "2"], "outside the unit sphere"),
    (["--elevation_range", "-10", "80"], "data covers only -10..45"),
    (["--prompt", "a photo of a cat"], "not an object of the toy 3D world"),
    (["--mesh", "box"], "--mesh is for --generator mesh"),
    (["--perp_neg", "--loss_type", "vsd"], "--perp_neg"),
    (["--views_per_step", "0"], "--views_per_step 0"),
    (["--resume", "no/such/nerf.pt"], "no such checkpoint"),
])
def test_bad_3d_input_is_one_line_exit_2_before_the_model(tmp_path, cli, monkeypatch, flags, words):
    monkeypatch.setattr(main, "build_model", lambda config: pytest.fail("a model was loaded"))
    argv = ["--model", "toy3d", "--generator", "nerf", "--prompt", CUBE, "--save_dir", str(tmp_path)] + flags
    code, _, err = cli(argv)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_mesh_input_errors_are_one_line_before_the_model(tmp_path, cli, monkeypatch):
    monkeypatch.setattr(main, "build_model", lambda config: pytest.fail("a model was loaded"))
    cloud = tmp_path / "cloud.ply"
    import trimesh

    trimesh.PointCloud(np.random.rand(20, 3)).export(cloud)
    for flags, words in ((["--mesh", str(tmp_path / "missing.obj")], "missing.obj"), (["--mesh", str(cloud)], "point"),
                         (["--mesh", "box", "--texture_size", "500"], "power of two"), ([], "--mesh PATH")):
        code, _, err = cli(["--model", "toy3d", "--generator", "mesh", "--prompt", "a green cube",
                            "--save_dir", str(tmp_path / "out")] + flags)
        assert code == 2 and words in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_mesh_texture_of_a_green_cube_with_a_red_front(tmp_path):
    """The exported GLB's texture, opened with trimesh: its +x face red, the other faces green."""
    import trimesh

    argv = ["--model", "toy3d", "--generator", "mesh", "--mesh", "box", "--prompt", "a green cube with a red front",
            "--step", "150", "--log_step", "0", "--turntable_frames", "4", "--save_dir", str(tmp_path)]
    assert main.main(argv) == 0
    mesh = trimesh.load(tmp_path / "a_green_cube_with_a_red_front.glb", force="mesh")
    texture = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"), dtype=np.float64) / 255
    size = texture.shape[0]
    colours = {}
    for axis, sign, label in ((0, 1, "+x"), (0, -1, "-x"), (1, 1, "+y"), (1, -1, "-y"), (2, 1, "+z")):
        faces = np.where(mesh.face_normals[:, axis] * sign > 0.99)[0]
        uv = mesh.visual.uv[mesh.faces[faces]].mean(1)  # each face's UV centroid
        pixels = texture[((1 - uv[:, 1]) * size).astype(int).clip(0, size - 1), (uv[:, 0] * size).astype(int).clip(
            0, size - 1)]
        colours[label] = pixels.mean(0)
    print({k: v.round(2) for k, v in colours.items()})
    # The toy 3D world bakes a fixed light into its objects (ambient 0.5 + 0.5 n . l), so each face's learnt colour
    # is its shaded colour: the hue is what must be right (the true sides are 0.5 to 1 times the body colour).
    red = colours.pop("+x")
    assert red[0] - max(red[1], red[2]) > 0.3  # the front: red
    for label, colour in colours.items():  # the faces a camera sees from the side and above: green
        assert colour[1] - max(colour[0], colour[2]) > 0.2, label


@pytest.mark.parametrize("generator, loss", [("nerf", "sds"), ("nerf", "vsd"), ("nerf", "ism"), ("mesh", "sds"),
                                             ("mesh", "vsd")])
def test_3d_generators_run_on_a_tiny_stable_diffusion(tiny_sd_dir, tmp_path, generator, loss):
    argv = ["--model", str(tiny_sd_dir), "--generator", generator, "--prompt", "a wooden chair", "--loss_type", loss,
            "--step", "3", "--log_step", "0", "--render_size", "16", "--turntable_frames", "2", "--views_per_step", "2",
            "--save_dir", str(tmp_path), "--device", "cpu"] + (["--mesh", "box", "--texture_size", "64"]
                                                               if generator == "mesh" else [])
    assert main.main(argv) == 0
    record = json.loads((tmp_path / "a_wooden_chair" / "run_config.json").read_text())
    assert record["status"] == "finished" and record["steps_done"] == 3
    assert (tmp_path / "a_wooden_chair.png").is_file() and (tmp_path / "a_wooden_chair.glb").is_file()
    assert len(list((tmp_path / "a_wooden_chair" / "turntable").glob("frame_*.png"))) == 2
