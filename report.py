"""Write OUT/report.pdf from run_all.py's (or hand-made course-style) outputs, with matplotlib.

    python report.py outputs/                 # -> outputs/report.pdf
    python report.py outputs/ --pdf results.pdf

Pages: a title page (run settings; per task the mean score against the course's CLIP thresholds 0.26 and
0.28, with its spread over seeds or images); per task a grid of every image captioned with its prompt and
score (PDS: source and result side by side with both prompts); per task, for every run, a strip of its
progress images and its loss curve; for runs made with --log_guidance, their guidance panels (x, x_t, x0_hat,
|grad|; guidance/diagnostics.py). Scores come from each folder's eval.json. Anything missing (an image,
an eval.json, a loss.csv) is drawn as a grey box or a line saying what is missing; it never stops the report.
"""
from __future__ import annotations

from utils import interrupt_quietly  # first: Ctrl-C while torch and the rest import exits 130 quietly

interrupt_quietly(__name__)

import csv
import math
import statistics
import textwrap
import time
from pathlib import Path

from guidance.methods import METHODS, task_order
from guidance.models import world
from report_runs import MANIFEST, Report, Run, TaskResult, collect, is_edit_task, read_list, task_title
from utils import CliParser, UserError, file_write_problem, run_cli

# Every method of the table, in the comparison's order: the reference sampler, generation (LoRA last), edits.
TASKS = tuple(sorted(METHODS, key=task_order))
COMPARISON = "comparison.json"
MAX_CHART_TASKS = 6  # the title page's bar chart beside its table; with more tasks the comparison page says it all
THRESHOLDS = (0.26, 0.28)  # the course's grades: >= 0.28 full points, >= 0.26 half, below 0.26 none
PAGE = (11.69, 8.27)  # A4 landscape, inches
MARGIN = 0.45
FONT = 8.5  # body text size in points; nothing on a page is smaller than SMALL
SMALL = 7.0
LINE = FONT * 1.2 / 72  # inches per line of body text
GRID_PX, STRIP_PX = 384, 160  # longest side of the images embedded in the PDF
STRIP_LENGTH = 6  # progress images per run


# ----------------------------------------------------------------------------------------------- drawing helpers
def _grade(score: float | None) -> str:
    if score is None:
        return "no score"
    if score >= THRESHOLDS[1]:
        return f"full (≥ {THRESHOLDS[1]})"
    if score >= THRESHOLDS[0]:
        return f"half (≥ {THRESHOLDS[0]})"
    return f"below {THRESHOLDS[0]}"


def _wrap(text: str, width_in: float, size: float = FONT, max_lines: int | None = None) -> str:
    """Return text wrapped to fit width_in inches at a font size (DejaVu Sans averages ~0.58 em per character)."""
    chars = max(8, int(width_in * 72 / (size * 0.58)))
    lines = textwrap.wrap(text, chars) or [""]
    if max_lines and len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:max(1, chars - 1)].rstrip() + "…"
    return "\n".join(lines)


class Page:
    """A figure laid out in inches from the top-left corner (matplotlib counts fractions from the bottom-left)."""

    def __init__(self, title: str, subtitle: str = ""):
        import matplotlib.pyplot as plt

        self.fig = plt.figure(figsize=PAGE)
        self.text(MARGIN, 0.35, title, size=15, weight="bold", gid="title")
        if subtitle:
            self.text(MARGIN, 0.68, subtitle, size=FONT, color="#444444", gid="subtitle")

    def axes(self, left: float, top: float, width: float, height: float):
        w, h = PAGE
        return self.fig.add_axes((left / w, 1 - (top + height) / h, width / w, height / h))

    def text(self, x: float, y: float, s: str, size: float = FONT, gid: str = "caption", **kwargs):
        """Draw text with its top-left corner (default alignment) at (x, y) inches from the page's top-left."""
        kwargs.setdefault("va", "top")
        kwargs.setdefault("ha", "left")
        return self.fig.text(x / PAGE[0], 1 - y / PAGE[1], s, size=size, gid=gid, **kwargs)


