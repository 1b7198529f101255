"""One run's folder: every path and file a run writes, read by main.py's loop, run_all.py, report.py, eval.py and the
app alike, and the file names made from prompts.

Layout (the course's): <save_dir>/<name>.png is the result (what eval.py scores), and <save_dir>/<name>/ holds the
rest: run_config.json (every setting, the seed, and a status that says 'finished' only after the PNG), loss.csv,
latents.pt and init_latents.pt (the final and the initial latents), progress/step_NNNNN.png, particles/,
source.png (edits), guidance/ (--log_guidance panels), interrupted.png or last_finite.png (a run that did not
finish), progress.gif (--gif). Generators add artefacts beside the PNG (<name>.svg, <name>.gaussians.pt, meshes).

A run never silently replaces another: starting one where a finished run made with other result settings left its
files is an error that names both and the fix (--overwrite, or another --save_dir); otherwise the earlier run's
files are removed first, so that nothing of it is left beside the new result.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import unicodedata
from pathlib import Path

import shutil

import torch

from guidance.common import UserError, atomic_write_bytes, save_json_atomic, save_torch_atomic

# File names made from prompts: at most this many UTF-8 bytes, so that "<name>.png", its temporary twin
# (".<name>.png.XXXXXXXX.tmp") and the run folder fit the usual 255-byte limit of a file name.
MAX_NAME_BYTES = 120
HASH_CHARS = 8
# What no file name may hold on Linux, macOS or Windows: separators, Windows' reserved characters, and '..'.
_UNSAFE_RUNS = re.compile(r'(?:[/\\<>:"|?*]|\.{2,})+')
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"{d}{i}" for d in ("COM", "LPT") for i in range(1, 10))}


def _is_safe_name(name: str) -> bool:
    """Return True when name is one plain file name on every common OS (see prompt_to_filename)."""
    return (bool(name) and not name.startswith(".") and not name.endswith((".", " "))
            and not _UNSAFE_RUNS.search(name)
            and not any(unicodedata.category(ch)[0] == "C" for ch in name)  # control, format, surrogate, unassigned
            and name.split(".")[0].rstrip(" ").upper() not in _WINDOWS_RESERVED
            and len(name.encode("utf-8")) <= MAX_NAME_BYTES)


def prompt_to_filename(prompt: str) -> str:
    """Return the file stem for a prompt: the course's (spaces -> underscores, "a cat" -> "a_cat") when that is safe.

    A prompt comes from a user or a browser, so the stem must be one plain file name inside the save folder
    on Linux, macOS and Windows. When the course's stem is not (a path separator, '..', a leading dot, a
    control character, a Windows-reserved name or character, a trailing dot, or more than MAX_NAME_BYTES
    bytes), the offending characters become '_', the name is shortened, and '-' plus a short hash of the
    whole prompt is appended, so that different prompts keep different names ("x/../../y" -> "x_y-<hash>").
    eval.py and report.py read such a run's prompt back from its run_config.json.
    """
    name = prompt.strip().replace(" ", "_")
    if _is_safe_name(name):
        return name
    digest = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]
    name = "".join("_" if unicodedata.category(ch)[0] == "C" else ch for ch in name)
    name = _UNSAFE_RUNS.sub("_", name).lstrip(".")
    if name.split(".")[0].rstrip(" ").upper() in _WINDOWS_RESERVED:
        name = "_" + name
    budget = MAX_NAME_BYTES - 1 - HASH_CHARS
    name = name.encode("utf-8")[:budget].decode("utf-8", "ignore").rstrip(". _")
    return f"{name}-{digest}" if name else digest


def filename_to_prompt(stem: str) -> str:
    """Return the prompt a course file stem stands for: underscores become spaces (see prompt_for_stem)."""
    return stem.replace("_", " ")


def prompt_for_stem(folder: str | os.PathLike, stem: str, prompts: dict | None = None) -> str:
    """Return the prompt whose image is <folder>/<stem>.png: from the run's run_config.json, else the prompts file.

    main.py records the run's "prompt" and "edit_prompt" in <folder>/<stem>/run_config.json; the one whose
    file name is stem is it (the edit prompt for editing runs). prompts is a course-schema prompts dict
    ({key: {prompt, edit_prompt}}). Without either, the stem read as a course name (underscores -> spaces):
    right for every prompt whose name is not shortened or hashed by prompt_to_filename.
    """
    try:
        config = json.loads((Path(folder) / stem / "run_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    candidates = []
    if isinstance(config, dict):
        candidates += [config.get("edit_prompt"), config.get("prompt")]
    for entry in (prompts or {}).values():
        if isinstance(entry, dict):
            candidates += [entry.get("edit_prompt"), entry.get("prompt")]
    for prompt in candidates:
        if isinstance(prompt, str) and prompt.strip() and prompt_to_filename(prompt) == stem:
            return prompt
    return filename_to_prompt(stem)


class RunFolder:
    """Every path and file of one run: <save_dir>/<name>.png and the folder <save_dir>/<name>/."""

    def __init__(self, save_dir: str | os.PathLike, name: str):
        self.save_dir = Path(save_dir)
        self.name = name

    @property
    def image(self) -> Path:
        """Return the result's path, <save_dir>/<name>.png (eval.py scores it)."""
        return self.save_dir / f"{self.name}.png"

    @property
    def dir(self) -> Path:
        """Return the run's own folder, <save_dir>/<name>/."""
        return self.save_dir / self.name

    def path(self, relative: str) -> Path:
        """Return a path inside the run's folder (e.g. 'loss.csv', 'progress/step_00025.png')."""
        return self.dir / relative

    @property
    def config_path(self) -> Path:
        return self.dir / "run_config.json"

    @property
    def progress_dir(self) -> Path:
        return self.dir / "progress"

    def progress_image(self, step: int) -> Path:
        """Return the path of the progress image of step `step` (0-based)."""
        return self.progress_dir / f"step_{step:05d}.png"

    def progress_images(self) -> list[Path]:
        """Return the progress images written so far, in step order."""
        return sorted(self.progress_dir.glob("step_*.png"))

    def particle_image(self, index: int) -> Path:
        return self.dir / "particles" / f"particle_{index}.png"

    def unfinished_image(self, status: str) -> Path:
        """Return where a run that ended with `status` keeps its image: last_finite.png (diverged) or interrupted.png."""
        return self.dir / ("last_finite.png" if status == "diverged" else "interrupted.png")

    # ------------------------------------------------------------------------------------------------ the record
    def read_config(self) -> dict | None:
        """Return run_config.json as a dict, or None when it is missing or unreadable."""
        try:
            data = json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write_config(self, record: dict) -> None:
        """Write run_config.json atomically (the folder is made if needed)."""
        save_json_atomic(record, self.config_path)

    def status(self) -> str:
        """Return finished | running | diverged | interrupted | no record (a PNG without a record) | missing."""
        config = self.read_config()
        if config is not None:
            return str(config.get("status", "unknown"))
        return "no record" if self.image.is_file() else "missing"

    # ------------------------------------------------------------------------------------------------ losses, latents
    def write_losses(self, losses: list) -> None:
        """Write loss.csv (step, loss) atomically."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["step", "loss"])
        writer.writerows(enumerate(losses))
        atomic_write_bytes(self.dir / "loss.csv", buffer.getvalue().encode())

    def read_losses(self) -> list[float] | None:
        """Return loss.csv's losses in step order, or None when it is missing or unreadable."""
        try:
            with open(self.dir / "loss.csv", newline="", encoding="utf-8") as handle:
                return [float(row["loss"]) for row in csv.DictReader(handle)]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save_latents(self, latents: torch.Tensor, initial: bool = False) -> Path:
        """Save latents (float32, CPU) as latents.pt, or init_latents.pt when initial; return the path."""
        return save_torch_atomic(latents.detach().float().cpu(),
                                 self.dir / ("init_latents.pt" if initial else "latents.pt"))

    def load_latents(self, initial: bool = False) -> torch.Tensor | None:
        """Return the saved final (or initial) latents, or None when there are none."""
        path = self.dir / ("init_latents.pt" if initial else "latents.pt")
        return torch.load(path, map_location="cpu") if path.is_file() else None

    # ------------------------------------------------------------------------------------------------ replacing a run
    ARTEFACT_SUFFIXES = (".png", ".svg", ".gaussians.pt", ".glb", ".obj", ".mtl", ".zip")

    def artefacts(self) -> list[Path]:
        """Return the files a run writes beside its folder that exist now: the PNG, and generators' SVG, meshes, ..."""
        return [self.save_dir / f"{self.name}{suffix}" for suffix in self.ARTEFACT_SUFFIXES
                if (self.save_dir / f"{self.name}{suffix}").is_file()]

    def check_replace(self, record: dict, result_fields, overwrite: bool = False) -> None:
        """Raise UserError when starting a run with this record here would replace what it should not: a finished
        result made with other result settings, files that no run of this toolkit made, or a name that differs from
        another only by case (one file on case-insensitive file systems). overwrite allows the first two."""
        if self.save_dir.is_dir():
            for entry in self.save_dir.iterdir():
                for own in (self.name, f"{self.name}.png"):
                    if entry.name != own and entry.name.lower() == own.lower():
                        raise UserError(f"{entry} differs from this run's {own} only by case: on macOS and Windows "
                                        f"they are one file. Choose another --save_dir, or change the prompt's case")
        if overwrite:
            return
        previous = self.read_config()
        if previous is None:
            if self.image.is_file() or (self.dir.is_dir() and any(self.dir.iterdir())):
                found = self.image if self.image.is_file() else self.dir
                raise UserError(f"{found} exists but no run of this toolkit made it (no {self.config_path.name}): "
                                f"move it away, choose another --save_dir, or pass --overwrite to replace it")
            return
        if previous.get("status") != "finished":
            return  # an unfinished run (crashed, stopped, diverged) is what a new run is meant to replace
        changed = changed_settings(previous, record, result_fields)
        if changed:
            what = ", ".join(f"{k} {previous.get(k)!r} -> {record.get(k)!r}" for k in changed[:4])
            part = filename_part(record.get(changed[0]))
            base = self.save_dir.resolve() if self.save_dir.name in ("", ".", "..") else self.save_dir
            other = base.with_name(f"{base.name}_{part}") if base.name else base / part
            raise UserError(f"{self.image} is the finished result of another run ({what}): this run would replace "
                            f"it. Choose another --save_dir (e.g. {other}) or pass --overwrite to replace it")

    def clear(self) -> None:
        """Remove an earlier run's files here (its folder and its artefacts beside it), before a new run writes."""
        for path in self.artefacts():
            path.unlink()
        if self.dir.is_dir():
            shutil.rmtree(self.dir)


def filename_part(value) -> str:
    """Return a plain file-name piece naming a setting's value (for suggesting another folder)."""
    return prompt_to_filename("_".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))


def changed_settings(stored: dict, wanted: dict, names) -> list[str]:
    """Return the names whose values differ between a stored run record and a wanted one, compared as
    run_config.json stores them (what makes a finished run stale or a checkpoint another run's)."""
    return [name for name in names if as_json(stored.get(name)) != as_json(wanted.get(name))]


def as_json(value):
    """Return value as JSON would bring it back (tuples as lists), for comparing a record with a configuration."""
    return json.loads(json.dumps(value, default=str))
