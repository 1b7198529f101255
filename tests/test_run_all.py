"""run_all.py: one model per process, resumable runs, failures that do not stop the batch, eval + report, accelerate."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import eval as evaluation
import main
import run_all
from utils import UserError

REPO = Path(__file__).resolve().parent.parent
FAST = ["--step", "2", "--log_step", "1", "--device", "cpu", "--clip_pretrained", "none"]


def write_prompts(folder: Path, entries, name="prompts.json") -> Path:
    """Write a course-schema prompts json; entries are (prompt, edit_prompt, source path or None to make one)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for i, (prompt, edit, src) in enumerate(entries):
        if src is None:
            src = folder / f"src_{i}.png"
            rng = np.random.default_rng(i)
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(src)
        data[prompt.replace(" ", "_")] = {"prompt": prompt, "edit_prompt": edit, "img_path": str(src)}
    path = folder / name
    path.write_text(json.dumps(data, indent=4))
    return path


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for log in sorted((out / "logs").glob("process_*.jsonl"))
            for line in log.read_text().splitlines()]


def png_array(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


class BrightnessScorer:
    """Stands in for CLIP in the in-process tests (a random-weight CLIP costs ~10 s to build each time):
    the score is the image's mean brightness. The accelerate test runs the real (random-weight) CLIP."""

    def score(self, images, prompts):
        return [float(np.asarray(img).mean() / 255) for img in images]

    def direction(self, results, sources, src_prompts, edit_prompts):
        """The change of brightness source -> result (CLIP's directional similarity's stand-in)."""
        return [float(np.asarray(r).mean() - np.asarray(s).mean()) / 255 for r, s in zip(results, sources)]


@pytest.fixture
def scorers(monkeypatch) -> list:
    """Replace eval.make_scorer by BrightnessScorer; return the (kind, clip_pretrained) of every scorer asked for."""
    asked = []

    def make_scorer(kind="clip", device=None, clip_pretrained="openai"):
        asked.append((kind, clip_pretrained))
        return BrightnessScorer()

    monkeypatch.setattr(evaluation, "make_scorer", make_scorer)
    return asked


class LoadCounter:
    """Counts model loads and text-encoder calls through the real loading path."""

    def __init__(self, monkeypatch):
        import guidance

        self.loads, self.encoded = 0, 0
        real_load = guidance.load_model

        def load_model(*args, **kwargs):
            self.loads += 1
            model = real_load(*args, **kwargs)
            forward = model.text_encoder.forward

            def counted(*a, **k):
                self.encoded += 1
                return forward(*a, **k)

            model.text_encoder.forward = counted
            return model

        monkeypatch.setattr(guidance, "load_model", load_model)


def test_batch_loads_once_survives_a_bad_prompt_and_resumes(tiny_sd_dir, tmp_path, monkeypatch, capsys, scorers):
    missing_src = tmp_path / "later" / "boat.png"
    prompts = write_prompts(tmp_path, [("a cat", "a dog", None), ("a red house", "a blue house", None),
                                       ("a boat", "a golden boat", missing_src)])
    out = tmp_path / "out"
    argv = ["--model", str(tiny_sd_dir), "--prompts", str(prompts), "--out", str(out), *FAST]
    counter = LoadCounter(monkeypatch)

    assert run_all.main(argv) == 1  # the PDS edit of the boat has no source image
    captured = capsys.readouterr()
    assert "boat.png" in captured.err and "FAILED" in captured.err
    expected = {"sds": ["a_boat", "a_cat", "a_red_house"], "pds": ["a_blue_house", "a_dog"],
                "vsd": ["a_boat", "a_cat", "a_red_house"]}
    for task, names in expected.items():
        assert sorted(p.stem for p in (out / task).glob("*.png")) == names
        for name in names:
            config = json.loads((out / task / name / "run_config.json").read_text())
            assert (config["status"], config["loss_type"], config["process_index"]) == ("finished", task, 0)
            assert len(list((out / task / name / "progress").glob("step_*.png"))) == 2
        scores = json.loads((out / task / "eval.json").read_text())
        assert sorted(Path(k).stem for k in scores if k not in ("source_dir", "score", "metrics")) == names
        for name in names:  # scored by eval.py's evaluate_dir with the scorer run_all asked for
            path = out / task / f"{name}.png"
            assert scores[str(path)] == pytest.approx(png_array(path).mean() / 255)
        assert scores["score"] == pytest.approx(np.mean([scores[str(out / task / f"{n}.png")] for n in names]))
    assert (out / "pds" / "a_dog" / "source.png").is_file()
    assert (out / "report.pdf").read_bytes().startswith(b"%PDF")
    # One model for all 8 runs; each distinct text (SDS's and VSD's negative prompt, PDS's "", 3 prompts, 2 edit
    # prompts) encoded once.
    assert counter.loads == 1
    assert counter.encoded == 7
    assert scorers == [("clip", "none")]  # one scorer for the three tasks; --clip_pretrained passed through
    log = read_log(out)
    assert sorted((r["task"], r["name"], r["status"]) for r in log if r["status"] != "finished") == \
        [("pds", "a_golden_boat", "failed")]
    assert len(log) == 9

    # The source appears: only the failed run is done again.
    missing_src.parent.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(missing_src)
    assert run_all.main(argv) == 0
    assert "1 of 9 runs to do" in capsys.readouterr().out
    assert [(r["task"], r["name"]) for r in read_log(out)[9:]] == [("pds", "a_golden_boat")]
    assert (out / "pds" / "a_golden_boat.png").is_file()

    # Nothing left: nothing is loaded, run, scored or rewritten, and it says so.
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.parent.name != "logs")
    stamps = [p.stat().st_mtime_ns for p in files]
    loads = counter.loads
    assert run_all.main(argv) == 0
    assert "Nothing to do: all 9 runs are finished" in capsys.readouterr().out
    assert counter.loads == loads and len(read_log(out)) == 10
    assert [p.stat().st_mtime_ns for p in files] == stamps

    # A deleted image is the only run redone; its task's eval.json is rewritten, the others are not.
    (out / "sds" / "a_cat.png").unlink()
    vsd_eval = (out / "vsd" / "eval.json").stat().st_mtime_ns
    assert run_all.main(argv) == 0
    assert [(r["task"], r["name"]) for r in read_log(out)[10:]] == [("sds", "a_cat")]
    assert (out / "sds" / "a_cat.png").is_file()
    assert str(out / "sds" / "a_cat.png") in json.loads((out / "sds" / "eval.json").read_text())
    assert (out / "vsd" / "eval.json").stat().st_mtime_ns == vsd_eval

    # A reused model gives what a fresh process gives: the second VSD prompt starts from a fresh LoRA,
    # and an SDS run after VSD runs uses the pretrained UNet.
    fresh = main.build_model(main.parse_args(["--model", str(tiny_sd_dir), "--prompt", "x", "--device", "cpu"]))
    args = main.parse_args(["--model", str(tiny_sd_dir), "--prompt", "a red house", "--loss_type", "vsd",
                            "--save_dir", str(tmp_path / "alone"), "--step", "2", "--log_step", "1", "--device", "cpu"])
    alone = main.run(fresh, args, progress=False)
    np.testing.assert_array_equal(png_array(alone.image_path), png_array(out / "vsd" / "a_red_house.png"))

    _, base = run_all.parse_args(argv)
    batch = run_all.Batch(base, 0, 1, tmp_path / "again", "cpu")
    batch.model = fresh  # it has just run VSD, so it carries a trained LoRA
    assert fresh.lora_optimizer is not None
    item = run_all.Item("sds", "a_cat", 0, "a cat", None, None, tmp_path / "again")
    assert batch.run_one(item, run_all.item_args(item, base), progress=False)["status"] == "finished"
    np.testing.assert_array_equal(png_array(item.image_path), png_array(out / "sds" / "a_cat.png"))