def _load_image(path: Path, max_px: int):
    """Return the image at path as an RGB array no larger than max_px, or None if it is missing or unreadable."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((max_px, max_px))
            return np.asarray(img)
    except (FileNotFoundError, UnidentifiedImageError, OSError, ValueError):
        return None


def _show_image(page: Page, path: Path, left, top, size, max_px: int, missing_note: str) -> None:
    """Draw the image at path in a size x size inch box, or a grey box saying what is missing."""
    ax = page.axes(left, top, size, size)
    ax.set_xticks([])
    ax.set_yticks([])
    array = _load_image(path, max_px)
    if array is not None:
        ax.imshow(array, interpolation="lanczos" if max(array.shape[:2]) > 64 else "nearest")
        for spine in ax.spines.values():
            spine.set_visible(False)
        return
    ax.set_facecolor("#e6e6e6")
    what = "missing" if not path.exists() else "unreadable"
    note = _wrap(f"{what}: {path.name}. {missing_note}".strip(), size - 0.2, SMALL, max_lines=8)
    ax.text(0.5, 0.5, note, ha="center", va="center", size=SMALL, color="#aa0000", transform=ax.transAxes,
            gid="placeholder")


def _why_missing(run: Run) -> str:
    if run.config is None:
        return "Not run (or its run folder is gone)."
    status = run.config.get("status")
    if status == "running":
        return "Its run is still going, or was stopped before finishing."
    if status in ("diverged", "interrupted"):
        return f"Its run {status}; see {run.name}/."
    if status == "finished":
        return "Its run finished but the PNG is gone: run run_all.py again to redo it."
    return ""


def _score_text(run: Run) -> str:
    return f"score {run.score:.4f}" if run.score is not None else "score n/a"


# ----------------------------------------------------------------------------------------------- pages
def _scorer(manifest: dict, configs: list[dict]) -> str:
    """Return what scored the images: run_all.json says; otherwise the runs' model tells (a toy world scores with its
    own scorer, eval.py --scorer <world>; Stable Diffusion's images with CLIP)."""
    if manifest.get("scorer"):
        return str(manifest["scorer"])
    models = {str(c["model"]) for c in configs if c.get("model")}
    worlds = {m for m in models if world(m) is not None}
    if len(models) == 1 and worlds:
        return next(iter(worlds))
    if models and not worlds:
        return "CLIP ViT-B-32 (eval.py)"
    return "unknown (no run_all.json" + (", runs of several models)" if models else " and no run records)")


