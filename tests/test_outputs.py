"""Results are never silently replaced or mixed, and bad values never reach a model: the robustness issue's CLI
findings, each checked through main.py as a user runs it (in-process, the toy world: seconds)."""
import json
import math
from pathlib import Path

import pytest
from PIL import Image

import main
import run_all
from guidance.toy import VOCABULARY
from utils import run_cli

REPO = Path(__file__).resolve().parent.parent
TOY = ["--model", "toy", "--log_step", "0"]


def pixels(path: Path) -> bytes:
    return Image.open(path).convert("RGB").tobytes()


def test_sds_then_vsd_into_one_folder_loses_nothing(tmp_path, cli):
    """The README's toy SDS then VSD of one prompt: by default each method has its folder (outputs/<loss_type>, as
    eval.py --fdir1 outputs/sds expects); into one folder, the second run stops before it starts and says how."""
    sds = TOY + ["--prompt", "a red circle", "--loss_type", "sds", "--step", "20", "--save_dir", str(tmp_path)]
    assert cli(sds)[0] == 0
    before = pixels(tmp_path / "a_red_circle.png")
    vsd = TOY + ["--prompt", "a red circle", "--loss_type", "vsd", "--step", "20", "--save_dir", str(tmp_path)]
    code, _, err = cli(vsd)
    assert code == 2 and "--overwrite" in err and "loss_type 'sds' -> 'vsd'" in err and len(err.splitlines()) == 1
    assert f"e.g. {tmp_path.with_name(tmp_path.name + '_vsd')})" in err  # a folder named for what changed
    assert pixels(tmp_path / "a_red_circle.png") == before  # the SDS result is untouched
    assert json.loads((tmp_path / "a_red_circle" / "run_config.json").read_text())["loss_type"] == "sds"


def test_the_default_folder_is_the_methods_own(tmp_path, cli, monkeypatch):
    """The README's commands in order: methods, then generators, of one prompt each land in their own folder."""
    monkeypatch.chdir(tmp_path)
    for method in ("sds", "vsd"):
        assert cli(TOY + ["--prompt", "a red circle", "--loss_type", method, "--step", "10"])[0] == 0
    for generator in ("pixels", "gaussians"):
        assert cli(TOY + ["--prompt", "a red circle", "--generator", generator, "--step", "10"])[0] == 0
    for folder in ("sds", "vsd", "sds_pixels", "sds_gaussians"):
        record = json.loads((tmp_path / "outputs" / folder / "a_red_circle" / "run_config.json").read_text())
        assert (tmp_path / "outputs" / folder / "a_red_circle.png").is_file() and record["status"] == "finished"


