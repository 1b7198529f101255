"""What the NeRF generator costs against the model it serves: render, render + backward, and render + VAE encode +
backward (what generator.latents and the loss's backward cost), at each render size, beside one bare batch-2 UNet
forward of the same model (the floor every method pays at least once per step), and the peak memory of each.

    from benchmarks import nerf
    print(nerf.format(nerf.run(model, torch.device("cpu"), sizes=(64, 128), threads=2)))

One view per item (views_per_step = 1), the generator's defaults otherwise (48 proposal + 16 importance samples per
ray, a 64^2 x 16-channel triplane, hidden 64, albedo shading); 'latent_render' renders the model's latent channels
at its latent size instead, without the VAE. Peak RSS (CPU, Linux) is the process's high-water mark during the item,
above what it held before.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from guidance.cameras import Camera
from guidance.nerf import NerfGenerator

PROMPT = "a DSLR photo of a corgi"


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    except OSError:
        pass


def _measure(fn, device, rounds: int, warmup: int) -> dict:
    """Return {'s': median seconds, 'peak_mb': high-water RSS above the start (CPU) or CUDA peak allocated}."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        _reset_peak()
        base = _status_kb("VmRSS")
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = (_status_kb("VmHWM") - base) / 1024
    return {"s": statistics.median(seconds), "peak_mb": peak}


def run(model, device, sizes=(64, 128), threads: int = 2, rounds: int = 3, warmup: int = 1) -> dict:
    """Return the timings (seconds, medians) and peak memory of the NeRF's work per view against the UNet floor."""
    device = torch.device(device)
    if device.type == "cpu" and threads:
        torch.set_num_threads(int(threads))
    embeddings = torch.cat([model.get_text_embeds(""), model.get_text_embeds(PROMPT)])
    x = torch.randn(2, model.latent_channels, model.latent_size, model.latent_size, device=device)
    camera = Camera(15.0, 30.0, 1.75, 55.0)

    def floor():
        with torch.no_grad():
            model.predict_eps(x, 500, embeddings)

    result = {"model": getattr(model, "model_name", type(model).__name__), "device": str(device),
              "threads": torch.get_num_threads(), "resolution": int(model.resolution),
              "latent_size": int(model.latent_size), "floor": _measure(floor, device, rounds, warmup), "sizes": {}}
    for size in sizes:
        gen = NerfGenerator(model, render_size=size, shading="albedo", background="random")

        def render(gen=gen):
            with torch.no_grad():
                gen.render_views([camera])

        def render_backward(gen=gen):
            gen.render_views([camera])["image"].mean().backward()

        def encode_backward(gen=gen):
            gen.latents(model, [camera]).mean().backward()

        result["sizes"][int(size)] = {name: _measure(fn, device, rounds, warmup) for name, fn in
                                      (("render", render), ("render_backward", render_backward),
                                       ("encode_backward", encode_backward))}
    latent = NerfGenerator(model, latent_render=True, shading="albedo", background="random")

    def latent_backward():
        latent.latents(model, [camera]).mean().backward()

    result["latent_render"] = _measure(latent_backward, device, rounds, warmup)
    result["date"] = time.strftime("%Y-%m-%d %H:%M")
    return result


class HashGrid(torch.nn.Module):
    """instant-NGP's multi-resolution hash encoding in plain torch, as fast as we could write it: one flat table
    for every level, one gather for all (level, corner) pairs, trilinear weights (the measured alternative)."""

    PRIMES = (1, 2654435761, 805459861)

    def __init__(self, levels: int = 16, features: int = 2, log2_size: int = 19, base: int = 16, scale: float = 1.447):
        super().__init__()
        self.size, self.levels = 2**log2_size, levels
        self.register_buffer("resolutions", torch.tensor([float(int(base * scale**level)) for level in range(levels)]))
        self.register_buffer("corners", torch.tensor([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)]))
        self.table = torch.nn.Parameter(torch.rand(levels * self.size, features) * 2e-4 - 1e-4)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        grid = ((points + 1) / 2)[:, None, :] * self.resolutions[None, :, None]  # [N, L, 3]
        lower = grid.floor().long()
        frac = grid - lower
        index = lower[:, :, None, :] + self.corners[None, None]  # [N, L, 8, 3]
        hashed = [index[..., axis] * prime for axis, prime in enumerate(self.PRIMES)]
        level_start = torch.arange(self.levels, device=points.device)[:, None] * self.size
        slot = (hashed[0] ^ hashed[1] ^ hashed[2]) % self.size + level_start
        corner = self.corners.bool()[None, None]
        weight = torch.where(corner, frac[:, :, None, :], 1 - frac[:, :, None, :]).prod(-1)  # [N, L, 8]
        features = self.table.index_select(0, slot.reshape(-1)).view(*weight.shape, -1)
        return (weight[..., None] * features).sum(2).flatten(1)


def time_encodings(points: int = 32768, threads: int = 1, rounds: int = 3) -> dict:
    """Return the seconds (best of rounds) of forward + backward of the triplane's features and of a hash grid's."""
    from guidance.nerf import TriplaneField

    torch.set_num_threads(int(threads))
    p = torch.rand(points, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    result = {}
    for name, encode in (("triplane 3 x 16 x 64^2", TriplaneField().features),
                         ("hash grid 16 levels x 2 x 2^19", HashGrid())):
        seconds = []
        for _ in range(rounds + 1):
            start = time.perf_counter()
            encode(p).square().sum().backward()
            seconds.append(time.perf_counter() - start)
        result[name] = min(seconds[1:])
    return result


def format(result: dict) -> str:
    """Return a markdown table of a run() result: seconds, x the UNet floor, peak MB."""
    floor = result["floor"]["s"]
    lines = [f"NeRF generator on {result['model']} ({result['device']}, {result['threads']} threads, model resolution "
             f"{result['resolution']}, latents {result['latent_size']}^2); one view; medians; {result['date']}",
             "", "| item | render size | seconds | x UNet floor | peak MB |", "|---|---:|---:|---:|---:|",
             f"| bare UNet forward, batch 2 (floor) | - | {floor:.4f} | 1.00 | {result['floor']['peak_mb']:.0f} |"]
    names = {"render": "render (no grad)", "render_backward": "render + backward",
             "encode_backward": "render + VAE encode + backward"}
    for size, items in result["sizes"].items():
        for key, label in names.items():
            item = items[key]
            lines.append(f"| {label} | {size} | {item['s']:.4f} | {item['s'] / floor:.2f} | {item['peak_mb']:.0f} |")
    item = result["latent_render"]
    lines.append(f"| latent_render: render latents + backward (no VAE) | {result['latent_size']} | {item['s']:.4f} | "
                 f"{item['s'] / floor:.2f} | {item['peak_mb']:.0f} |")
    return "\n".join(lines)
