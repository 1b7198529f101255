"""bench.py --generators: each generator's render, render + VAE encode + backward and SDS step against the batch-2 floor,
and the peak memory of a render with its backward."""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from benchmarks.common import PROMPT, REPO, device_name, load_for_mode, make_steps, time_rounds


def run_generators(args: argparse.Namespace) -> dict:
    """Return {'generators': name -> figures}: render, render + VAE encode + backward, and SDS step, against the floor.

    Each generator renders one image at --render_size (default: the model's resolution) with --num_shapes shapes;
    'render' is its render and a backward into theta, 'encode' adds the VAE encoder both ways (what
    generator.latents costs), 'step' is main.py's whole SDS step through it (loss, backward, AdamW). On CPU the
    peak RSS a render and its backward add, each in a fresh process.
    """
    import torch

    from guidance.generators import build_generator
    from guidance.loop import LOSS_SCALE

    started = time.perf_counter()
    model = load_for_mode(args)
    embeddings = torch.cat([model.get_text_embeds("low quality"), model.get_text_embeds(PROMPT)])
    timed_fns, memory = {"floor_b2": make_steps(model, model)["floor_b2"]}, {}
    for name in args.generators:
        gen = build_generator(name, model, 1, render_size=args.render_size, num_shapes=args.num_shapes)
        optimizer = torch.optim.AdamW(gen.param_groups(), weight_decay=0)

        def render(gen=gen):
            gen.render().mean().backward()

        def encode(gen=gen):
            gen.latents(model).mean().backward()

        def step(gen=gen, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            (LOSS_SCALE * model.get_sds_loss(gen.latents(model), embeddings, guidance_scale=25)).backward()
            optimizer.step()

        timed_fns.update({f"{name}/encode": encode, f"{name}/step": step})
        if name != "latent":
            timed_fns[f"{name}/render"] = render
            if args.device.type == "cpu" and not args.no_memory:
                memory[name] = _render_peak_mb(name, args.render_size or model.resolution, args.num_shapes,
                                               torch.get_num_threads())
    samples = time_rounds(timed_fns, args.steps, args.warmup, args.device)
    floor = samples["floor_b2"]
    figures = {}
    for name in args.generators:
        figures[name] = {item: statistics.median(samples[f"{name}/{item}"]) for item in ("render", "encode", "step")
                         if f"{name}/{item}" in samples}
        figures[name].update({f"{item}_x_floor": statistics.median(s / f for s, f in zip(samples[f"{name}/{item}"], floor))
                              for item in ("render", "encode", "step") if f"{name}/{item}" in samples})
        if name in memory:
            figures[name]["render_peak_added_mb"] = memory[name]
    return {"model": args.model, "device": str(args.device), "device_name": device_name(args.device),
            "precision": args.precision, "threads": torch.get_num_threads(), "rounds": args.steps,
            "render_size": args.render_size or model.resolution, "num_shapes": args.num_shapes,
            "floor_b2_s": statistics.median(floor), "generators": figures, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"), "seconds": time.perf_counter() - started}


def _render_peak_mb(name: str, size: int, num_shapes: int, threads: int) -> float:
    """Return the peak RSS (MB) one render and its backward add, measured in a fresh process (CPU, Linux)."""
    code = (f"import gc, types, torch\nfrom benchmarks import common\n"
            f"from guidance.generators import build_generator\n"
            f"torch.set_num_threads({threads})\n"
            f"model = types.SimpleNamespace(device=torch.device('cpu'), resolution={size})\n"
            f"gen = build_generator({name!r}, model, 1, num_shapes={num_shapes})\n"
            f"gc.collect(); common.reset_peak_rss(); before = common.proc_status_kb('VmRSS')\n"
            f"gen.render().mean().backward()\n"
            f"print((common.proc_status_kb('VmHWM') - before) * 1024 / common.MB)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, check=True)
    return float(done.stdout.split()[-1])


def format_generators(result: dict) -> str:
    """Return the human-readable table of a --generators result."""
    lines = [f"{result['model']} on {result['device']} ({result['device_name']}, {result['threads']} threads), "
             f"{result['precision']}; {result['render_size']}^2 renders, {result['num_shapes']} shapes; batch-2 UNet "
             f"floor {result['floor_b2_s']:.4f} s; median of {result['rounds']} rounds; {result['date']}",
             f"{'generator':10s} {'render s':>9s} {'x floor':>8s} {'+VAE s':>9s} {'x floor':>8s} {'SDS step s':>11s} "
             f"{'x floor':>8s} {'render MB':>10s}"]
    for name, f in result["generators"].items():
        cells = [f"{f[item]:9.4f} {f[item + '_x_floor']:8.3f}" if item in f else f"{'-':>9s} {'-':>8s}"
                 for item in ("render", "encode")]
        memory = f"{f['render_peak_added_mb']:10.0f}" if "render_peak_added_mb" in f else f"{'-':>10s}"
        lines.append(f"{name:10s} {cells[0]} {cells[1]} {f['step']:11.4f} {f['step_x_floor']:8.3f} {memory}")
    lines.append(f"bench took {result['seconds']:.0f} s")
    return "\n".join(lines)
