"""What report.py reads: a run_all.py output folder (or a hand-made course-style one) as tasks of runs, each run
through its RunFolder, with the scores of each folder's eval.json. Nothing missing stops it: a run without its image,
a folder without eval.json, an unreadable file become notes the pages show."""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from guidance.methods import parse_task, task_method, task_order
from guidance.runfolder import RunFolder
from utils import prompt_for_stem

MANIFEST = "run_all.json"


@dataclass
class Run:
    """One image of the report: where its files are and what is known about it."""

    task: str
    name: str  # the course file stem
    prompt: str  # generation prompt (PDS: the source's prompt)
    edit_prompt: str | None
    seed: int | None
    folder: Path
    config: dict | None = None
    score: float | None = None

    @property
    def files(self) -> RunFolder:
        """Return the run's folder (guidance/runfolder.py): its image, record, losses, progress images."""
        return RunFolder(self.folder, self.name)

    @property
    def image(self) -> Path:
        return self.files.image

    @property
    def run_dir(self) -> Path:
        return self.files.dir

    @property
    def caption_prompt(self) -> str:
        return self.edit_prompt if is_edit_task(self.task) and self.edit_prompt else self.prompt

    @property
    def status(self) -> str:
        """Return finished | running | diverged | interrupted | no record (a PNG without main.py's record) | missing."""
        return self.files.status()


@dataclass
class TaskResult:
    """A task's runs and scores."""

    task: str
    seeds: list
    runs: list[Run]
    settings: dict
    seed_scores: dict = field(default_factory=dict)  # seed -> eval.json's mean score (None: no eval.json)
    notes: list[str] = field(default_factory=list)

    @property
    def scores(self) -> list[float]:
        return [s for s in self.seed_scores.values() if s is not None]

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.scores) if self.scores else None

    def spread(self) -> str:
        """Return the spread of the score in words: std over seeds, or over images with one seed."""
        if len(self.scores) > 1:
            return f"± {statistics.stdev(self.scores):.4f} (std over {len(self.scores)} seeds)"
        image_scores = [r.score for r in self.runs if r.score is not None]
        if len(image_scores) > 1:
            return f"± {statistics.stdev(image_scores):.4f} (std over {len(image_scores)} images)"
        return "n/a"


@dataclass
class Report:
    out_dir: Path
    manifest: dict
    tasks: list[TaskResult]


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _seed_folders(task_dir: Path) -> list[tuple[int | None, Path]]:
    seeded = sorted((int(d.name[5:]), d) for d in task_dir.glob("seed_*") if d.is_dir() and d.name[5:].isdigit())
    return seeded or [(None, task_dir)]


def _discover_runs(task: str, folder: Path, seed) -> list[Run]:
    """Return the runs in a course-style folder without a manifest: every PNG and every run folder."""
    names = {p.stem for p in folder.glob("*.png") if not p.name.startswith(".")}
    names |= {d.name for d in folder.iterdir() if (d / "run_config.json").is_file()}
    runs = []
    for name in sorted(names):
        config = RunFolder(folder, name).read_config()
        # The name is the prompt only for ordinary prompts (prompt_to_filename makes hostile or long ones safe).
        prompt = (config or {}).get("prompt") or prompt_for_stem(folder, name)
        edit = (config or {}).get("edit_prompt") if is_edit_task(task) else None
        if is_edit_task(task) and not edit:
            edit = prompt_for_stem(folder, name)
        runs.append(Run(task, name, prompt, edit, (config or {}).get("seed", seed), folder, config))
    return runs