def title_page(report: Report):
    manifest = report.manifest
    page = Page("Score distillation report: " + " · ".join(t.task.upper() for t in report.tasks[:6])
                + (" · …" if len(report.tasks) > 6 else ""),
                f"{report.out_dir.resolve()}   ·   written {time.strftime('%Y-%m-%d %H:%M')}")
    configs = [r.config for t in report.tasks for r in t.runs if r.config]
    model = manifest.get("model") or next((c.get("model") for c in configs), "?")
    scorer = _scorer(manifest, configs)
    device = next((c.get("device") for c in configs), "?")
    lines = [f"Model: {model}", f"Scorer: {scorer}", f"Prompts: {manifest.get('prompts_file', 'n/a')}",
             f"Device: {device}"]
    y = 1.05
    for line in lines:
        page.text(MARGIN, y, _wrap(line, PAGE[0] - 2 * MARGIN, FONT, 2))
        y += 0.22 * (1 + line.count("\n")) + (0.2 if len(line) > 150 else 0)

    # The summary table, one row per task.
    columns = [("Task", 0.95 if any(len(t.task) > 4 for t in report.tasks) else 0.6), ("Images", 0.9), ("Seeds", 0.9), ("Guidance", 0.8), ("Steps", 0.6), ("LR", 0.6),
               ("Mean score", 1.0), ("Spread", 2.5), ("Course grade", 1.3)]
    y += 0.2
    x = MARGIN
    for name, width in columns:
        page.text(x, y, name, weight="bold")
        x += width
    page.fig.add_artist(_hline(page, MARGIN, x, y + 0.22))
    y += 0.32
    for result in report.tasks:
        done = sum(r.image.is_file() for r in result.runs)
        cells = [result.task.upper(), f"{done} / {len(result.runs)}",
                 ", ".join(str(s) for s in result.seeds if s is not None) or "?",
                 _fmt(result.settings.get("guidance_scale")), _fmt(result.settings.get("step")),
                 _fmt(result.settings.get("lr")),
                 f"{result.mean:.4f}" if result.mean is not None else "n/a", result.spread(), _grade(result.mean)]
        x = MARGIN
        for (name, width), cell in zip(columns, cells):
            color = _grade_color(result.mean) if name in ("Mean score", "Course grade") else "black"
            page.text(x, y, _wrap(cell, width - 0.1, FONT, 2), color=color)
            x += width
        y += 0.42 if len(report.tasks) <= MAX_CHART_TASKS else 0.3
    if not report.tasks:
        page.text(MARGIN, y, "No task folders (sds/, pds/, vsd/) and no run_all.json here: nothing to report.",
                  color="#aa0000")
        y += 0.4

    # Other settings that are shared, then the notes.
    shared = {}
    for result in report.tasks:
        for key in ("negative_prompt", "precision", "weighting", "num_particles", "lora_lr", "vsd_lora_timestep"):
            if key in result.settings and (key not in ("lora_lr", "vsd_lora_timestep") or result.task == "vsd"):
                value = result.settings[key]
                value = "the model's default" if value is None and key == "lora_lr" else value
                if shared.setdefault(key, value) != value:  # methods differ (e.g. each its paper's weighting)
                    shared[key] = "per method"
    if shared:
        text = "Other settings: " + "; ".join(f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}"
                                               for k, v in shared.items())
        page.text(MARGIN, y + 0.05, _wrap(text, 6.5, FONT, 3))
        y += 0.25 + 0.17 * _wrap(text, 6.5, FONT, 3).count("\n")
    notes = [f"{r.task.upper()}: {n}" for r in report.tasks for n in r.notes]
    if world(str(scorer)) is not None:
        notes.append(f"The {scorer} world's scorer is not CLIP: the course's thresholds are drawn for reference only.")
    y += 0.2
    page.text(MARGIN, y, "Notes" if notes else "Notes: none (every image present and scored)", weight="bold")
    y += 0.25
    for note in notes[:12]:
        wrapped = _wrap("• " + note, 6.6, FONT, 3)
        page.text(MARGIN, y, wrapped, color="#aa0000")
        y += 0.2 + 0.16 * wrapped.count("\n")
    if len(notes) > 12:
        page.text(MARGIN, y, f"… and {len(notes) - 12} more notes", color="#aa0000")

    # The mean score per task against the thresholds (with many tasks the comparison page that follows says it).
    if len(report.tasks) <= MAX_CHART_TASKS:
        ax = page.axes(7.75, 4.25, 3.45, 3.3)
        _score_chart(ax, report.tasks)
    return page.fig


