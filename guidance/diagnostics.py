"""What the guidance sees, for people watching a run: panels of x, x_t, x0_hat and |grad|, and TensorBoard logs.

main.run calls `GuidanceLog.after_loss` once per step, after the loss and before the update, so that the four
pictures of a panel belong to the same step (threestudio's guidance_eval, stable-dreamfusion's debug views):
x (the current latents, decoded), x_t (the noised latents the UNet saw), x0_hat = (x_t - sigma_t eps) / alpha_t
(the one-step denoised image that the guided noise prediction eps points at) and |grad| (the gradient the loss
applies, averaged over the latent channels, as a heat map scaled to its maximum). They are read from
`model.last_guidance = {"t", "x_t", "eps", "grad"}`, which every loss sets. With several particles (VSD) the
panel shows the first one; for editing losses, the target.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from guidance.common import UserError, atomic_write_bytes

PANEL_TITLES = ("x", "x_t", "x0_hat", "|grad|")
TILE_MIN, TILE_MAX = 128, 256  # tiles are scaled by an integer factor to a side in this range (64 -> 128, 512 -> 256)
LABEL_HEIGHT = 16  # pixels of the caption strip above each tile
GAP = 4  # pixels between tiles
HEAT_COLORMAP = "inferno"


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """Return a [3, H, W] image in [0, 1] as an [H, W, 3] uint8 array."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def _tile_scale(size: int) -> tuple[int, int]:
    """Return (up, down): integer factors that bring a side of `size` pixels into [TILE_MIN, TILE_MAX]."""
    if size < TILE_MIN:
        return math.ceil(TILE_MIN / size), 1
    if size > TILE_MAX:
        return 1, math.ceil(size / TILE_MAX)
    return 1, 1


def _scaled(array: np.ndarray, up: int, down: int) -> np.ndarray:
    from PIL import Image

    if up > 1:
        return array.repeat(up, 0).repeat(up, 1)
    if down > 1:
        return np.asarray(Image.fromarray(array).reduce(down))
    return array


def heat_map(grad: torch.Tensor, height: int, width: int) -> tuple[np.ndarray, float]:
    """Return (the [height, width, 3] uint8 colour map of mean_c |grad| of a [C, h, w] gradient, to its max; max)."""
    from matplotlib import colormaps

    magnitude = grad.detach().abs().float().mean(0).cpu().numpy()
    peak = float(magnitude.max())
    scaled = magnitude / peak if peak > 0 else magnitude
    rgb = (colormaps[HEAT_COLORMAP](scaled)[..., :3] * 255).round().astype(np.uint8)
    rows = np.arange(height) * magnitude.shape[0] // height  # nearest neighbour: one latent cell = one block
    cols = np.arange(width) * magnitude.shape[1] // width
    return rgb[rows][:, cols], peak


def guidance_panel(model, latents: torch.Tensor) -> tuple[np.ndarray, dict] | None:
    """Return (the [H, W, 3] uint8 panel x | x_t | x0_hat | |grad| of the first image, its numbers), or None.

    None when the model recorded no guidance (a model whose losses do not set last_guidance). The numbers are
    t, grad_abs_mean (mean |grad| over all of the batch) and grad_abs_max (the heat map's full scale).
    """
    record = getattr(model, "last_guidance", None)
    if not record:
        return None
    t = int(record["t"])
    with torch.no_grad():
        x_t, eps = record["x_t"][:1], record["eps"][:1]
        x0_hat = model.schedule.predict_x0(x_t, eps, t)
        # One image per decode: a model that replays its decoder as a CUDA graph keeps its captured batch size.
        tiles = [_to_uint8(model.decode_latents(z.to(x_t.dtype))[0])
                 for z in (latents[:1].detach(), x_t, x0_hat)]
        heat, peak = heat_map(record["grad"][0], *tiles[0].shape[:2])
        grad_abs_mean = float(record["grad"].detach().abs().float().mean())
    tiles.append(heat)
    up, down = _tile_scale(max(tiles[0].shape[:2]))
    tiles = [_scaled(tile, up, down) for tile in tiles]
    captions = ("x", f"x_t  (t = {t})", "x0_hat", f"|grad|  (max {peak:.3g})")
    return _compose(tiles, captions), {"t": t, "grad_abs_mean": grad_abs_mean, "grad_abs_max": peak}