def test_changed_settings_are_redone_and_same_settings_are_not(tmp_path):
    item = run_all.Item("sds", "a_cat", 0, "a cat", None, None, tmp_path)
    args = main.parse_args(["--model", "m", "--prompt", "a cat", "--save_dir", str(tmp_path), "--step", "5"])
    assert run_all.completion(item, args) == (False, "not run yet")
    item.run_dir.mkdir()
    config = {**vars(args), "status": "finished"}
    (item.run_dir / "run_config.json").write_text(json.dumps(config))
    assert run_all.completion(item, args) == (False, "a_cat.png is missing")  # a record without its image
    Image.new("RGB", (8, 8)).save(item.image_path)
    assert run_all.completion(item, args) == (True, "finished")
    args.step = 6
    done, why = run_all.completion(item, args)
    assert not done and "step 5 -> 6" in why
    (item.run_dir / "run_config.json").write_text(json.dumps({**config, "status": "running"}))
    assert run_all.completion(item, args)[0] is False  # a PNG alone (from a run that was cut) is not done


def test_interrupt_stops_the_batch_and_keeps_finished_runs(tiny_sd_dir, tmp_path, monkeypatch, capsys, scorers):
    prompts = write_prompts(tmp_path, [("a cat", None, None), ("a dog", None, None), ("a cow", None, None)])
    out = tmp_path / "out"
    argv = ["--model", str(tiny_sd_dir), "--prompts", str(prompts), "--out", str(out), "--tasks", "sds", *FAST]
    from guidance.sd import StableDiffusion

    real = StableDiffusion.get_sds_loss
    calls = []

    def ctrl_c_in_second_run(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the second run's first step (two steps per run)
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusion, "get_sds_loss", ctrl_c_in_second_run)
    assert run_all.main(argv) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "sds").glob("*.png")) == ["a_cat.png"]  # the third never started
    assert [(r["name"], r["status"]) for r in read_log(out)] == [("a_cat", "finished"), ("a_dog", "interrupted")]

    monkeypatch.setattr(StableDiffusion, "get_sds_loss", real)
    assert run_all.main(argv) == 0
    assert [r["name"] for r in read_log(out)[2:]] == ["a_dog", "a_cow"]


