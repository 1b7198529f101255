"""Run the whole assignment: every prompt for SDS, PDS and VSD, then each task's eval.json and report.pdf.

    python run_all.py --tasks sds pds vsd                        # the course's 30 runs into outputs/
    python run_all.py --model toy --out toy_outputs              # the toy world: offline, minutes on a CPU
    python run_all.py --tasks vsd --seeds 0 1 2 --step 300       # any other main.py flag passes through
    accelerate launch --num_processes 4 run_all.py --tasks sds pds vsd       # split over 4 GPUs
    accelerate launch --multi_gpu --num_processes 2 run_all.py ...           # 2 processes on a CPU-only machine

Layout (the course's): OUT/<task>/<name>.png with main.py's files for that run in OUT/<task>/<name>/, or
OUT/<task>/seed_<s>/<name>.png when several seeds are asked; OUT/<task>/eval.json (eval.py's schema),
OUT/report.pdf, OUT/run_all.json (the settings and items the report reads) and OUT/logs/process_<i>.jsonl
(one line per run a process attempted). A run counts as done only when its run_config.json says
'finished' with the same settings (main.py writes that after the PNG); done runs are skipped unless
--overwrite. The model is loaded once per process; failures are reported and the other runs go on.
"""
from __future__ import annotations

from utils import interrupt_quietly  # first: Ctrl-C while torch and the rest import exits 130 quietly

interrupt_quietly(__name__)

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from guidance.config import RunConfig
from guidance.methods import METHODS, OPTION_FLAGS, parse_task, task_method, task_order
from guidance.models import world
from guidance.runfolder import RunFolder, changed_settings
from utils import (CliParser, UserError, add_config_arguments, check_writable_dir, config_from_args, prompt_to_filename,
                   run_cli, save_json_atomic)

REPO = Path(__file__).resolve().parent
# Every method of the table, in the order each process runs them: the course's three first, methods with a LoRA
# (VSD) last, since a LoRA is only removed, never undone.
TASKS = tuple(sorted(METHODS, key=lambda name: (METHODS[name].lora, name not in ("sds", "pds"))))
COURSE_TASKS = ("sds", "pds", "vsd")
def eval_task(task: str) -> str:
    """Return eval.py's --task for a run_all task: edit for editing methods, else gen."""
    return "edit" if task_method(task).edits else "gen"



DEFAULT_PROMPTS = REPO / "data" / "prompt_img_pairs.json"
MANIFEST = "run_all.json"
# main.py flags that run_all sets per run, and the run_all flag to use instead.
PER_RUN_FLAGS = {"prompt": "--prompts FILE", "edit_prompt": "--prompts FILE", "src_img_path": "--prompts FILE",
                 "save_dir": "--out DIR", "loss_type": "--tasks", "seed": "--seeds"}
# Settings shown on the report's title page.
SETTING_KEYS = ("guidance_scale", "step", "lr", "negative_prompt", "precision", "weighting", "num_particles",
                "lora_lr", "vsd_lora_timestep", "log_step")
BARRIER_TIMEOUT = timedelta(hours=24)  # processes wait for each other's whole share of runs


@dataclass(frozen=True)
class Item:
    """One run of the batch: a task, a prompts-file entry and a seed."""

    task: str
    key: str
    seed: int
    prompt: str
    edit_prompt: str | None
    src_img_path: str | None
    save_dir: Path

    @property
    def name(self) -> str:
        if task_method(self.task).edits:
            return prompt_to_filename(self.edit_prompt) if self.edit_prompt else self.key
        return prompt_to_filename(self.prompt)

    @property
    def folder(self) -> RunFolder:
        """Return the run's folder (guidance/runfolder.py): its image, record, losses and latents."""
        return RunFolder(self.save_dir, self.name)

    @property
    def image_path(self) -> Path:
        return self.folder.image

    @property
    def run_dir(self) -> Path:
        return self.folder.dir

    def label(self) -> str:
        return f"{self.task} seed {self.seed} {self.name}"


