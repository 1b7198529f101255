"""bench.py --methods: each method's step (loss, backward, AdamW) against its own UNet work, the very UNet calls it
made replayed bare."""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import EDIT_PROMPT, PROMPT, load_for_mode, short_run_result, time_rounds


METHOD_T = 500  # every method's step is timed at this t: ISM then inverts to s = 420 in 3 steps, SDI to 500 in 10


def make_method_steps(model, names: list[str]) -> tuple[dict, dict]:
    """Return (name -> step, name -> its UNet work) for methods of the table, and record each step's UNet calls.

    A step is main.py's: the method's loss at t = METHOD_T (main.py's settings for it), backward, AdamW. Its UNet
    work replays, bare and under no_grad, the calls a step made: same rows, same timesteps, same conditioning shape.
    """
    import torch

    from guidance.config import RunConfig
    from guidance.loop import LOSS_SCALE
    from guidance.methods import METHODS, StepContext

    shape, device = model.latent_shape(1), model.device
    uncond = model.get_text_embeds("low quality")
    steps, works, calls = {}, {}, {}
    for name in names:
        method = METHODS[name]
        method_args = RunConfig(prompt=PROMPT, loss_type=name, model=model.model_name, device=str(device),
                                save_dir=tempfile.gettempdir(), edit_prompt=EDIT_PROMPT if method.edits else None,
                                src_img_path=source_image() if method.edits else None).resolved()
        context = StepContext(model, method_args, torch.cat([uncond, model.get_text_embeds(PROMPT)]),
                              torch.cat([uncond, model.get_text_embeds(EDIT_PROMPT)]),
                              torch.randn(shape, device=device), model.min_step, model.max_step)
        latents = torch.randn(shape, device=device).requires_grad_(True)
        optimizer = torch.optim.AdamW([latents], lr=1e-3, weight_decay=0)

        def step(method=method, context=context, latents=latents, optimizer=optimizer, n=method_args.step):
            optimizer.zero_grad(set_to_none=True)
            (LOSS_SCALE * method.compute_loss(model, context, latents, METHOD_T, n)).backward()
            optimizer.step()

        recorded = []
        handle = getattr(model.unet, "_orig_mod", model.unet).register_forward_hook(
            lambda m, a, kw, out: recorded.append((a[0].detach().clone(), a[1].detach().clone(),
                                                   kw["encoder_hidden_states"].detach().clone())), with_kwargs=True)
        try:
            step()
        finally:
            handle.remove()
        calls[name] = recorded

        def work(recorded=recorded):
            with torch.no_grad():
                for x, timesteps, states in recorded:
                    model._unet_output(x, timesteps, states)

        steps[name], works[name] = step, work
    return steps, works, calls


def source_image() -> str:
    """Return the path of a source image for editing methods' configurations (timing needs no real one)."""
    path = Path(tempfile.gettempdir()) / "bench_source.png"
    if not path.is_file():
        from PIL import Image

        Image.new("RGB", (64, 64), (200, 40, 40)).save(path)
    return str(path)


def run_methods(args: argparse.Namespace) -> dict:
    """Return {'methods': name -> figures}: each method's step time, its UNet work's time, their ratio and its UNet rows."""
    started = time.perf_counter()
    model = load_for_mode(args)
    steps, works, calls = make_method_steps(model, args.methods)
    interleaved = {}
    for name in args.methods:
        interleaved[f"{name}/step"], interleaved[f"{name}/work"] = steps[name], works[name]
    samples = time_rounds(interleaved, args.steps, args.warmup, args.device)
    methods = {}
    for name in args.methods:
        step_s, work_s = samples[f"{name}/step"], samples[f"{name}/work"]
        methods[name] = {
            "step_s": statistics.median(step_s), "unet_work_s": statistics.median(work_s),
            "ratio_to_unet_work": statistics.median(s / w for s, w in zip(step_s, work_s)),
            "unet_calls": len(calls[name]), "unet_rows_per_step": sum(x.shape[0] for x, _, _ in calls[name]),
            "unet_call_rows": [x.shape[0] for x, _, _ in calls[name]], "t": METHOD_T,
            "step_samples_s": step_s, "unet_work_samples_s": work_s}
    return short_run_result(args, started, warmup=args.warmup, methods=methods)


def format_methods(result: dict) -> str:
    """Return the human-readable table of a --methods result."""
    lines = [f"{result['model']} on {result['device']} ({result['device_name']}, {result['threads']} threads), "
             f"{result['precision']}; every step at t = {next(iter(result['methods'].values()))['t']}; median of "
             f"{result['rounds']} rounds after {result['warmup']} warm-up; {result['date']}",
             f"{'method':8s} {'step s':>9s} {'UNet work s':>12s} {'x work':>7s} {'calls':>6s} {'rows':>5s}  rows per call"]
    for name, f in result["methods"].items():
        lines.append(f"{name:8s} {f['step_s']:9.4f} {f['unet_work_s']:12.4f} {f['ratio_to_unet_work']:7.3f} "
                     f"{f['unet_calls']:6d} {f['unet_rows_per_step']:5d}  {f['unet_call_rows']}")
    lines.append(f"bench took {result['seconds']:.0f} s")
    return "\n".join(lines)
