"""Prompts are untrusted input: the file names made from them stay inside the save folder, on every OS, and eval.py,
report.py and run_all.py still find each image's prompt."""
from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

import pytest

import eval as evaluation
import main
import report
import run_all
from utils import MAX_NAME_BYTES, filename_to_prompt, prompt_for_stem, prompt_to_filename, run_cli

REPO = Path(__file__).resolve().parent.parent
LONG = "a red circle " + "very " * 60  # 313 characters: over every file system's 255-byte limit
HOSTILE = ["x/../../y", "..", ".", "/etc/passwd", "CON", "con.txt", "LPT9", LONG, "a red\ncircle", "tab\there",
           "a red circle/../../escape", "/etc/a red circle", "..\\..\\windows", 'what? <a> "b" | c*: d', "trailing.",
           "  .hidden  ", "a\x00b", "bidi \u202e override", "ünïcödé " * 40, "a/b", "a_b", "-"]
# Hostile prompts the toy world can score: each names a colour and a shape.
TOY_HOSTILE = ["a red circle/../../escape", "/etc/a blue square", "CON.green.circle", "a yellow\nsquare",
               "a green square " + "very " * 60, "..\\a red square"]
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def course_prompts() -> list[str]:
    prompts = []
    for path in (REPO / "data" / "prompt_img_pairs.json", REPO / "data" / "toy_prompts.json"):
        for entry in json.loads(path.read_text()).values():
            prompts += [entry["prompt"], entry["edit_prompt"]]
    return prompts


def assert_safe(name: str) -> None:
    """Assert that name is one plain file name that Linux, macOS and Windows all accept."""
    assert name and name not in (".", "..") and not name.startswith("."), name
    assert "/" not in name and "\\" not in name and ".." not in name, name
    assert not any(ch in name for ch in '<>:"|?*'), name
    assert not any(unicodedata.category(ch)[0] == "C" for ch in name), repr(name)
    assert not name.endswith((".", " ")), name
    assert name.split(".")[0].upper() not in WINDOWS_RESERVED, name
    assert len(name.encode("utf-8")) <= MAX_NAME_BYTES, len(name.encode("utf-8"))
    assert len(f".{name}.png.abcdefgh.tmp".encode("utf-8")) <= 255  # the atomic write's temporary twin fits too


def test_course_names_are_unchanged():
    for prompt in course_prompts():
        assert prompt_to_filename(prompt) == prompt.replace(" ", "_")
        assert filename_to_prompt(prompt_to_filename(prompt)) == prompt
    assert prompt_to_filename("A castle next to a river") == "A_castle_next_to_a_river"


@pytest.mark.parametrize("prompt", HOSTILE)
def test_hostile_prompts_give_one_safe_name_inside_the_folder(prompt, tmp_path):
    name = prompt_to_filename(prompt)
    assert_safe(name)
    assert prompt_to_filename(name) == name  # a safe name is its own name (run_all and eval agree with main)
    for path in (tmp_path / name, tmp_path / f"{name}.png"):
        assert path.resolve().parent == tmp_path.resolve()


def test_hostile_names_are_distinct_and_stable():
    names = [prompt_to_filename(p) for p in HOSTILE]
    assert len(set(names)) == len(names)  # "a/b" and "a_b" included: a hash keeps apart what sanitising merges
    assert names == [prompt_to_filename(p) for p in HOSTILE]
    assert prompt_to_filename(LONG).startswith("a_red_circle_very_very")  # shortened, still readable
    assert prompt_to_filename("a red circle/../../escape").startswith("a_red_circle_escape-")


def _tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("prompt", ["x/../../y", "..", "/etc/passwd", "CON", LONG, "a red\ncircle"])
def test_cli_with_a_hostile_prompt_writes_only_inside_save_dir(prompt, tmp_path, capsys, tiny_sd_dir):
    # Stable Diffusion (the tiny one) takes any text; the toy world would refuse these prompts as undrawable.
    save_dir = tmp_path / "a" / "b" / "out"
    before = _tree(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: main.main(["--model", str(tiny_sd_dir), "--prompt", prompt, "--step", "3", "--log_step", "1",
                                   "--save_dir", str(save_dir), "--device", "cpu"]))
    out, err = capsys.readouterr()
    assert exc.value.code == 0, err
    assert "Traceback" not in out + err
    new = _tree(tmp_path) - before
    outside = [p for p in new if p != save_dir and save_dir not in p.parents and p not in save_dir.parents]
    assert outside == []
    name = prompt_to_filename(prompt)
    assert sorted(p.name for p in save_dir.iterdir()) == sorted([name, f"{name}.png"])
    record = json.loads((save_dir / name / "run_config.json").read_text())
    assert record["prompt"] == prompt and record["status"] == "finished"
    assert not Path("/etc/passwd.png").exists() and not Path("/etc/a_red_circle.png").exists()