# ----------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    """Return run_all.py's own parser (main.py's flags are parsed by main.py's parser)."""
    p = CliParser(
        description="Run every prompt of the assignment for SDS, PDS and VSD, evaluate each task and write report.pdf.",
        allow_abbrev=False,  # so that main.py's --seed / --prompt are not taken for --seeds / --prompts
        epilog="Every other main.py flag (python main.py --help) passes through to each run, e.g. --model, --step, "
               "--guidance_scale (default per task: sds 25/500 steps, pds 7.5/200, vsd 7.5/500), --lr, --log_step, "
               "--device, --precision, --gif. Several processes: accelerate launch --num_processes N run_all.py ...")
    p.add_argument("--tasks", nargs="+", default=list(COURSE_TASKS), metavar="TASK",
                   help=f"methods to run (default: the course's {' '.join(COURSE_TASKS)}); any of {' '.join(TASKS)}, "
                        f"or a method with its own options set, as METHOD+OPTION=VALUE (e.g. pds+pds_variant=official, "
                        f"sdi+sdi_inversion_guidance=null+sdi_inversion_eta=0): a comparison can hold both variants")
    p.add_argument("--prompts", default=None,
                   help="course-schema prompts json {key: {prompt, edit_prompt, img_path}} (default "
                        "data/prompt_img_pairs.json; data/toy_prompts.json with --model toy)")
    p.add_argument("--out", default="outputs", help="output folder (default outputs)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="seeds per prompt (default 0); several are stored apart in <task>/seed_<s>/")
    p.add_argument("--overwrite", action="store_true", help="redo runs that are already finished")
    p.add_argument("--clip_pretrained", default="openai",
                   help="CLIP weights for the evaluation: open_clip tag, local checkpoint file, or 'none' (random; "
                        "tests only). --model toy uses the toy scorer instead")
    p.add_argument("--metrics", nargs="+", default=["clip", "clip_direction", "lpips"],
                   choices=("clip", "clip_direction", "lpips"),
                   help="edit tasks' metrics beside the CLIP score (eval.py --metrics; default all three): "
                        "clip_direction needs CLIP (not the toy scorer); lpips is skipped with a note where its "
                        "AlexNet weights cannot be had")
    p.add_argument("--lpips_weights", default="pretrained", choices=("pretrained", "none"),
                   help="eval.py --lpips_weights (none: random weights, tests only)")
    p.add_argument("--no_eval", action="store_true", help="skip the evaluation (eval.json)")
    p.add_argument("--no_report", action="store_true", help="skip report.pdf")
    shared = p.add_argument_group("every main.py flag (shared by all runs; python main.py --help)")
    add_config_arguments(shared, RunConfig, skip=("overwrite",), none_required=True)
    return p


def parse_args(argv=None) -> tuple[argparse.Namespace, RunConfig]:
    """Return (run_all's options, the run configuration every run shares, unresolved), checked before any model loads."""
    ours = build_parser().parse_args(argv)
    for dest, instead in PER_RUN_FLAGS.items():
        if getattr(ours, dest) is not None:
            raise UserError(f"--{dest} is set by run_all for each run: use {instead} instead")
    base = config_from_args(ours, RunConfig)
    for task in ours.tasks:
        try:
            parse_task(task)
        except ValueError as err:
            raise UserError(f"--tasks: {err}") from None
    ours.tasks = sorted(dict.fromkeys(ours.tasks), key=lambda t: (task_method(t).lora, t.split("+")[0] not in
                                                                  ("sds", "pds"), task_order(t)))
    ours.seeds = list(dict.fromkeys(ours.seeds))
    found = world(base.model)
    if ours.prompts is None:
        ours.prompts = str(found.prompts_file if found is not None else DEFAULT_PROMPTS)
    for dest in OPTION_FLAGS:  # a method's own flag applies to that method's runs; one no task uses is a mistake
        if getattr(base, dest) is not None and not any(dest in task_method(t).options for t in ours.tasks):
            owners = " / ".join(name for name, m in METHODS.items() if dest in m.options)
            raise UserError(f"--{dest} belongs to {owners}, which --tasks does not include: drop it or add the task")
    check_writable_dir(ours.out, flag="--out", what="output folder")
    # Check the flags that all runs share now (e.g. --step 0), with a stand-in run of a generation task (a prompt the
    # model can draw: each entry's own prompt is checked with its run).
    probe = found.example[0] if found is not None else "probe"
    _own_options(base, "sds").replace(prompt=probe, loss_type="sds", seed=0, save_dir=ours.out).resolved()
    return ours, base


def _own_options(base: RunConfig, task: str) -> RunConfig:
    """Return a copy of the shared configuration without the method options that `task` does not own, and with the
    options the task sets (METHOD+OPTION=VALUE)."""
    method, options = parse_task(task)
    return base.replace(**{dest: None for dest in OPTION_FLAGS if dest not in method.options}, **options)


def load_prompts(path: str) -> dict:
    """Return the prompts file's entries (eval.py's loader: course schema, checked)."""
    from eval import load_prompts_file

    if not Path(path).is_file():
        fix = ("run `python data/download.py` to fetch the course's prompts and images" if Path(path) == DEFAULT_PROMPTS
               else "pass an existing course-schema json with --prompts")
        raise UserError(f"prompts file not found: {path}: {fix}")
    return load_prompts_file(path)


def resolve_source(img_path: str, prompts_file: Path) -> str:
    """Return the source image path of an entry: $VARS and ~ expanded; relative paths tried from the working
    folder, the prompts file's folder and the repo; finally data/imgs/<file name> in the repo, because the
    course's json writes '$HOME/data/imgs/...'. Returns the first candidate if none exists (reported later)."""
    raw = Path(os.path.expanduser(os.path.expandvars(img_path)))
    candidates = [raw] if raw.is_absolute() else [Path.cwd() / raw, prompts_file.parent / raw, REPO / raw]
    candidates.append(REPO / "data" / "imgs" / raw.name)
    return str(next((c for c in candidates if c.is_file()), candidates[0]))


def task_dir(out: Path, task: str, seed: int, seeds: list[int]) -> Path:
    """Return where a task's runs for a seed go: OUT/<task>/ for one seed, OUT/<task>/seed_<s>/ for several."""
    return out / task if len(seeds) == 1 else out / task / f"seed_{seed}"


def build_items(ours: argparse.Namespace, prompts: dict) -> list[Item]:
    """Return every (task, entry, seed) run in execution order: task (sds, pds, vsd), then seed, then entry."""
    out, prompts_file = Path(ours.out), Path(ours.prompts)
    items, owner = [], {}
    for task in ours.tasks:
        for seed in ours.seeds:
            for key, entry in prompts.items():
                edits = task_method(task).edits
                edit = entry.get("edit_prompt") if edits else None
                src = entry.get("img_path") if edits else None
                item = Item(task, key, seed, entry["prompt"], edit if isinstance(edit, str) else None,
                            resolve_source(src, prompts_file) if isinstance(src, str) and src else None,
                            task_dir(out, task, seed, ours.seeds))
                slot = (task, seed, item.name)
                if slot in owner:
                    first = owner[slot]
                    if (first.prompt, first.edit_prompt, first.src_img_path) == (item.prompt, item.edit_prompt,
                                                                                 item.src_img_path):
                        continue  # the same run listed twice
                    field_name = "edit_prompt" if edits else "prompt"
                    raise UserError(f"prompts entries {first.key!r} and {key!r} would both write {task}/"
                                    f"{item.name}.png: give them different {field_name}s")
                owner[slot] = item
                items.append(item)
    return items


def item_args(item: Item, base: RunConfig) -> RunConfig:
    """Return the resolved run configuration of one item (UserError names what is wrong with this entry)."""
    if task_method(item.task).edits and (item.edit_prompt is None or item.src_img_path is None):
        missing = "edit_prompt" if item.edit_prompt is None else "img_path"
        raise UserError(f"prompts entry {item.key!r} has no {missing}, which {item.task.upper()} needs")
    return _own_options(base, item.task).replace(
        prompt=item.prompt, edit_prompt=item.edit_prompt, src_img_path=item.src_img_path,
        loss_type=task_method(item.task).name, seed=item.seed, save_dir=str(item.save_dir),
        overwrite=True).resolved()  # run_all decides what to redo


def completion(item: Item, args: RunConfig) -> tuple[bool, str]:
    """Return (done, why not): done when run_config.json says finished with the same result settings (every field of
    RunConfig that changes a result) and the PNG exists."""
    if not item.folder.config_path.exists():
        return False, "not run yet"
    config = item.folder.read_config()
    if config is None:
        return False, "its run_config.json is unreadable"
    if config.get("status") == "running":
        return False, "its last run did not finish (it crashed or was stopped)"
    if config.get("status") != "finished":
        return False, f"its last run {config.get('status')}"
    if not item.image_path.is_file():
        return False, f"{item.image_path.name} is missing"
    wanted = args.to_record()
    changed = [f"{k} {config.get(k)!r} -> {wanted[k]!r}"
               for k in changed_settings(config, wanted, RunConfig.result_fields())]
    if changed:
        return False, "settings changed: " + ", ".join(changed)
    return True, "finished"


# ----------------------------------------------------------------------------------------------- running
class Batch:
    """One process's part of the batch: its runs against one model loaded on first need."""

    def __init__(self, base: RunConfig, process_index: int, num_processes: int, out: Path, device: str | None):
        self.base = base
        self.process_index = process_index
        self.num_processes = num_processes
        self.device = device
        self.model = None
        self.prompts: list[str] = []  # every prompt of this process's runs: encoded at load, then the encoders freed
        self.log_path = out / "logs" / f"process_{process_index}.jsonl"
        self.prefix = f"[p{process_index}] " if num_processes > 1 else ""

    def load_model(self, config: RunConfig):
        """Return the batch's model, loading it (and encoding every prompt of the batch) on first need; run_share stops
        the batch when this fails."""
        import main

        if self.model is None:
            print(f"{self.prefix}loading {config.model} ...", flush=True)
            self.model = main.build_model(config if self.device is None else config.replace(device=self.device))
            main.encode_then_free_text_encoders(self.model, self.prompts)
        return self.model

    def record(self, item: Item, status: str, seconds: float = 0.0, message: str = "") -> dict:
        """Append what happened to a run to this process's log; return the record."""
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "process_index": self.process_index,
                 "num_processes": self.num_processes, "task": item.task, "key": item.key, "seed": item.seed,
                 "name": item.name, "status": status, "seconds": round(seconds, 3), "message": message}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
        return entry

    def run_one(self, item: Item, config: RunConfig, progress: bool) -> dict:
        """Run one item; return its record. A KeyboardInterrupt during the run comes back as status 'interrupted'."""
        import main

        model = self.load_model(config)  # main.run() removes any LoRA an earlier VSD run left on it
        result = main.run(model, config.replace(device=str(model.device)), progress=progress)
        record = item.folder.read_config() or {}  # which process made it, kept in run_config.json
        item.folder.write_config({**record, "process_index": self.process_index, "num_processes": self.num_processes})
        message = {"finished": "", "diverged": f"the loss became NaN/inf at step {result.steps_done}; the last "
                                               f"finite image is {result.image_path}",
                   "interrupted": f"interrupted at step {result.steps_done}"}[result.status]
        return self.record(item, result.status, result.seconds, message)