# (column title, width in inches, comparison.json key, format); a column shows only when some row has its key.
COMPARISON_COLUMNS = (
    ("Task", 1.2, "task", "{}"), ("Images", 0.6, "images", "{}"),
    ("Score mean ± std", 1.35, "score_mean", None), ("s / step", 0.7, "seconds_per_step", "{:.4f}"),
    ("UNet rows / step", 1.0, "unet_forwards_per_step", "{:g}"), ("max |x|", 0.65, "max_abs", "{:.2f}"),
    ("Template MSE", 0.95, "template_mse", "{:.4f}"), ("Residual std", 0.9, "residual_std", "{:.4f}"),
    ("Class acc.", 0.75, "class_accuracy", "{:.2f}"), ("Diversity", 0.7, "diversity", "{:.2f}"),
    ("Patch", 0.55, "patch", "{:.2f}"), ("CLIP dir.", 0.7, "clip_direction", "{:.3f}"), ("LPIPS", 0.6, "lpips", "{:.3f}"),
)
COMPARISON_NOTES = (
    "Score: the task's eval.json values (CLIP cosine similarity, or the toy scorer's probability), mean ± std over "
    "every image and seed. s / step: median seconds per optimisation step (DDIM: per sampling step). UNet rows / "
    "step: batch rows of UNet forwards per step, counted. max |x|: largest |value| of any final latent "
    "(the toy: of the image, in [-1, 1] units; above 1 is saturation).",
    "Toy world only, exact: template MSE and residual std (RMS of image minus its nearest template; the data's std "
    "is 0.05, a mode gives ~0), class acc. (nearest template in the prompt's class), diversity (distinct nearest "
    "templates across the seeds of a prompt, averaged), patch (the source's white patch in the edit: 1 kept, -1 "
    "erased). CLIP dir.: InstructPix2Pix's directional similarity; LPIPS: to the source (edits).",
)


def comparison_page(report: Report, rows: list[dict]):
    """Return the page with comparison.json's table: a row per task, units stated below it."""
    page = Page("Comparison of methods", f"{report.out_dir.resolve() / COMPARISON}   ·   same prompts and seeds "
                                         f"for every task")
    columns = [c for c in COMPARISON_COLUMNS if any(r.get(c[2]) is not None for r in rows)]
    scale = min(1.0, (PAGE[0] - 2 * MARGIN) / sum(c[1] for c in columns))
    y, x = 1.05, MARGIN
    for title, width, _, _ in columns:
        page.text(x, y, _wrap(title, width * scale - 0.05, FONT, 2), weight="bold")
        x += width * scale
    page.fig.add_artist(_hline(page, MARGIN, x, y + 0.38))
    y += 0.48
    row_h = min(0.3, (PAGE[1] - y - 1.6) / max(1, len(rows)))
    for row in rows:
        x = MARGIN
        for title, width, key, fmt in columns:
            value = row.get(key)
            if key == "score_mean":
                cell = "n/a" if value is None else f"{value:.4f} ± {row.get('score_std') or 0:.4f}"
            elif key == "task":
                cell = str(value).upper() + (" (edit)" if row.get("edits") else "")
            else:
                cell = "–" if value is None else fmt.format(value)
            page.text(x, y, cell, size=FONT if row_h >= 0.22 else SMALL)
            x += width * scale
        y += row_h
    y += 0.2
    for note in COMPARISON_NOTES:
        wrapped = _wrap(note, PAGE[0] - 2 * MARGIN, SMALL, 4)
        page.text(MARGIN, y, wrapped, size=SMALL, color="#444444")
        y += 0.16 * (1 + wrapped.count("\n")) + 0.08
    return page.fig


def comparison_grid_pages(report: Report, rows_per_page: int = 6):
    """Yield pages of images: a row per prompt, a column per task, the same (first) seed for every task."""
    tasks = [t for t in report.tasks if t.runs]
    if not tasks:
        return
    seed = next((s for s in tasks[0].seeds if s is not None), None)
    keys = list(dict.fromkeys(r.prompt for t in tasks for r in t.runs))
    label_w = 1.5
    rows_per_page = max(1, min(rows_per_page, len(keys)))
    # As large as the page allows: by width (a column per task) and by height (rows_per_page rows).
    cell = min(1.3, (PAGE[0] - 2 * MARGIN - label_w) / len(tasks), (PAGE[1] - 1.25 - MARGIN) / rows_per_page - 0.06)
    size = cell - 0.06
    pages = math.ceil(len(keys) / rows_per_page)
    for p in range(pages):
        page = Page("Comparison: the same prompt and seed under every task",
                    f"seed {seed if seed is not None else 'n/a'}   ·   a row per prompt, a column per task   ·   "
                    f"page {p + 1} of {pages}")
        for j, task in enumerate(tasks):
            page.text(MARGIN + label_w + j * cell + size / 2, 1.0, task.task.upper(), size=SMALL, ha="center",
                      weight="bold")
        for i, prompt in enumerate(keys[p * rows_per_page:(p + 1) * rows_per_page]):
            top = 1.25 + i * (size + 0.12)
            page.text(MARGIN, top + 0.05, _wrap(prompt, label_w - 0.12, SMALL, 5), size=SMALL)
            for j, task in enumerate(tasks):
                run = next((r for r in task.runs if r.prompt == prompt and r.seed in (seed, None)), None)
                left = MARGIN + label_w + j * cell
                if run is None:
                    _show_image(page, Path(f"{task.task}-not-run.png"), left, top, size, STRIP_PX, "not in this task")
                else:
                    _show_image(page, run.image, left, top, size, STRIP_PX, _why_missing(run))
        yield page.fig