def test_overwrite_replaces_and_leaves_nothing_of_the_earlier_run(tmp_path, cli):
    """An earlier run's SVG, particles and interrupted image do not stay beside a new result."""
    base = TOY + ["--prompt", "a red circle", "--save_dir", str(tmp_path)]
    assert cli(base + ["--loss_type", "vsd", "--num_particles", "2", "--step", "10", "--generator", "vector",
                       "--num_shapes", "4", "--log_step", "5"])[0] == 0
    assert (tmp_path / "a_red_circle.svg").is_file() and (tmp_path / "a_red_circle" / "particles").is_dir()
    (tmp_path / "a_red_circle" / "interrupted.png").write_bytes(b"an earlier run's")
    assert cli(base + ["--loss_type", "sds", "--step", "10", "--overwrite"])[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_red_circle", "a_red_circle.png"]
    left = sorted(p.name for p in (tmp_path / "a_red_circle").iterdir())
    assert left == ["init_latents.pt", "latents.pt", "loss.csv", "run_config.json"]


def test_an_unfinished_run_is_replaced_and_a_finished_same_one_rerun(tmp_path, cli):
    base = TOY + ["--prompt", "a red circle", "--loss_type", "sds", "--step", "10", "--save_dir", str(tmp_path)]
    assert cli(base)[0] == 0
    assert cli(base)[0] == 0  # the same settings: the same result again
    record = tmp_path / "a_red_circle" / "run_config.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "status": "interrupted", "seed": 7}))
    assert cli(base)[0] == 0  # an interrupted run of other settings is what a new run replaces


def test_names_that_differ_only_by_case_and_files_no_run_made_are_not_replaced(tmp_path, cli):
    base = TOY + ["--loss_type", "sds", "--step", "5", "--save_dir", str(tmp_path)]
    assert cli(base + ["--prompt", "a red circle"])[0] == 0
    code, _, err = cli(base + ["--prompt", "A red circle"])
    assert code == 2 and "only by case" in err
    Image.new("RGB", (8, 8)).save(tmp_path / "a_blue_square.png")  # the user's own file, no run record
    code, _, err = cli(base + ["--prompt", "a blue square"])
    assert code == 2 and "no run of this toolkit made it" in err
    assert Image.open(tmp_path / "a_blue_square.png").size == (8, 8)


@pytest.mark.parametrize("flags, words", [
    (["--lr", "nan"], "--lr nan must be a positive finite number"),
    (["--lr", "inf"], "--lr inf must be a positive finite number"),
    (["--lora_lr", "nan", "--loss_type", "vsd"], "--lora_lr nan must be a positive finite number"),
    (["--guidance_scale", "nan"], "--guidance_scale nan must be a finite number"),
    (["--guidance_scale", "inf"], "--guidance_scale inf must be a finite number"),
    (["--seed", str(2**64)], "outside [0, 2^63)"),
    (["--seed", "-1"], "outside [0, 2^63)"),
    (["--t_range", "nan", "0.9"], "--t_range nan 0.9 is invalid"),
    (["--asd_ratio", "inf", "--loss_type", "asd"], "--asd_ratio inf must be a finite number"),
])
def test_bad_numbers_exit_2_with_one_line_before_any_model_loads(tmp_path, cli, monkeypatch, flags, words):
    monkeypatch.setattr(main, "build_model", lambda config: pytest.fail("a model was loaded"))
    code, _, err = cli(TOY + ["--prompt", "a red circle", "--save_dir", str(tmp_path)] + flags)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


@pytest.mark.parametrize("prompt, words", [("a photo of a cat", "names no colour or shape"),
                                           ("a red circle next to a blue square", "one shape per image")])
def test_the_toy_world_refuses_prompts_it_cannot_draw(tmp_path, cli, capsys, prompt, words):
    code, _, err = cli(TOY + ["--prompt", prompt, "--save_dir", str(tmp_path)])
    assert code == 2 and words in err and VOCABULARY in err
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"x": {"prompt": prompt}, "y": {"prompt": "a red circle"}}))
    with pytest.raises(SystemExit):
        run_cli(lambda: run_all.main(["--model", "toy", "--tasks", "sds", "--prompts", str(prompts), "--step", "5",
                                      "--log_step", "0", "--out", str(tmp_path / "batch"), "--no_report"]))
    _, err = capsys.readouterr()
    assert words in err  # the batch names the entry's problem and runs the others
    assert (tmp_path / "batch" / "sds" / "a_red_circle.png").is_file()


def test_the_app_refuses_what_main_refuses(tmp_path):
    import app
    from utils import UserError

    runner = app.Runner(tmp_path)
    with pytest.raises(UserError, match="names no colour or shape"):
        runner.make_args("a photo of a cat", "sds", 10, 0, model="toy")
    with pytest.raises(UserError, match="must be a finite number"):
        runner.make_args("a red circle", "sds", 10, 0, model="toy", guidance=str(math.inf))


def test_a_source_image_too_large_to_decode_is_one_line(tmp_path, cli, monkeypatch):
    """PIL refuses a 400 M pixel image as a decompression bomb: that is the user's file, not our bug."""
    monkeypatch.setattr(main, "build_model", lambda config: pytest.fail("a model was loaded"))
    huge = tmp_path / "huge.png"
    Image.new("1", (20000, 20000)).save(huge)  # 400 M pixels in 1 bit: a few MB to write, 1.2 GB to decode as RGB
    code, _, err = cli(TOY + ["--prompt", "a red circle", "--edit_prompt", "a blue circle", "--src_img_path",
                              str(huge), "--loss_type", "pds", "--save_dir", str(tmp_path / "out")])
    assert code == 2 and "too large to read as an image" in err and len(err.strip().splitlines()) == 1