def run_share(batch: Batch, share: list[tuple[Item, RunConfig | None, str]], progress: bool) -> list[dict]:
    """Run this process's share of the pending items; return their records (stops after an interruption)."""
    from guidance.methods import run_prompts

    records = []
    batch.prompts = [prompt for _, args, error in share if not error for prompt in run_prompts(args)]
    for n, (item, args, error) in enumerate(share, 1):
        head = f"{batch.prefix}[{n}/{len(share)}] {item.label()}"
        if error:
            print(f"{head}: FAILED: {error}", file=sys.stderr, flush=True)
            records.append(batch.record(item, "failed", message=error))
            continue
        print(f"{head} ...", flush=True)
        # Outside the run's try: a model that cannot be loaded stops the batch at once, with one message (exit 2 for
        # a UserError), instead of failing every run the same way.
        batch.load_model(args)
        started = time.perf_counter()
        try:
            record = batch.run_one(item, args, progress)
        except UserError as err:
            record = batch.record(item, "failed", time.perf_counter() - started, str(err))
        except KeyboardInterrupt:
            record = batch.record(item, "interrupted", time.perf_counter() - started, "interrupted")
        except Exception as err:  # a bug or a resource problem in one run: report it, run the others
            traceback.print_exc()
            record = batch.record(item, "failed", time.perf_counter() - started, f"{err.__class__.__name__}: {err}")
        records.append(record)
        if record["status"] == "finished":
            print(f"{head}: finished in {record['seconds']:.1f} s -> {item.image_path}", flush=True)
        else:
            print(f"{head}: {record['status'].upper()}: {record['message']}", file=sys.stderr, flush=True)
        if record["status"] == "interrupted":
            break
    return records