def _fmt(value) -> str:
    return "?" if value is None else f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _grade_color(score) -> str:
    if score is None:
        return "#777777"
    return "#1a7f37" if score >= THRESHOLDS[1] else "#b26b00" if score >= THRESHOLDS[0] else "#aa0000"


def _hline(page: Page, x0: float, x1: float, y: float):
    from matplotlib.lines import Line2D

    w, h = PAGE
    return Line2D([x0 / w, x1 / w], [1 - y / h, 1 - y / h], transform=page.fig.transFigure, color="#888888", lw=0.8)


def _score_chart(ax, tasks: list[TaskResult]) -> None:
    """Draw each task's mean score (error bar: std over seeds) against the course's thresholds."""
    names = [t.task.upper() for t in tasks]
    means = [t.mean if t.mean is not None else 0.0 for t in tasks]
    errors = [statistics.stdev(t.scores) if len(t.scores) > 1 else 0.0 for t in tasks]
    ax.bar(names, means, yerr=errors, capsize=4, color=[_grade_color(t.mean) for t in tasks], alpha=0.85)
    top = max([*means, THRESHOLDS[1]]) * 1.35 or 1.0
    for threshold, style, label in zip(THRESHOLDS, (":", "--"), ("half points", "full points")):
        ax.axhline(threshold, color="black", lw=0.9, ls=style, label=f"{threshold}: {label}")
    ax.legend(loc="upper right", fontsize=SMALL, frameon=False)
    for i, t in enumerate(tasks):
        label = f"{t.mean:.3f}" if t.mean is not None else "n/a"
        ax.text(i, means[i] + errors[i] + top * 0.02, label, ha="center", va="bottom", size=SMALL)
    ax.set_ylim(0, top)
    ax.set_ylabel("mean score", size=FONT)
    ax.set_title("Mean score vs course thresholds", size=FONT)
    ax.tick_params(labelsize=SMALL)
    ax.spines[["top", "right"]].set_visible(False)