def collect(out_dir: str | Path) -> Report:
    """Return what the report shows, read from OUT/run_all.json (if any), the run folders and the eval.json files."""
    out = Path(out_dir)
    manifest = _read_json(out / MANIFEST) or {}
    listed = manifest.get("tasks", {})
    results = []
    folders = [d.name for d in sorted(out.iterdir()) if d.is_dir()] if out.is_dir() else []
    for task in sorted({t for t in [*listed, *folders] if _is_task(t)}, key=task_order):
        entry = listed.get(task)
        if entry:
            runs = [Run(task, it["name"], it["prompt"], it.get("edit_prompt"), it.get("seed"), out / it["folder"])
                    for it in entry.get("items", [])]
            seeds = list(entry.get("seeds", []))
        else:
            runs, seeds = [], []
            for seed, folder in _seed_folders(out / task):
                runs += _discover_runs(task, folder, seed)
                seeds.append(seed)
        result = TaskResult(task, seeds, runs, dict((entry or {}).get("settings", {})))
        for run in runs:
            run.config = run.files.read_config()
        if not result.settings:
            config = next((r.config for r in runs if r.config), {})
            result.settings = {k: config[k] for k in ("guidance_scale", "step", "lr", "negative_prompt", "precision",
                                                       "weighting", "num_particles") if k in config}
        _attach_scores(result, out, (entry or {}).get("eval_errors", {}))
        missing = [r for r in runs if not r.image.is_file()]
        if missing:
            result.notes.append(f"{len(missing)} of {len(runs)} images missing: "
                                + ", ".join(f"{r.name}" + (f" (seed {r.seed})" if len(seeds) > 1 else "")
                                            for r in missing[:6]) + (" ..." if len(missing) > 6 else ""))
        unfinished = [r for r in runs if r.image.is_file() and r.status not in ("finished", "no record")]
        if unfinished:
            result.notes.append(f"{len(unfinished)} image(s) are from runs that did not finish "
                                f"({', '.join(sorted({r.status for r in unfinished}))})")
        results.append(result)
    return Report(out, manifest, results)


def _attach_scores(result: TaskResult, out: Path, eval_errors: dict) -> None:
    """Fill run scores and per-seed means from each folder's eval.json; note missing or failed evaluations."""
    folders = {}
    for run in result.runs:
        folders.setdefault(run.folder, []).append(run)
    for folder, runs in folders.items():
        evaluation = _read_json(folder / "eval.json")
        where = folder.relative_to(out) if folder.is_relative_to(out) else folder
        error = eval_errors.get(str(where))
        if evaluation is None:
            result.seed_scores[runs[0].seed] = None
            result.notes.append(f"no eval.json in {where}: scores unknown"
                                + (f" (evaluation failed: {error})" if error else
                                   f" (run `python eval.py --fdir1 {where}`)"))
            continue
        if error:
            result.notes.append(f"the last evaluation of {where} failed ({error}); eval.json is older")
        by_name = {Path(k).name: v for k, v in evaluation.items() if k not in ("source_dir", "score", "metrics")}
        for run in runs:
            value = by_name.get(run.image.name)
            run.score = float(value) if isinstance(value, (int, float)) else None
        unscored = [r.name for r in runs if r.score is None and r.image.is_file()]
        if unscored:
            result.notes.append(f"{len(unscored)} image(s) in {where} have no score in its eval.json ("
                                + ", ".join(unscored[:3]) + (" ..." if len(unscored) > 3 else "")
                                + f"): run `python eval.py --fdir1 {where}` again")
        score = evaluation.get("score")
        result.seed_scores[runs[0].seed] = float(score) if isinstance(score, (int, float)) else None


def _is_task(name: str) -> bool:
    """Return whether a folder or manifest name is a task: a method, or a method with its options (run_all.py)."""
    try:
        parse_task(name)
    except ValueError:
        return False
    return True


def is_edit_task(task: str) -> bool:
    return _is_task(task) and task_method(task).edits


def task_title(task: str) -> str:
    """Return a task's page title: its name, the method's title, editing or generation."""
    method = task_method(task)
    return f"{task.upper()}: {method.title} ({'editing' if method.edits else 'generation'})"


def read_list(path: Path) -> list | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, list) else None