# ----------------------------------------------------------------------------------------------- evaluation
def eval_is_current(folder: Path, names: list[str], metrics: tuple = ()) -> bool:
    """Return True when folder/eval.json scores exactly the given PNGs, has the extra metrics asked, and is newer
    than all of them."""
    path = folder / "eval.json"
    try:
        evaluation = json.loads(path.read_text())
        scored = {Path(k).name for k in evaluation if k not in ("source_dir", "score", "metrics")}
    except (OSError, ValueError):
        return False
    if any(m not in evaluation.get("metrics", {}) for m in metrics):
        return False
    present = [folder / n for n in names if (folder / n).is_file()]
    newest = max((p.stat().st_mtime for p in present), default=0.0)
    return scored == {p.name for p in present} and path.stat().st_mtime >= newest


def evaluate(ours: argparse.Namespace, base: RunConfig, items: list[Item], changed: set[Path],
             device: str | None) -> tuple[dict, bool]:
    """Return ({folder: error message or None}, whether anything was evaluated), writing each folder's eval.json."""
    import eval as evaluation

    folders: dict[Path, tuple[str, list[str]]] = {}
    for item in items:
        folders.setdefault(item.save_dir, (item.task, []))[1].append(item.image_path.name)
    scorer, scorer_error, results, evaluated = None, None, {}, False
    edit_metrics = edit_metrics_available(ours, base, device) if any(
        eval_task(task) == "edit" for task, _ in folders.values()) else []
    for folder, (task, names) in folders.items():
        metrics = tuple(edit_metrics) if eval_task(task) == "edit" else ()
        if not any((folder / n).is_file() for n in names):
            results[folder] = f"no images to score in {folder}"
            continue
        if folder not in changed and eval_is_current(folder, names, metrics):
            results[folder] = None
            continue
        if scorer_error is not None:  # the scorer is built once: its failure is every folder's, said once
            results[folder] = scorer_error
            continue
        try:
            if scorer is None:
                kind = base.model if world(base.model) is not None else "clip"  # a toy world scores with its own
                try:
                    scorer = evaluation.make_scorer(kind, device=device, clip_pretrained=ours.clip_pretrained)
                except UserError as err:
                    scorer_error = str(err)
                    raise
            # A scorer without image and text embeddings (the toy's) cannot give CLIP directions.
            metrics = tuple(m for m in metrics if m != "clip_direction" or hasattr(scorer, "direction"))
            result = evaluation.evaluate_dir(folder, scorer=scorer, prompts_file=ours.prompts, task=eval_task(task),
                                             allow_missing=True, metrics=("clip",) + metrics, device=device,
                                             lpips_weights=ours.lpips_weights)
            evaluated = True
            results[folder] = None
            print(f"{folder}/eval.json: score {result['score']:.4f} "
                  f"({len([k for k in result if k not in evaluation.EXTRA_KEYS])} images)", flush=True)
        except UserError as err:
            results[folder] = str(err)
            print(f"error: evaluating {folder} failed: {err}", file=sys.stderr, flush=True)
        except Exception as err:
            traceback.print_exc()
            results[folder] = f"{err.__class__.__name__}: {err}"
    return results, evaluated


