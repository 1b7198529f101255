"""What guidance/ shares with the scripts that use it: the user-error type, devices, precisions, atomic writes,
image I/O, seeds and the learning-rate schedule.

guidance/ imports nothing from the top-level scripts, so that it can be dropped into the course's own skeleton
(whose utils.py has only pil_to_torch / torch_to_pil); utils.py re-exports these names.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.optim.lr_scheduler import LambdaLR

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ON_OFF_AUTO = ("auto", "on", "off")  # the choices of --cuda_graphs and --channels_last


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
    """Write data to path via a temporary file and rename, so readers never see a partial file.

    The file gets the permissions any new file gets (0666 less the umask: 0644 under umask 022), not mkstemp's 0600:
    the temporary file is created by os.open with mode 0666 and the kernel applies the umask, with no umask read
    (os.umask changes the umask of every thread while it is read).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _create_temp_file(path: Path) -> tuple[int, str]:
    """Return (fd, name) of a new, uniquely named temporary file beside path, created with mode 0666 & ~umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name beside {path}")


def save_image_atomic(img, path: str | os.PathLike, compress_level: int = 6) -> None:
    """Save a PIL image as PNG atomically (temp file + rename); compress_level 0-9 (PIL's default 6)."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", compress_level=compress_level)
    atomic_write_bytes(path, buffer.getvalue())


def save_json_atomic(obj, path: str | os.PathLike) -> None:
    """Write obj as indented JSON atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=4, default=str) + "\n").encode())


def save_torch_atomic(obj, path: str | os.PathLike) -> Path:
    """Write obj with torch.save atomically; return the path."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


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
    except Image.DecompressionBombError as err:
        raise UserError(f"{path} is too large to read as an image ({err}): give an image of at most "
                        f"{Image.MAX_IMAGE_PIXELS:,} pixels, e.g. resized to 1024 px") from None
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


def check_writable_dir(path: str | os.PathLike, flag: str = "--save_dir", what: str = "save directory") -> Path:
    """Return path as a Path after creating it and proving a file can be written there (the error names `flag`)."""
    path = Path(path)
    try:
        _make_folder(path)
        _probe_write(path / ".write_test")
    except OSError as err:
        raise UserError(f"cannot write to {what} {path} ({err.strerror or err}): choose another {flag}") from None
    return path


def file_write_problem(path: str | os.PathLike) -> str | None:
    """Return why a file cannot be written at path ('it is a folder', or the system's reason), or None if it can.

    Creates the missing folders above path and writes (then removes) a probe file beside it, as the real atomic write
    will: a script asks this before its expensive work, so that an unwritable target fails in milliseconds.
    """
    path = Path(path)
    if path.is_dir():
        return "it is a folder"
    try:
        _make_folder(path.parent)
        _probe_write(path)
    except OSError as err:
        return err.strerror or str(err)
    return None


def _make_folder(path: Path) -> None:
    """Create path and its parents (OSError 'Not a directory' when one of them is a file, not 'File exists')."""
    for above in (path, *path.parents):
        if above.exists() or above.is_symlink():
            if not above.is_dir():
                raise NotADirectoryError(20, "Not a directory", str(above))
            break
    path.mkdir(parents=True, exist_ok=True)


def _probe_write(path: Path) -> None:
    """Create and remove a temporary file beside path (OSError when that folder cannot be written)."""
    fd, probe = _create_temp_file(path)
    os.close(fd)
    os.unlink(probe)


def get_cosine_schedule_with_warmup(optimizer, num_warmup_steps: int, num_training_steps: int) -> LambdaLR:
    """Return a LambdaLR: linear warm-up over num_warmup_steps, then half a cosine to 0 at num_training_steps."""

    def lr_lambda(step: int) -> float:
        if step < num_warmup_steps:
            return step / max(1, num_warmup_steps)
        progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return LambdaLR(optimizer, lr_lambda)
