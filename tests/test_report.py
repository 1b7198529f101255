"""report.py: the PDF's content (captions, scores, grades, notes for what is missing) and a layout without overlaps."""
import json
import re
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from PIL import Image  # noqa: E402

import report  # noqa: E402
from utils import UserError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# The course's longest prompts, so that wrapping is exercised.
ENTRIES = {
    "A_red_bus_driving_on_a_desert_road": ("A red bus driving on a desert road",
                                           "A yellow school bus driving on a desert road"),
    "A_villa_close_to_the_pool": ("A villa close to the pool", "A villa covered with ivy close to the pool"),
    "a_cat_sitting_on_a_table": ("a cat sitting on a table", "a wooden cat statue sitting on a table"),
    "A_car_on_the_road": ("A car on the road", "A yellow sportscar on the road"),
    "A_dog_sitting_on_grass": ("A dog sitting on grass", "A golden retriever sitting on grass"),
    "A_church_beside_a_lake": ("A church beside a lake", "A church beside a lake at night"),
    "a_boat_in_a_river": ("a boat in a river", "a golden boat in a river"),
}


def _image(path: Path, seed: int, size: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def make_outputs(out: Path, tasks=("sds", "pds"), seeds=(0,), skip_image=(), skip_eval=(), skip_loss=()) -> dict:
    """Write a run_all-style output folder without any model; return {(task, seed, name): score}."""
    manifest = {"model": "toy", "scorer": "toy", "prompts_file": "p.json", "tasks": {}}
    scores = {}
    for t, task in enumerate(tasks):
        items = []
        for seed in seeds:
            folder = out / task if len(seeds) == 1 else out / task / f"seed_{seed}"
            evaluation = {"source_dir": str(folder)}
            for i, (key, (prompt, edit)) in enumerate(ENTRIES.items()):
                name = (edit if task == "pds" else prompt).replace(" ", "_")
                items.append({"key": key, "seed": seed, "prompt": prompt, "name": name,
                              "edit_prompt": edit if task == "pds" else None, "src_img_path": None,
                              "folder": str(folder.relative_to(out))})
                run_dir = folder / name
                run_dir.mkdir(parents=True)
                config = {"prompt": prompt, "edit_prompt": edit if task == "pds" else None, "loss_type": task,
                          "seed": seed, "status": "finished", "steps_done": 50, "seconds": 12.5, "model": "toy",
                          "device": "cpu"}
                (run_dir / "run_config.json").write_text(json.dumps(config))
                for step in range(0, 50, 5):
                    _image(run_dir / "progress" / f"step_{step:05d}.png", step, 32)
                if task == "pds":
                    _image(run_dir / "source.png", 100 + i)
                if (task, name) not in skip_loss:
                    losses = np.abs(np.random.default_rng(i).normal(size=50)) * np.linspace(100, 1, 50)
                    rows = "".join(f"{s},{v}\n" for s, v in enumerate(losses))
                    (run_dir / "loss.csv").write_text("step,loss\n" + rows)
                if (task, name) in skip_image:
                    continue
                _image(folder / f"{name}.png", 10 * t + i + seed)
                score = 0.25 + 0.01 * i + 0.003 * seed
                scores[(task, seed, name)] = score
                evaluation[str(folder / f"{name}.png")] = score
            evaluation["score"] = statistics.fmean(v for k, v in evaluation.items() if k != "source_dir")
            if task not in skip_eval:
                (folder / "eval.json").write_text(json.dumps(evaluation))
        manifest["tasks"][task] = {"seeds": list(seeds), "items": items,
                                   "settings": {"guidance_scale": 25 if task == "sds" else 7.5, "step": 50, "lr": 0.1}}
    (out / "run_all.json").write_text(json.dumps(manifest))
    return scores


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text) if t.get_text().strip()]


def all_text(figures) -> str:
    return "\n".join(s.replace("\n", " ") for fig in figures for s in texts(fig))


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _overlap(a, b) -> bool:
    """Return True when two display boxes share more than half a pixel in both directions."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > 0.5 and min(a.y1, b.y1) - max(a.y0, b.y0) > 0.5


def assert_no_overlaps(fig) -> None:
    """Assert that no two texts, and no text and a foreign axes (with its tick labels), overlap or leave the page."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    ours = ("caption", "title", "subtitle", "placeholder")
    items = [(t, t.get_window_extent(renderer)) for t in fig.findobj(Text)
             if t.get_text().strip() and t.get_visible() and t.get_gid() in ours]
    for text, box in items:
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, \
            f"{text.get_text()!r} leaves the page"
        assert text.get_fontsize() >= report.SMALL, f"{text.get_text()!r} is smaller than {report.SMALL} pt"
    axes_boxes = [(ax, ax.get_tightbbox(renderer)) for ax in fig.axes]
    for i, (a, box_a) in enumerate(items):
        for b, box_b in items[i + 1:]:
            assert not _overlap(box_a, box_b), f"{a.get_text()!r} overlaps {b.get_text()!r}"
        for ax, box in axes_boxes:
            if a.axes is ax:
                continue
            assert not _overlap(box_a, box), f"{a.get_text()!r} overlaps a picture or plot"