# ----------------------------------------------------------------------------------------------- comparison
COMPARISON = "comparison.json"
# eval.json's extra metrics for edits (eval.py --metrics), carried into the comparison when present.
EDIT_METRICS = ("clip_direction", "lpips")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def task_comparison(task: str, task_items: list[Item], toy_world: type | None = None) -> dict:
    """Return one row of the comparison for a task's runs: scores (exactly eval.json's), cost, saturation and, in a
    toy world, its exact metrics (the world's comparison_metrics, from each run's final latents)."""
    import statistics

    from utils import load_image

    method, options = parse_task(task)
    row = {"task": task, "title": method.title + "".join(f", {k} {v}" for k, v in options.items()), "edits": method.edits, "images": 0}
    scores, per_step, rows_per_step, max_abs, metrics = [], [], [], [], {k: [] for k in EDIT_METRICS}
    toy_rows, templates_by_prompt, patches = [], {}, []
    evals = {}
    for item in task_items:
        config = item.folder.read_config()
        if not config or config.get("status") != "finished" or not item.image_path.is_file():
            continue
        row["images"] += 1
        folder_eval = evals.setdefault(item.save_dir, _read_json(item.save_dir / "eval.json") or {})
        for key, value in folder_eval.items():
            if key not in ("source_dir", "score", "metrics") and Path(key).name == item.image_path.name:
                scores.append(float(value))
        for metric in EDIT_METRICS:
            value = (folder_eval.get("metrics", {}).get(metric, {}) or {}).get(item.image_path.name)
            if value is not None:
                metrics[metric].append(float(value))
        if config.get("steps_done"):
            per_step.append(config["seconds"] / config["steps_done"])
        if config.get("unet_rows_per_step") is not None:
            rows_per_step.append(config["unet_rows_per_step"])
        if config.get("max_abs") is not None:
            max_abs.append(config["max_abs"])
        latents = item.folder.load_latents() if toy_world is not None else None
        if latents is not None:
            source_path = item.folder.path("source.png")
            source = load_image(source_path) if method.edits and source_path.is_file() else None
            figures = toy_world.comparison_metrics(latents[0], item.edit_prompt if method.edits else item.prompt,
                                                   source)
            toy_rows.append(figures)
            templates_by_prompt.setdefault(item.key, set()).add(figures["template"])
            if "patch" in figures:
                patches.append(figures["patch"])
    mean = (lambda values: statistics.fmean(values) if values else None)
    row.update(score_mean=mean(scores), score_std=statistics.pstdev(scores) if scores else None,
               scores=len(scores), seconds_per_step=statistics.median(per_step) if per_step else None,
               unet_forwards_per_step=statistics.median(rows_per_step) if rows_per_step else None,
               max_abs=max(max_abs) if max_abs else None)
    if method.edits:
        row.update({metric: mean(values) for metric, values in metrics.items() if values})
    if toy_rows:
        row.update(template_mse=mean([r["template_mse"] for r in toy_rows]),
                   residual_std=mean([r["residual_std"] for r in toy_rows]),
                   class_accuracy=mean([float(r["in_class"]) for r in toy_rows]),
                   diversity=mean([len(t) for t in templates_by_prompt.values()]))
        if patches:
            row["patch"] = mean(patches)
    return row


