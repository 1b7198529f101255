"""Small shared helpers: user errors, devices, precisions, image I/O, file names and the LR schedule."""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import re
import sys
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.optim.lr_scheduler import LambdaLR

from guidance.common import (PRECISIONS, UserError, atomic_write_bytes, resolve_device,  # noqa: F401 (re-exported)
                             resolve_precision, save_image_atomic, save_json_atomic)


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line ('error: ...; see --help') and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_cli(main_fn) -> None:
    """Run main_fn(); a UserError becomes 'error: ...' on stderr and exit code 2."""
    try:
        code = main_fn()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


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
    import json

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


def load_image(path: str | os.PathLike) -> Image.Image:
    """Return the image at path as RGB (grayscale, palette and RGBA are converted; alpha over white)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"image not found: {path}. Check the path, or run `python data/download.py` "
                        f"for the course images")
    if path.is_dir():
        raise UserError(f"expected an image file but {path} is a folder")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(canvas, rgba).convert("RGB")
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"cannot read {path} as an image ({err.__class__.__name__}): "
                        f"give a PNG or JPEG file") from None


def pil_to_torch(pil_img: Image.Image) -> torch.Tensor:
    """Return a [1, 3, H, W] float32 tensor in [0, 1] from an RGB PIL image."""
    array = np.asarray(pil_img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def torch_to_pil(tensor: torch.Tensor) -> Image.Image:
    """Return the first image of a [B, 3, H, W] (or [3, H, W]) tensor in [0, 1] as a PIL image."""
    if tensor.dim() == 4:
        tensor = tensor[0]
    array = tensor.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.round(array * 255.0).astype(np.uint8))


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Return path as a Path after creating it and proving a file can be written there."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write_test_")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"cannot write to save directory {path} ({err.strerror or err}): "
                        f"choose another --save_dir") from None
    return path


def get_cosine_schedule_with_warmup(optimizer, num_warmup_steps: int, num_training_steps: int) -> LambdaLR:
    """Return a LambdaLR: linear warm-up over num_warmup_steps, then half a cosine to 0 at num_training_steps."""

    def lr_lambda(step: int) -> float:
        if step < num_warmup_steps:
            return step / max(1, num_warmup_steps)
        progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return LambdaLR(optimizer, lr_lambda)