def test_failed_evaluation_keeps_runs_and_still_reports(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    import report

    prompts = write_prompts(tmp_path, [("a cat", None, None)])
    out = tmp_path / "out"

    def offline(*args, **kwargs):
        raise UserError("cannot get the CLIP ViT-B-32 weights (offline)")

    monkeypatch.setattr(evaluation, "make_scorer", offline)
    argv = ["--model", str(tiny_sd_dir), "--prompts", str(prompts), "--out", str(out), "--tasks", "sds",
            "--step", "1", "--log_step", "1", "--device", "cpu"]
    assert run_all.main(argv) == 1
    assert "cannot get the CLIP" in capsys.readouterr().err
    assert (out / "sds" / "a_cat.png").is_file() and not (out / "sds" / "eval.json").exists()
    assert (out / "report.pdf").is_file()
    notes = report.collect(out).tasks[0].notes
    assert any("no eval.json in sds" in n and "cannot get the CLIP" in n for n in notes), notes


def test_per_run_flags_and_bad_files_fail_before_any_model_loads(tmp_path):
    with pytest.raises(UserError, match="use --seeds"):
        run_all.parse_args(["--seed", "0"])  # even the default value: runs take their seeds from --seeds
    with pytest.raises(UserError, match="use --out"):
        run_all.parse_args(["--save_dir", "x"])
    with pytest.raises(UserError, match="use --prompts"):
        run_all.parse_args(["--prompt", "a cat"])
    with pytest.raises(UserError, match="--step 0 must be at least 1"):
        run_all.parse_args(["--step", "0", "--out", str(tmp_path)])
    same = write_prompts(tmp_path, [("a cat", "a dog", None)], "one.json")
    data = json.loads(same.read_text())
    data["other"] = {**data["a_cat"], "img_path": str(tmp_path / "elsewhere.png")}
    same.write_text(json.dumps(data))
    ours, _ = run_all.parse_args(["--prompts", str(same), "--out", str(tmp_path), "--tasks", "pds"])
    with pytest.raises(UserError, match="would both write pds/a_dog.png"):
        run_all.build_items(ours, run_all.load_prompts(ours.prompts))
    ours, _ = run_all.parse_args(["--prompts", str(same), "--out", str(tmp_path), "--tasks", "sds"])
    assert [it.name for it in run_all.build_items(ours, run_all.load_prompts(ours.prompts))] == ["a_cat"]

    result = subprocess.run([sys.executable, str(REPO / "run_all.py"), "--model", "toy", "--prompts",
                             str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 2
    assert "error: prompts file not found" in result.stderr and "Traceback" not in result.stderr


def test_course_json_with_home_paths_finds_the_repo_images(tmp_path, monkeypatch):
    # The course's json writes "$HOME/data/imgs/<name>.png"; the images live in the repo's data/imgs/.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    found = run_all.resolve_source("$HOME/data/imgs/a_cat.png", tmp_path / "p.json")
    assert found in (str(tmp_path / "home" / "data" / "imgs" / "a_cat.png"), str(REPO / "data" / "imgs" / "a_cat.png"))
    monkeypatch.setattr(run_all, "REPO", tmp_path / "repo")
    (tmp_path / "repo" / "data" / "imgs").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "repo" / "data" / "imgs" / "a_cat.png")
    assert run_all.resolve_source("$HOME/data/imgs/a_cat.png", tmp_path / "p.json") == \
        str(tmp_path / "repo" / "data" / "imgs" / "a_cat.png")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_accelerate_processes_split_the_work_exactly_once(tiny_sd_dir, tmp_path):
    prompts = write_prompts(tmp_path, [("a cat", "a dog", None), ("a red house", "a blue house", None)])
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(REPO / "run_all.py"),
               "--model", str(tiny_sd_dir), "--prompts", str(prompts), "--out", str(out), "--seeds", "0", "1",
               "--step", "1", "--log_step", "1", "--clip_pretrained", "none"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "split over 2 processes" in result.stdout

    log = read_log(out)
    done = [(r["task"], r["key"], r["seed"]) for r in log if r["status"] == "finished"]
    expected = {(t, k, s) for t in ("sds", "pds", "vsd") for k in ("a_cat", "a_red_house") for s in (0, 1)}
    assert sorted(done) == sorted(expected)  # each of the 12 runs exactly once
    assert {r["process_index"] for r in log} == {0, 1} and all(r["num_processes"] == 2 for r in log)
    names = {"sds": ["a_cat", "a_red_house"], "pds": ["a_blue_house", "a_dog"], "vsd": ["a_cat", "a_red_house"]}
    for task, stems in names.items():
        for seed in (0, 1):
            folder = out / task / f"seed_{seed}"
            assert sorted(p.stem for p in folder.glob("*.png")) == stems
            scores = json.loads((folder / "eval.json").read_text())
            assert sorted(Path(k).stem for k in scores if k not in ("source_dir", "score", "metrics")) == stems
            for stem in stems:
                config = json.loads((folder / stem / "run_config.json").read_text())
                record = next(r for r in log if r["task"] == task and r["seed"] == seed and r["name"] == stem)
                assert (config["seed"], config["process_index"]) == (seed, record["process_index"])
    assert (out / "report.pdf").read_bytes().startswith(b"%PDF")
    # Only the main process evaluated and reported: one summary line.
    assert result.stdout.count("Report: ") == 1


def test_toy_world_end_to_end(tmp_path, capsys):
    toy_prompts = REPO / "data" / "toy_prompts.json"
    if not toy_prompts.is_file():
        pytest.skip("data/toy_prompts.json (the toy prompt set) is not in this checkout yet")
    out = tmp_path / "out"
    argv = ["--model", "toy", "--out", str(out), "--step", "10", "--log_step", "5", "--device", "cpu"]
    assert run_all.main(argv) == 0  # the default prompts for --model toy: data/toy_prompts.json
    entries = json.loads(toy_prompts.read_text())
    for task in ("sds", "pds", "vsd"):
        field = "edit_prompt" if task == "pds" else "prompt"
        stems = sorted(e[field].replace(" ", "_") for e in entries.values())
        assert sorted(p.stem for p in (out / task).glob("*.png")) == stems
        scores = json.loads((out / task / "eval.json").read_text())
        values = [v for k, v in scores.items() if k not in ("source_dir", "score", "metrics")]
        assert len(values) == len(stems) and all(0.0 <= v <= 1.0 for v in values)  # the toy scorer's range
    assert json.loads((out / "run_all.json").read_text())["scorer"] == "toy"
    assert (out / "report.pdf").read_bytes().startswith(b"%PDF")
    capsys.readouterr()
    assert run_all.main(argv) == 0
    assert "Nothing to do: all 15 runs are finished" in capsys.readouterr().out


def test_a_comparison_can_hold_two_variants_of_a_method(tmp_path):
    """--tasks pds pds+pds_variant=official: both variants run into their own folders, with their own settings, and
    both are rows of the comparison (a task spec that names another method's option is refused)."""
    out = tmp_path / "out"
    argv = ["--model", "toy", "--tasks", "pds", "pds+pds_variant=official", "--step", "20", "--log_step", "0",
            "--out", str(out), "--no_report", "--lpips_weights", "none"]
    assert run_all.main(argv) == 0
    rows = {r["task"]: r for r in json.loads((out / "comparison.json").read_text())}
    assert set(rows) == {"pds", "pds+pds_variant=official"} and rows["pds+pds_variant=official"]["images"] == 5
    for task, variant in (("pds", "paper"), ("pds+pds_variant=official", "official")):
        records = [json.loads(p.read_text()) for p in (out / task).glob("*/run_config.json")]
        assert len(records) == 5 and {r["pds_variant"] for r in records} == {variant}
    with pytest.raises(UserError, match="asd_ratio"):
        run_all.parse_args(["--tasks", "pds+asd_ratio=0.2", "--out", str(tmp_path)])
    with pytest.raises(UserError, match="not one of paper, official"):
        run_all.parse_args(["--tasks", "pds+pds_variant=mine", "--out", str(tmp_path)])