def write_comparison(out: Path, base: RunConfig, items: list[Item], tasks: list[str]) -> Path:
    """Write OUT/comparison.json, a row per task (task_comparison), for every task of the manifest; return its path."""
    manifest = _read_json(out / MANIFEST) or {}
    rows = []
    listed = list(dict.fromkeys([*manifest.get("tasks", {}), *tasks]))
    # The reference sampler first, then generation (LoRA methods last), then edits: the table people read.
    for task in sorted(listed, key=task_order):
        task_items = [it for it in items if it.task == task]
        if not task_items:  # a task of an earlier batch: rebuild its items from the manifest
            task_items = [Item(task, e["key"], e["seed"], e["prompt"], e.get("edit_prompt"), e.get("src_img_path"),
                               out / e["folder"]) for e in manifest["tasks"][task]["items"]]
        rows.append(task_comparison(task, task_items, world(base.model)))
    if _read_json(out / COMPARISON) != json.loads(json.dumps(rows, default=str)):  # a rerun with nothing new: untouched
        save_json_atomic(rows, out / COMPARISON)
    return out / COMPARISON


def edit_metrics_available(ours: argparse.Namespace, base: RunConfig, device) -> list[str]:
    """Return the extra edit metrics of --metrics that can be computed here, with a note for each that cannot."""
    import eval as evaluation

    available = []
    for metric in [m for m in ours.metrics if m != "clip"]:
        if metric == "clip_direction" and world(base.model) is not None:
            print(f"note: clip_direction skipped: the {base.model} world's scorer has no CLIP embeddings", flush=True)
            continue
        if metric == "lpips":
            # Only weights already here: a batch never waits on a download (eval.py --metrics lpips fetches them).
            backbone = evaluation.lpips_backbone_path()
            if ours.lpips_weights != "none" and not backbone.is_file():
                print(f"note: lpips skipped: its AlexNet weights are not at {backbone}; `python eval.py --fdir1 "
                      f"OUT/<edit task> --metrics lpips` downloads them where there is internet", flush=True)
                continue
            try:
                from utils import resolve_device

                evaluation.lpips_metric(str(resolve_device(device)), ours.lpips_weights)
            except UserError as err:
                print(f"note: lpips skipped: {err}", flush=True)
                continue
        available.append(metric)
    return available


