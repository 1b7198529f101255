"""What guidance/ shares with the scripts that use it: the user-error type, devices, precisions and atomic writes.

guidance/ imports nothing from the top-level scripts, so that it can be dropped into the course's own skeleton
(whose utils.py has only pil_to_torch / torch_to_pil); utils.py re-exports these names.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import torch

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UserError(Exception):
    """A mistake in what the user asked for: printed as one message, exit code 2, no traceback."""


def resolve_device(device: str | int | None) -> torch.device:
    """Return the torch.device for 'cpu', 'cuda', 'cuda:N', 'mps', an integer GPU index, or None (best available)."""
    if device is None or device == "":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if isinstance(device, torch.device):
        device = str(device)
    text = str(device).strip().lower()
    if text.isdigit():
        text = f"cuda:{text}"
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}: use cpu, cuda, cuda:N, an integer GPU index, or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} asked for CUDA, but no CUDA GPU is visible: use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) visible "
                            f"(indices 0..{torch.cuda.device_count() - 1})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise UserError(f"device {device!r}: MPS is not available on this machine: use --device cpu")
    elif dev.type != "cpu":
        raise UserError(f"unknown device {device!r}: use cpu, cuda, cuda:N, an integer GPU index, or mps")
    return dev


def resolve_precision(precision: str | torch.dtype) -> torch.dtype:
    """Return the torch dtype for 'fp32' | 'fp16' | 'bf16' (a torch dtype passes through; float64 for exact tests)."""
    if isinstance(precision, torch.dtype):
        if precision not in (*PRECISIONS.values(), torch.float64):
            raise UserError(f"unsupported precision {precision}: use torch.float32, torch.float16 or torch.bfloat16")
        return precision
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write data to path via a temporary file and rename, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_image_atomic(img, path: str | os.PathLike) -> None:
    """Save a PIL image as PNG atomically (temp file + rename)."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def save_json_atomic(obj, path: str | os.PathLike) -> None:
    """Write obj as indented JSON atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=4, default=str) + "\n").encode())