class RecordingScorer:
    """The toy scorer, noting the prompt each image was scored with."""

    def __init__(self):
        from guidance.toy import ToyScorer

        self.inner, self.prompts = ToyScorer(), []

    def score(self, images, prompts):
        self.prompts += prompts
        return self.inner.score(images, prompts)


def test_eval_and_report_take_the_prompt_from_run_config(tmp_path, capsys):
    folder = tmp_path / "sds"
    for prompt in TOY_HOSTILE:
        args = main.parse_args(["--model", "toy", "--prompt", prompt, "--step", "2", "--log_step", "0",
                                "--save_dir", str(folder)])
        main.run(main.build_model(args), args, progress=False)
    scorer = RecordingScorer()
    result = evaluation.evaluate_dir(folder, scorer=scorer)
    names = sorted(f"{prompt_to_filename(p)}.png" for p in TOY_HOSTILE)
    assert sorted(Path(k).name for k in result if k not in ("source_dir", "score", "metrics")) == names
    by_name = {f"{prompt_to_filename(p)}.png": p for p in TOY_HOSTILE}
    assert scorer.prompts == [by_name[n] for n in names]  # the prompt itself, not the name read back
    # The CLI too, with the toy scorer: exit 0 and every image scored.
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: evaluation.main(["--fdir1", str(folder), "--scorer", "toy"]))
    assert exc.value.code == 0, capsys.readouterr().err
    assert len(json.loads((folder / "eval.json").read_text())) == len(TOY_HOSTILE) + 2

    runs = {r.name: r for r in report.collect(tmp_path).tasks[0].runs}
    assert {name: run.prompt for name, run in runs.items()} == {Path(n).stem: p for n, p in by_name.items()}


def test_prompt_for_stem_uses_the_prompts_file_then_the_course_rule(tmp_path):
    prompts = {"k": {"prompt": "a red circle/../../escape", "edit_prompt": "CON.blue.circle"}}
    assert prompt_for_stem(tmp_path, prompt_to_filename("CON.blue.circle"), prompts) == "CON.blue.circle"
    assert prompt_for_stem(tmp_path, prompt_to_filename("a red circle/../../escape"), prompts) == \
        "a red circle/../../escape"
    assert prompt_for_stem(tmp_path, "A_castle_next_to_a_river") == "A castle next to a river"  # no record: the rule
    # A record whose prompts do not make this name (a renamed file) is not believed.
    (tmp_path / "a_cat").mkdir()
    (tmp_path / "a_cat" / "run_config.json").write_text(json.dumps({"prompt": "a dog", "edit_prompt": None}))
    assert prompt_for_stem(tmp_path, "a_cat") == "a cat"


def test_run_all_with_hostile_prompts_stays_inside_out(tmp_path, capsys):
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps({
        "escape": {"prompt": "a red circle/../../escape", "edit_prompt": "/etc/a blue circle",
                   "img_path": str(REPO / "data" / "toy_imgs" / "a_red_circle.png")}}))
    out = tmp_path / "deep" / "out"
    before = _tree(tmp_path)
    code = run_all.main(["--model", "toy", "--tasks", "sds", "pds", "--prompts", str(prompts_file), "--out", str(out),
                         "--step", "2", "--log_step", "0", "--no_report"])
    capsys.readouterr()
    assert code == 0
    assert all(out in p.parents or p == out or p in out.parents for p in _tree(tmp_path) - before)
    sds = json.loads((out / "sds" / "eval.json").read_text())
    pds = json.loads((out / "pds" / "eval.json").read_text())
    assert {Path(k).name for k in sds if k not in ("source_dir", "score", "metrics")} == \
        {prompt_to_filename("a red circle/../../escape") + ".png"}
    assert {Path(k).name for k in pds if k not in ("source_dir", "score", "metrics")} == \
        {prompt_to_filename("/etc/a blue circle") + ".png"}
    assert os.path.isfile(out / "sds" / (prompt_to_filename("a red circle/../../escape") + ".png"))