# ----------------------------------------------------------------------------------------------- manifest
def update_manifest(out: Path, ours: argparse.Namespace, base: RunConfig, items: list[Item],
                    item_settings: dict, eval_errors: dict | None = None) -> bool:
    """Merge this batch's tasks into OUT/run_all.json (other tasks' entries are kept); return True if it changed."""
    path = out / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        manifest = {}
    old = json.dumps(manifest, sort_keys=True)
    scorer = base.model if world(base.model) is not None else f"clip ViT-B-32 ({ours.clip_pretrained})"
    manifest.update(model=base.model, prompts_file=str(ours.prompts), scorer=scorer)
    tasks = manifest.setdefault("tasks", {})
    for task in ours.tasks:
        task_items = [it for it in items if it.task == task]
        entry = {"seeds": ours.seeds, "settings": item_settings.get(task, {}), "items": [
            {"key": it.key, "seed": it.seed, "prompt": it.prompt, "edit_prompt": it.edit_prompt,
             "src_img_path": it.src_img_path, "name": it.name, "folder": str(it.save_dir.relative_to(out))}
            for it in task_items]}
        if eval_errors is not None:
            entry["eval_errors"] = {str(f.relative_to(out)): msg for f, msg in eval_errors.items()
                                    if msg and f in {it.save_dir for it in task_items}}
        elif task in tasks and "eval_errors" in tasks[task]:
            entry["eval_errors"] = tasks[task]["eval_errors"]
        tasks[task] = entry
    if json.dumps(manifest, sort_keys=True) == old:
        return False
    save_json_atomic(manifest, path)
    return True