def grid_pages(result: TaskResult, several_seeds: bool):
    """Yield pages with every image of a generation task, captioned with its prompt and score."""
    cols, rows = 5, 2
    cell_w = (PAGE[0] - 2 * MARGIN) / cols
    size = cell_w - 0.3
    per_page = cols * rows
    runs = sorted(result.runs, key=lambda r: (r.prompt.lower(), r.seed if r.seed is not None else -1))
    pages = max(1, math.ceil(len(runs) / per_page))
    for p in range(pages):
        page = Page(task_title(result.task), _task_subtitle(result, p, pages))
        if not runs:
            page.text(MARGIN, 1.2, "No runs for this task.", color="#aa0000")
        for i, run in enumerate(runs[p * per_page:(p + 1) * per_page]):
            left = MARGIN + (i % cols) * cell_w + 0.15
            top = 1.05 + (i // cols) * (size + 1.05)
            _show_image(page, run.image, left, top, size, GRID_PX, _why_missing(run))
            seed = f"  ·  seed {run.seed}" if several_seeds else ""
            caption = _wrap(run.caption_prompt, size, FONT, 3)
            page.text(left, top + size + 0.06, caption, gid="caption")
            page.text(left, top + size + 0.12 + LINE * (1 + caption.count("\n")), _score_text(run) + seed,
                      weight="bold", color=_grade_color(run.score), gid="caption")
        yield page.fig


def pair_pages(result: TaskResult, several_seeds: bool):
    """Yield pages with every PDS edit: source and result side by side, with both prompts and the score."""
    pairs_per_row, rows = 2, 3
    pair_w = (PAGE[0] - 2 * MARGIN) / pairs_per_row
    size = 1.62
    row_h = size + 0.72
    per_page = pairs_per_row * rows
    runs = sorted(result.runs, key=lambda r: (r.prompt.lower(), r.seed if r.seed is not None else -1))
    pages = max(1, math.ceil(len(runs) / per_page))
    for p in range(pages):
        page = Page(task_title(result.task), _task_subtitle(result, p, pages))
        if not runs:
            page.text(MARGIN, 1.2, "No runs for this task.", color="#aa0000")
        for i, run in enumerate(runs[p * per_page:(p + 1) * per_page]):
            left = MARGIN + (i % pairs_per_row) * pair_w + 0.1
            top = 1.05 + (i // pairs_per_row) * row_h
            text_w = pair_w - 2 * size - 0.45
            _show_image(page, run.run_dir / "source.png", left, top, size, GRID_PX,
                        "The source is copied into the run folder when the run starts.")
            _show_image(page, run.image, left + size + 0.1, top, size, GRID_PX, _why_missing(run))
            page.text(left, top + size + 0.04, "source", size=SMALL, color="#555555")
            page.text(left + size + 0.1, top + size + 0.04, "result", size=SMALL, color="#555555")
            x = left + 2 * size + 0.25
            seed = f" (seed {run.seed})" if several_seeds else ""
            page.text(x, top, "source" + seed, size=SMALL, color="#555555")
            page.text(x, top + 0.17, _wrap(run.prompt, text_w, FONT, 3))
            page.text(x, top + 0.72, "edit", size=SMALL, color="#555555")
            page.text(x, top + 0.89, _wrap(run.edit_prompt or "?", text_w, FONT, 3))
            page.text(x, top + 1.45, _score_text(run), weight="bold", color=_grade_color(run.score))
        yield page.fig


def progress_pages(result: TaskResult, several_seeds: bool):
    """Yield pages with, for every run, a strip of its progress images and its loss curve."""
    rows = 5
    row_h = (PAGE[1] - 1.0 - MARGIN) / rows
    thumb = row_h - 0.42
    label_w = 1.85
    runs = sorted(result.runs, key=lambda r: (r.caption_prompt.lower(), r.seed if r.seed is not None else -1))
    pages = max(1, math.ceil(len(runs) / rows))
    for p in range(pages):
        page = Page(f"{result.task.upper()}: progress and loss per run", _task_subtitle(result, p, pages))
        for i, run in enumerate(runs[p * rows:(p + 1) * rows]):
            top = 1.0 + i * row_h
            seed = f"seed {run.seed} · " if several_seeds else ""
            steps = run.config.get("steps_done") if run.config else None
            seconds = run.config.get("seconds") if run.config else None
            status = "not finished (running or stopped)" if run.status == "running" else run.status
            details = f"{seed}{status}" + (f" · {steps} steps" if steps is not None else "") + \
                (f" · {seconds:.0f} s" if isinstance(seconds, (int, float)) else "")
            page.text(MARGIN, top + 0.05, _wrap(run.caption_prompt, label_w - 0.1, FONT, 3), weight="bold")
            page.text(MARGIN, top + 0.62, _wrap(details, label_w - 0.1, SMALL, 2), size=SMALL, color="#555555")
            page.text(MARGIN, top + 0.95, _score_text(run), size=SMALL, color=_grade_color(run.score))
            frames = _pick_frames(run.files.progress_images(), STRIP_LENGTH)
            x = MARGIN + label_w
            if not frames:
                page.text(x, top + 0.4, _wrap(f"no progress images in {run.name}/progress/ "
                                              "(not run yet, or run with --log_step 0)", 4.5, FONT, 3),
                          color="#aa0000")
            for frame in frames:
                _show_image(page, frame, x, top + 0.05, thumb, STRIP_PX, "")
                page.text(x + thumb / 2, top + thumb + 0.1, f"step {int(frame.stem[5:])}", size=SMALL, ha="center")
                x += thumb + 0.06
            loss_left = MARGIN + label_w + STRIP_LENGTH * (thumb + 0.06) + 0.55
            ax = page.axes(loss_left, top + 0.08, PAGE[0] - MARGIN - loss_left, thumb - 0.05)
            _loss_plot(ax, run.run_dir / "loss.csv")
        yield page.fig


def guidance_pages(result: TaskResult, several_seeds: bool):
    """Yield pages with, for every run that has guidance panels (--log_guidance), its middle and last panel."""
    runs = [r for r in sorted(result.runs, key=lambda r: (r.caption_prompt.lower(), r.seed if r.seed is not None
                                                          else -1))
            if any((r.run_dir / "guidance").glob("step_*.png"))]
    rows = 5
    row_h = (PAGE[1] - 1.0 - MARGIN) / rows
    label_w = 1.85
    panel_w = (PAGE[0] - 2 * MARGIN - label_w - 0.1) / 2
    for p in range(math.ceil(len(runs) / rows)):
        page = Page(f"{result.task.upper()}: what the guidance sees (x · x_t · x0_hat · |grad|)",
                    _task_subtitle(result, p, math.ceil(len(runs) / rows)))
        for i, run in enumerate(runs[p * rows:(p + 1) * rows]):
            top = 1.0 + i * row_h
            seed = f"seed {run.seed} · " if several_seeds else ""
            page.text(MARGIN, top + 0.05, _wrap(run.caption_prompt, label_w - 0.1, FONT, 3), weight="bold")
            page.text(MARGIN, top + 0.62, _wrap(f"{seed}{run.status}", label_w - 0.1, SMALL, 2), size=SMALL,
                      color="#555555")
            panels = sorted((run.run_dir / "guidance").glob("step_*.png"))
            for j, panel in enumerate(dict.fromkeys([panels[len(panels) // 2], panels[-1]])):
                left = MARGIN + label_w + j * (panel_w + 0.1)
                ax = page.axes(left, top + 0.05, panel_w, row_h - 0.42)
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                array = _load_image(panel, 1024)
                if array is not None:
                    ax.imshow(array, interpolation="nearest")
                page.text(left + panel_w / 2, top + row_h - 0.33, f"step {int(panel.stem[5:])}", size=SMALL,
                          ha="center")
        yield page.fig


def _pick_frames(frames: list[Path], n: int) -> list[Path]:
    """Return up to n frames spread evenly over the run, always including the first and the last."""
    if len(frames) <= n:
        return frames
    return [frames[round(i * (len(frames) - 1) / (n - 1))] for i in range(n)]


def _loss_plot(ax, path: Path) -> None:
    """Plot loss.csv (raw, and a moving average), or say that it is missing."""
    ax.tick_params(labelsize=SMALL - 0.5, length=2, pad=1)
    ax.spines[["top", "right"]].set_visible(False)
    losses = []
    try:
        with open(path, newline="") as handle:
            losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    except (OSError, KeyError, ValueError, TypeError):
        pass
    losses = [v for v in losses if math.isfinite(v)]
    if not losses:
        ax.axis("off")
        ax.text(0.5, 0.5, f"no loss curve ({path.name} {'missing' if not path.exists() else 'empty'})",
                ha="center", va="center", size=SMALL, color="#aa0000", transform=ax.transAxes, gid="placeholder")
        return
    window = max(1, len(losses) // 20)
    smooth = [statistics.fmean(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]
    ax.plot(losses, color="#9ab6d6", lw=0.6)
    ax.plot(smooth, color="#1f4e8c", lw=1.1)
    if min(losses) > 0 and max(losses) / min(losses) > 100:
        ax.set_yscale("log")  # early spikes would flatten the rest of the curve
    ax.set_xlabel("step", size=SMALL, labelpad=1)
    ax.set_ylabel("loss", size=SMALL, labelpad=1)
    ax.margins(x=0)


def _task_subtitle(result: TaskResult, page: int, pages: int) -> str:
    mean = f"mean score {result.mean:.4f} {result.spread()} · {_grade(result.mean)}" if result.mean is not None \
        else "mean score n/a (no eval.json)"
    settings = ", ".join(f"{k} {_fmt(result.settings[k])}" for k in ("guidance_scale", "step", "lr")
                         if k in result.settings)
    return f"{mean}   ·   {settings}   ·   page {page + 1} of {pages}"


def render(report: Report) -> list:
    """Return the report's pages as matplotlib figures."""
    figures = [title_page(report)]
    comparison = read_list(report.out_dir / COMPARISON)
    if comparison:
        figures.append(comparison_page(report, comparison))
        figures += list(comparison_grid_pages(report))
    for result in report.tasks:
        several = len([s for s in result.seeds if s is not None]) > 1
        pages = pair_pages if is_edit_task(result.task) else grid_pages
        figures += list(pages(result, several))
        figures += list(progress_pages(result, several))
        figures += list(guidance_pages(result, several))
    return figures


def write_report(out_dir: str | Path, pdf_path: str | Path | None = None) -> Path:
    """Return the path of the PDF written for out_dir (default OUT/report.pdf), atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    from utils import atomic_write_bytes

    out = Path(out_dir)
    if not out.is_dir():
        raise UserError(f"{out} is not a folder: give the output folder of run_all.py (e.g. outputs/)")
    given = pdf_path is not None
    pdf_path = Path(pdf_path) if pdf_path else out / "report.pdf"
    report = collect(out)  # (reads small files only)
    if not any(task.runs for task in report.tasks):
        raise UserError(f"nothing to report in {out}: no {MANIFEST} and no runs in task folders ({', '.join(TASKS[:4])}"
                        f", ...): give the output folder of run_all.py (e.g. outputs/)")
    check_pdf_writable(pdf_path, given)  # before the pages are drawn
    buffer = io.BytesIO()
    with matplotlib.rc_context({"pdf.fonttype": 42, "font.size": FONT}):
        figures = render(report)
        with PdfPages(buffer, metadata={"Title": "Score distillation report", "Creator": "report.py"}) as pdf:
            for fig in figures:
                pdf.savefig(fig)
                plt.close(fig)
    try:
        atomic_write_bytes(pdf_path, buffer.getvalue())
    except OSError as err:  # the folder changed since the check (or the disk filled up)
        raise _unwritable(pdf_path, err.strerror or str(err), given) from None
    return pdf_path


def check_pdf_writable(pdf_path: Path, given: bool) -> None:
    """Raise UserError (one line) if the PDF cannot be written at pdf_path (given: named by --pdf)."""
    problem = file_write_problem(pdf_path)
    if problem:
        raise _unwritable(pdf_path, problem, given)


def _unwritable(pdf_path: Path, problem: str, given: bool) -> UserError:
    if problem == "it is a folder":
        return UserError(f"--pdf {pdf_path} is a folder: give a file name, e.g. --pdf {pdf_path / 'report.pdf'}"
                         if given else f"cannot write {pdf_path}: it is a folder; remove or rename it, or give "
                                       f"--pdf FILE")
    return UserError(f"cannot write {pdf_path} ({problem}): " + ("choose another --pdf" if given else
                                                                 "make the folder writable, or give --pdf FILE"))


def main(argv=None) -> int:
    parser = CliParser(description="Write OUT/report.pdf from run_all.py's outputs.")
    parser.add_argument("out_dir", help="output folder of run_all.py (holding sds/, pds/, vsd/)")
    parser.add_argument("--pdf", default=None, help="where to write the PDF (default OUT/report.pdf)")
    args = parser.parse_args(argv)
    path = write_report(args.out_dir, args.pdf)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
