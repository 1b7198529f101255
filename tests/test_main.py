"""main.py end to end on a tiny SD folder, and every bad input: exit code, one clear message, no traceback."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import guidance.loop
import main
from utils import UserError, load_image, run_cli

REPO = Path(__file__).resolve().parent.parent


def run_main(argv, capsys):
    """Return (exit code, stdout, stderr) of main.py's CLI entry run in-process."""
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: main.main(argv))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.fixture
def src_img(tmp_path) -> Path:
    path = tmp_path / "src.png"
    Image.new("RGB", (40, 24), (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize("loss_type", ["sds", "pds", "vsd"])
def test_cli_writes_course_named_image_and_run_record(tiny_sd_dir, tmp_path, src_img, capsys, loss_type):
    argv = ["--model", str(tiny_sd_dir), "--prompt", "A castle next to a river", "--loss_type", loss_type,
            "--step", "3", "--log_step", "1", "--save_dir", str(tmp_path / "out"), "--device", "cpu", "--seed", "7"]
    if loss_type == "pds":
        argv += ["--edit_prompt", "A rainbow castle next to a river", "--src_img_path", str(src_img)]
    if loss_type == "vsd":
        argv += ["--num_particles", "2"]
    code, out, _ = run_main(argv, capsys)
    assert code == 0
    name = "A_rainbow_castle_next_to_a_river" if loss_type == "pds" else "A_castle_next_to_a_river"
    out_dir = tmp_path / "out"
    assert sorted(p.name for p in out_dir.glob("*.png")) == [f"{name}.png"]  # nothing else beside it
    # 40x24 source: short side -> 16, long side 26.7 -> 28 (a multiple of 4 for the tiny model)
    assert Image.open(out_dir / f"{name}.png").size == ((28, 16) if loss_type == "pds" else (16, 16))
    record = json.loads((out_dir / name / "run_config.json").read_text())
    assert record["status"] == "finished" and record["seed"] == 7 and record["loss_type"] == loss_type
    assert record["guidance_scale"] == {"sds": 25.0, "pds": 7.5, "vsd": 7.5}[loss_type]
    assert record["steps_done"] == 3
    assert sorted(p.name for p in (out_dir / name / "progress").iterdir()) == [
        "step_00000.png", "step_00001.png", "step_00002.png"]
    assert len((out_dir / name / "loss.csv").read_text().splitlines()) == 4
    if loss_type == "pds":
        assert Image.open(out_dir / name / "source.png").size == (28, 16)
    if loss_type == "vsd":
        assert len(list((out_dir / name / "particles").glob("*.png"))) == 2


def test_same_seed_gives_the_same_image(tiny_sd, tmp_path):
    images = []
    for i in range(2):
        args = main.parse_args(["--model", "unused", "--prompt", "a cat", "--step", "4", "--log_step", "0",
                                "--save_dir", str(tmp_path / str(i)), "--seed", "3"])
        result = main.run(tiny_sd, args, progress=False)
        images.append(torch.tensor(list(Image.open(result.image_path).getdata())))
    assert torch.equal(images[0], images[1])


def test_lr_flag_really_sets_the_learning_rate(tiny_sd, tmp_path, monkeypatch):
    seen = []
    real_adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, **kw: (seen.append(lr), real_adamw(params, lr=lr, **kw))[1])
    args = main.parse_args(["--model", "unused", "--prompt", "a cat", "--step", "1", "--lr", "0.05",
                            "--save_dir", str(tmp_path)])
    main.run(tiny_sd, args, progress=False)
    assert seen == [0.05]


def nan_on_call(model, monkeypatch, n: int) -> dict:
    """Make model.get_sds_loss return NaN on its n-th call; return {'n': calls so far}."""
    calls = {"n": 0}
    real = model.get_sds_loss

    def flaky(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == n else loss

    monkeypatch.setattr(model, "get_sds_loss", flaky)
    return calls


def test_nan_loss_stops_and_keeps_last_finite_image(tiny_sd, tmp_path, monkeypatch, capsys):
    nan_on_call(tiny_sd, monkeypatch, 3)
    monkeypatch.setattr(main, "build_model", lambda args: tiny_sd)
    monkeypatch.setattr(tiny_sd, "free_text_encoders", lambda: None)  # main.main frees them; later tests share it
    code, _, err = run_main(["--prompt", "a cat", "--step", "10", "--save_dir", str(tmp_path)], capsys)
    assert code == 1
    assert "NaN/inf at step 2" in err and "last_finite.png" in err and "Traceback" not in err
    assert not (tmp_path / "a_cat.png").exists()
    kept = tmp_path / "a_cat" / "last_finite.png"
    assert kept.exists()
    record = json.loads((tmp_path / "a_cat" / "run_config.json").read_text())
    assert record["status"] == "diverged" and record["steps_done"] == 2


def test_a_nan_inside_a_read_window_keeps_the_windows_first_latents(tiny_sd, tmp_path, monkeypatch):
    # On a GPU main.py reads losses once per window (LOSS_READ_EVERY); here windows of 4 steps on the CPU.
    monkeypatch.setattr(guidance.loop, "LOSS_READ_EVERY", {"cpu": 4, "default": 4})

    def args(save_dir, steps):
        return main.parse_args(["--prompt", "a cat", "--step", str(steps), "--log_step", "0",
                                "--save_dir", str(tmp_path / save_dir)])

    clean = main.run(tiny_sd, args("clean", 4), progress=False)
    calls = nan_on_call(tiny_sd, monkeypatch, 7)  # step 6
    result = main.run(tiny_sd, args("nan", 10), progress=False)
    # steps 4, 5 and 6 ran before the window's losses were read at step 7: the NaN is found at step 6, and the
    # latents go back to the window's start (after steps 0-3), the last ones whose losses were all read finite
    assert calls["n"] == 8
    assert result.status == "diverged" and result.steps_done == 6
    assert result.losses[:4] == pytest.approx(clean.losses) and len(result.losses) == 6
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert torch.equal(result.latents, clean.latents)
    assert result.image_path.name == "last_finite.png" and result.image_path.is_file()


def test_ctrl_c_saves_the_current_image(tiny_sd, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = tiny_sd.get_sds_loss

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tiny_sd, "get_sds_loss", interrupted)
    monkeypatch.setattr(main, "build_model", lambda args: tiny_sd)
    monkeypatch.setattr(tiny_sd, "free_text_encoders", lambda: None)  # main.main frees them; later tests share it
    code, _, err = run_main(["--prompt", "a cat", "--step", "10", "--save_dir", str(tmp_path)], capsys)
    assert code == 130 and "interrupted.png" in err
    assert (tmp_path / "a_cat" / "interrupted.png").exists()
    assert json.loads((tmp_path / "a_cat" / "run_config.json").read_text())["status"] == "interrupted"


@pytest.fixture
def no_model_loading(monkeypatch):
    """Make any model load fail loudly, proving the error came from validation first."""
    def refuse(args):
        raise AssertionError("a model was loaded before the bad input was caught")

    monkeypatch.setattr(main, "build_model", refuse)


def bad_inputs(tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not an image")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    pds = ["--loss_type", "pds", "--prompt", "a cat", "--edit_prompt", "a dog"]
    return {
        "missing source": (pds + ["--src_img_path", str(tmp_path / "nope.png")], "image not found"),
        "not an image": (pds + ["--src_img_path", str(not_image)], "cannot read"),
        "source is a folder": (pds + ["--src_img_path", str(tmp_path)], "is a folder"),
        "pds without edit prompt": (["--loss_type", "pds", "--prompt", "a cat", "--src_img_path", str(not_image)],
                                    "--edit_prompt"),
        "pds without source": (["--loss_type", "pds", "--prompt", "a cat", "--edit_prompt", "a dog"], "--src_img_path"),
        "unknown loss": (["--loss_type", "sdss", "--prompt", "a cat"], "invalid choice: 'sdss'"),
        "empty prompt": (["--prompt", "  "], "--prompt is empty"),
        "unwritable save_dir": (["--prompt", "a cat", "--save_dir", str(a_file / "sub")], "cannot write to save directory"),
        "zero steps": (["--prompt", "a cat", "--step", "0"], "--step 0"),
        "unknown device": (["--prompt", "a cat", "--device", "tpu"], "unknown device 'tpu'"),
    }


@pytest.mark.parametrize("case", ["missing source", "not an image", "source is a folder", "pds without edit prompt",
                                  "pds without source", "unknown loss", "empty prompt", "unwritable save_dir",
                                  "zero steps", "unknown device"])
def test_bad_input_fails_before_loading_with_a_clear_message(tmp_path, capsys, no_model_loading, case):
    argv, expected = bad_inputs(tmp_path)[case]
    code, _, err = run_main(argv + ["--save_dir", str(tmp_path / "out")] if "--save_dir" not in argv else argv, capsys)
    assert code == 2
    assert expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3


@pytest.mark.parametrize("model,expected", [
    ("someone/no-such-model", "could not load Stable Diffusion weights from 'someone/no-such-model'"),
    ("stabilityai/stable-diffusion-2-1-base", "deleted from the hub in Nov 2025"),
    ("not a model!", "unknown model 'not a model!'"),
])
def test_unavailable_model_is_one_clear_paragraph(tmp_path, capsys, model, expected):
    code, _, err = run_main(["--model", model, "--prompt", "a cat", "--save_dir", str(tmp_path), "--device", "cpu"],
                            capsys)
    assert code == 2 and expected in err and "--model toy" in err or "toy" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_folder_that_is_not_stable_diffusion(tmp_path, capsys):
    code, _, err = run_main(["--model", str(tmp_path), "--prompt", "a cat", "--save_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "not a diffusers Stable Diffusion folder" in err


def test_bad_input_as_a_real_process_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "main.py", "--loss_type", "pds", "--prompt", "a cat", "--edit_prompt",
                           "a dog", "--src_img_path", str(tmp_path / "missing.png"), "--save_dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: image not found") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16"])
def test_source_images_in_any_mode_load_as_rgb(tmp_path, mode):
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    img = Image.new("RGBA", (33, 17), (10, 200, 30, 0 if mode in ("RGBA", "LA") else 255)).convert(mode)
    img.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (33, 17)
    if mode in ("RGBA", "LA"):
        assert loaded.getpixel((0, 0)) == (255, 255, 255)  # fully transparent -> white background


def test_pds_with_odd_sized_grayscale_source(tiny_sd, tmp_path):
    src = tmp_path / "gray.png"
    Image.new("L", (37, 91), 128).save(src)
    args = main.parse_args(["--model", "unused", "--loss_type", "pds", "--prompt", "a cat", "--edit_prompt", "a dog",
                            "--src_img_path", str(src), "--step", "2", "--save_dir", str(tmp_path / "o")])
    result = main.run(tiny_sd, args, progress=False)
    assert result.status == "finished"
    assert Image.open(result.image_path).size == (16, 40)  # short side 16; 91 * 16/37 = 39.4 -> 40 (multiple of 4)


def test_user_error_text_names_value(tmp_path):
    with pytest.raises(UserError, match="nope.png"):
        load_image(tmp_path / "nope.png")


def test_a_reused_model_starts_each_run_without_an_earlier_vsd_lora(tiny_sd_dir, tmp_path):
    from guidance.sd import StableDiffusion

    model = StableDiffusion(str(tiny_sd_dir), device="cpu")
    common = ["--model", "unused", "--prompt", "a cat", "--step", "3", "--log_step", "0", "--seed", "1"]
    sds = main.run(model, main.parse_args(common + ["--save_dir", str(tmp_path / "a")]), progress=False)
    main.run(model, main.parse_args(common + ["--loss_type", "vsd", "--lora_lr", "0.1",
                                              "--save_dir", str(tmp_path / "v")]), progress=False)
    assert model.lora_optimizer is not None
    again = main.run(model, main.parse_args(common + ["--save_dir", str(tmp_path / "b")]), progress=False)
    assert model.lora_optimizer is None  # the trained LoRA is gone
    assert list(Image.open(sds.image_path).getdata()) == list(Image.open(again.image_path).getdata())