def _compose(tiles: list[np.ndarray], captions) -> np.ndarray:
    """Return the tiles side by side, GAP apart, each under a LABEL_HEIGHT caption strip (white on black)."""
    from PIL import Image, ImageDraw

    height, width = tiles[0].shape[:2]
    panel = Image.new("RGB", (len(tiles) * width + (len(tiles) - 1) * GAP, LABEL_HEIGHT + height), (0, 0, 0))
    draw = ImageDraw.Draw(panel)
    for i, (tile, caption) in enumerate(zip(tiles, captions)):
        left = i * (width + GAP)
        panel.paste(Image.fromarray(tile), (left, LABEL_HEIGHT))
        draw.text((left + 3, 2), caption, fill=(255, 255, 255))
    return np.asarray(panel)


def split_panel(panel: np.ndarray) -> dict[str, np.ndarray]:
    """Return {title: tile} for a panel made by guidance_panel (for readers and tests)."""
    width = (panel.shape[1] - (len(PANEL_TITLES) - 1) * GAP) // len(PANEL_TITLES)
    return {title: panel[LABEL_HEIGHT:, i * (width + GAP): i * (width + GAP) + width]
            for i, title in enumerate(PANEL_TITLES)}


def require_tensorboard():
    """Return torch's SummaryWriter class, or raise UserError when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard "
                        "(it is in requirements.txt)") from None
    return SummaryWriter


def tensorboard_writer(log_dir: str | Path):
    """Return a SummaryWriter writing event files to log_dir."""
    return require_tensorboard()(log_dir=str(log_dir))


class GuidanceLog:
    """Writes a run's guidance diagnostics: panel PNGs (<run_dir>/guidance/step_NNNNN.png) and TensorBoard events.

    TensorBoard scalars: loss (every step, once it is read), and at the steps whose loss is read (every step on
    a CPU; every LOSS_READ_EVERY steps on a GPU, where reading waits for the device) grad_abs_mean, t, lr and,
    for VSD, lora_loss. Panels every log_step steps, to the PNG folder (save_panels) and as the image 'guidance'.
    """

    def __init__(self, run_dir: Path, log_step: int, save_panels: bool, tensorboard_dir: str | Path | None):
        self.panel_dir = Path(run_dir) / "guidance" if save_panels else None
        self.log_step = int(log_step)
        self.writer = tensorboard_writer(tensorboard_dir) if tensorboard_dir else None
        self.losses_logged = 0

    def after_loss(self, step: int, model, latents: torch.Tensor, losses: list, lr: float) -> None:
        """Log step `step` (0-based): called after its loss, before the update; losses holds every loss read so far."""
        if self.writer is not None:
            for index in range(self.losses_logged, len(losses)):
                self.writer.add_scalar("loss", losses[index], index)
            self.losses_logged = len(losses)
            record = getattr(model, "last_guidance", None)
            if len(losses) == step + 1 and record:
                self.writer.add_scalar("grad_abs_mean", float(record["grad"].detach().abs().float().mean()), step)
                self.writer.add_scalar("t", int(record["t"]), step)
                self.writer.add_scalar("lr", float(lr), step)
                if getattr(model, "last_lora_loss", None) is not None:
                    self.writer.add_scalar("lora_loss", float(model.last_lora_loss), step)
        if self.log_step and step % self.log_step == 0 and (self.panel_dir is not None or self.writer is not None):
            made = guidance_panel(model, latents)
            if made is None:
                return
            panel, _ = made
            if self.panel_dir is not None:
                from PIL import Image

                buffer = io.BytesIO()
                Image.fromarray(panel).save(buffer, format="PNG", compress_level=1)
                atomic_write_bytes(self.panel_dir / f"step_{step:05d}.png", buffer.getvalue())
            if self.writer is not None:
                self.writer.add_image("guidance", panel, step, dataformats="HWC")

    def close(self, losses: list | None = None) -> None:
        """Log the losses not logged yet (read at the end of the run) and close the TensorBoard file."""
        if self.writer is not None:
            for index in range(self.losses_logged, len(losses or [])):
                self.writer.add_scalar("loss", losses[index], index)
            self.writer.close()