def test_report_shows_every_image_with_prompt_score_and_gaps(tmp_path):
    skipped = ("pds", "A_golden_retriever_sitting_on_grass")
    scores = make_outputs(tmp_path, tasks=("sds", "pds", "vsd"), skip_image=[skipped], skip_eval=["vsd"],
                          skip_loss=[("sds", "A_car_on_the_road")])
    collected = report.collect(tmp_path)
    assert [t.task for t in collected.tasks] == ["sds", "vsd", "pds"]  # the reference, generation, then edits
    sds = collected.tasks[0]
    assert sds.mean == pytest.approx(statistics.fmean(v for (t, _, _), v in scores.items() if t == "sds"))
    figures = report.render(collected)
    try:
        # title + (one grid page + two progress pages) for SDS and VSD + (two pair pages + two progress pages) for PDS
        assert len(figures) == 1 + 3 + 4 + 3
        words = all_text(figures)
        title = all_text(figures[:1])
        assert f"{sds.mean:.4f}" in title and "± " in title
        assert "no eval.json in vsd" in title and "1 of 7 images missing: A_golden_retriever_sitting_on_grass" in title
        assert report._grade(sds.mean) in title  # mean 0.28 -> full points
        for (task, _, name), score in scores.items():
            assert f"score {score:.4f}" in words
        for prompt, edit in ENTRIES.values():
            assert prompt in words and edit in words
        assert "missing:A_golden_retriever_sitting_on_grass.png" in squash(words)  # wrapped inside its box
        assert "no loss curve (loss.csv missing)" in words
        assert "score n/a" in words  # VSD without eval.json
        for page in (0, 1, 2, 4, 6):  # one page of each kind, with the missing image and the missing loss.csv
            assert_no_overlaps(figures[page])
    finally:
        for fig in figures:
            plt.close(fig)

    pdf = report.write_report(tmp_path)
    data = pdf.read_bytes()
    assert pdf == tmp_path / "report.pdf" and data.startswith(b"%PDF")
    assert len(re.findall(rb"/Type\s*/Page\b(?!s)", data)) == len(figures)


def test_grades_follow_the_course_thresholds():
    assert report._grade(0.2801).startswith("full")
    assert report._grade(0.28).startswith("full")
    assert report._grade(0.27).startswith("half")
    assert report._grade(0.2599).startswith("below")
    assert report._grade(None) == "no score"


def test_several_seeds_give_mean_and_spread_over_seeds(tmp_path):
    scores = make_outputs(tmp_path, tasks=("sds",), seeds=(0, 1, 2))
    result = report.collect(tmp_path).tasks[0]
    per_seed = [statistics.fmean(v for (_, s, _), v in scores.items() if s == seed) for seed in (0, 1, 2)]
    assert result.mean == pytest.approx(statistics.fmean(per_seed))
    assert result.spread() == f"± {statistics.stdev(per_seed):.4f} (std over 3 seeds)"
    figures = report.render(report.collect(tmp_path))
    try:
        assert "seed 2" in all_text(figures[1:2])
        assert len(figures) == 1 + 3 + 5  # 21 images: 3 grid pages, 5 progress pages
        assert_no_overlaps(figures[1])
    finally:
        for fig in figures:
            plt.close(fig)


def test_course_folder_without_manifest_or_eval(tmp_path):
    # A hand-made course submission: PNGs only, no run_all.json, no run folders, no eval.json.
    _image(tmp_path / "sds" / "A_castle_next_to_a_river.png", 0)
    _image(tmp_path / "pds" / "A_rainbow_castle_next_to_a_river.png", 1)
    collected = report.collect(tmp_path)
    assert [(t.task, [r.name for r in t.runs]) for t in collected.tasks] == \
        [("sds", ["A_castle_next_to_a_river"]), ("pds", ["A_rainbow_castle_next_to_a_river"])]
    words = all_text(report.render(collected))
    plt.close("all")
    assert "A castle next to a river" in words and "A rainbow castle next to a river" in words
    assert "no eval.json in sds" in words and "source.png" in words  # the PDS source is a visible gap
    assert report.write_report(tmp_path).is_file()


def test_empty_or_wrong_folder(tmp_path):
    # Nothing to report is an error, not a PDF that says "nothing to report" beside "every image present and scored".
    with pytest.raises(UserError, match="nothing to report in"):
        report.write_report(tmp_path)
    assert not (tmp_path / "report.pdf").exists()
    with pytest.raises(UserError, match="is not a folder"):
        report.write_report(tmp_path / "nope")


def test_unreadable_files_become_notes_not_crashes(tmp_path):
    make_outputs(tmp_path, tasks=("sds",))
    (tmp_path / "sds" / "A_car_on_the_road.png").write_bytes(b"not a png")
    (tmp_path / "sds" / "eval.json").write_text("{broken")
    (tmp_path / "sds" / "A_car_on_the_road" / "loss.csv").write_text("step,loss\n0,nan\n1,abc\n")
    words = all_text(report.render(report.collect(tmp_path)))
    plt.close("all")
    assert "unreadable:A_car_on_the_road.png" in squash(words)
    assert "no eval.json in sds" in words


def test_overlap_check_catches_overlaps():
    page = report.Page("A title")
    page.text(1.0, 2.0, "one caption")
    page.text(1.2, 2.02, "another caption")
    try:
        with pytest.raises(AssertionError, match="overlaps"):
            assert_no_overlaps(page.fig)
    finally:
        plt.close(page.fig)
    page = report.Page("A title")
    page.axes(1.0, 2.0, 1.0, 1.0)
    page.text(1.5, 2.5, "a caption on a picture")
    try:
        with pytest.raises(AssertionError, match="overlaps a picture"):
            assert_no_overlaps(page.fig)
    finally:
        plt.close(page.fig)