# ----------------------------------------------------------------------------------------------- main
def _distributed_state(base: RunConfig):
    """Return accelerate's PartialState (one process when not launched by accelerate/torchrun)."""
    import torch
    from accelerate import PartialState

    on_cpu = (not torch.cuda.is_available() or str(base.device or "").startswith("cpu")
              or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"))
    state = PartialState(cpu=on_cpu, timeout=BARRIER_TIMEOUT)
    if (state.num_processes == 1 and "ACCELERATE_MIXED_PRECISION" in os.environ and "MASTER_ADDR" in os.environ
            and "WORLD_SIZE" not in os.environ):
        print("note: accelerate started a single process. Without GPUs (or with --cpu) it starts several only "
              "with --multi_gpu: accelerate launch --multi_gpu --num_processes N run_all.py ...", file=sys.stderr)
    return state


def main(argv=None) -> int:
    """Run the batch; return 0 (all done), 1 (a run, the evaluation or the report failed) or 130 (interrupted)."""
    ours, base = parse_args(argv)
    out = Path(ours.out)
    items = build_items(ours, load_prompts(ours.prompts))
    if not items:
        raise UserError(f"{ours.prompts} gives nothing to run for tasks {' '.join(ours.tasks)}")
    state = _distributed_state(base)
    rank, n_processes, is_main = state.process_index, state.num_processes, state.is_main_process

    # Which runs are left: every process decides from the same files, before any of them writes one.
    pending, done, settings = [], [], {}
    for item in items:
        try:
            args = item_args(item, base)
        except UserError as err:
            pending.append((item, None, str(err)))
            continue
        settings.setdefault(item.task, {k: getattr(args, k) for k in SETTING_KEYS})
        finished, why = completion(item, args)
        if finished and not ours.overwrite:
            done.append(item)
            continue
        pending.append((item, args, ""))
        if is_main and why not in ("not run yet", "finished"):
            print(f"redo {item.label()}: {why}", flush=True)
    if pending and any(args is not None for _, args, _ in pending):
        check_model(base.model)  # every process, before any waits for another: a model that cannot be had fails here
    if is_main:
        update_manifest(out, ours, base, items, settings)
        if base.gif:
            import main as main_module

            for item in done:
                if not (item.run_dir / "progress.gif").exists():
                    main_module.write_progress_gif(item.folder)
        if pending:
            print(f"{len(pending)} of {len(items)} runs to do ({len(done)} already finished)"
                  + (f", split over {n_processes} processes" if n_processes > 1 else ""), flush=True)
    state.wait_for_everyone()

    device = base.device if base.device is not None or n_processes == 1 else str(state.device)
    batch = Batch(base, rank, n_processes, out, device)
    records = run_share(batch, pending[rank::n_processes], progress=n_processes == 1 and sys.stderr.isatty())
    if any(r["status"] == "interrupted" for r in records):
        print(f"{batch.prefix}Interrupted: finished runs are kept; run the same command again to resume.",
              file=sys.stderr, flush=True)
        return 130

    state.wait_for_everyone()
    if n_processes > 1:
        from accelerate.utils import gather_object

        records = gather_object(records)
    code = finish(ours, base, items, settings, records, len(done), device) if is_main else 0
    state.wait_for_everyone()  # the others exit only once the main process has written everything
    return code


def check_model(model: str) -> None:
    """Raise UserError (one paragraph) now if `model` cannot be had: an unknown name, an incomplete folder, a hub id
    that is neither reachable nor in the cache (guidance/models.py reads only model_index.json; a world is always
    there). Weights that fail to load later still stop the batch at the first failure (run_share)."""
    if world(model) is None:
        from guidance.models import resolve_model

        resolve_model(model)


def finish(ours, base, items: list[Item], settings: dict, records: list[dict], n_done: int, device) -> int:
    """Evaluate, report and summarise (main process only); return the exit code."""
    out = Path(ours.out)
    failed = [r for r in records if r["status"] != "finished"]
    finished_now = {(r["task"], r["key"], r["seed"]) for r in records if r["status"] == "finished"}
    changed = {it.save_dir for it in items if (it.task, it.key, it.seed) in finished_now}
    code = 1 if failed else 0
    eval_errors, evaluated = {}, False
    if not ours.no_eval:
        eval_errors, evaluated = evaluate(ours, base, items, changed, device)
        update_manifest(out, ours, base, items, settings, eval_errors)
        if any(eval_errors.values()):
            code = 1
    write_comparison(out, base, items, ours.tasks)
    report_path = out / "report.pdf"
    reported = False
    if not ours.no_report and (records or evaluated or not report_path.exists()):
        import report

        try:
            report.write_report(out, report_path)
            reported = True
        except Exception:
            traceback.print_exc()
            print(f"error: writing {report_path} failed (the runs and eval.json files are kept)", file=sys.stderr)
            code = 1

    if not records and not evaluated and not reported:
        print(f"Nothing to do: all {len(items)} runs are finished (--overwrite redoes them); "
              f"eval.json and {report_path.name} are up to date.")
        return code
    print(f"{len(items)} runs: {len(finished_now)} done now, {n_done} already finished, {len(failed)} failed.")
    for r in failed:
        print(f"  FAILED {r['task']} seed {r['seed']} {r['name']}: {r['message']}", file=sys.stderr)
    by_error: dict[str, list[str]] = {}  # a scorer that cannot be built fails every folder: one message
    for folder, err in eval_errors.items():
        if err:
            by_error.setdefault(err, []).append(str(folder))
    for err, folders in by_error.items():
        print(f"  EVAL FAILED {', '.join(folders)}: {err}", file=sys.stderr)
    if reported:
        print(f"Report: {report_path}")
    return code


if __name__ == "__main__":
    run_cli(main, interrupted="Interrupted: finished runs are kept; run the same command again to resume.")
