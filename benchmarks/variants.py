"""bench.py --variants: the batch-2 floor and the SDS step under each variant (memory format, attention, precision,
compile, CUDA graphs, cuDNN benchmark), interleaved round by round."""
from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.common import load, log, make_steps, model_source, short_run_result, time_rounds


# --variants: what each changes from the command line's settings.
VARIANTS = {
    "default": {},
    "channels_last": {"channels_last": "on"},
    "contiguous": {"channels_last": "off"},  # the UNet in the default (NCHW) memory format
    "classic_attention": {"attention": "classic"},  # diffusers' AttnProcessor (bmm + softmax) instead of SDPA
    "fp16": {"precision": "fp16"},
    "bf16": {"precision": "bf16"},
    "compile": {"compile": True},
    "cuda_graphs": {"cuda_graphs": "on"},  # the UNet's calls replayed as CUDA graphs (CUDA only; the default there)
    "no_cuda_graphs": {"cuda_graphs": "off"},
    "cudnn_benchmark": {"cudnn_benchmark": True},  # cuDNN picks its fastest convolution per shape (CUDA only)
}


def run_variants(args: argparse.Namespace) -> dict:
    """Return {'variants': name -> figures} timing the batch-2 floor and the SDS step under each variant.

    Every variant is its own loaded model; rounds interleave them, and each speed-up is the median over rounds
    of the first variant's time over this variant's, from the same round.
    """
    import torch

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    source = model_source(args.model, args.cache_dir)
    steps, errors = {}, {}
    for name in args.variants:
        settings = dict(VARIANTS[name])
        attention = settings.pop("attention", None)
        cudnn_benchmark = settings.pop("cudnn_benchmark", False)
        variant_args = argparse.Namespace(**{**vars(args), **settings})
        log(f"loading variant {name}")
        try:
            model = load(source, variant_args)
            if attention == "classic":
                from diffusers.models.attention_processor import AttnProcessor

                getattr(model.unet, "_orig_mod", model.unet).set_attn_processor(AttnProcessor())
            variant_steps = make_steps(model, model)
            steps[name] = {item: _with_cudnn_benchmark(variant_steps[item]) if cudnn_benchmark else variant_steps[item]
                           for item in ("floor_b2", "sds")}
            for _ in range(max(1, args.warmup)):
                for fn in steps[name].values():
                    fn()
        except Exception as err:  # e.g. a precision this device does not support: report it, time the others
            errors[name] = f"{err.__class__.__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            steps.pop(name, None)
            log(f"variant {name} failed: {errors[name]}")
    flat = {f"{name}/{item}": fn for name, items in steps.items() for item, fn in items.items()}
    samples = time_rounds(flat, args.steps, 0, args.device)
    reference = next(iter(steps), None)
    variants = {}
    for name in args.variants:
        if name in errors:
            variants[name] = {"error": errors[name]}
            continue
        figure = {}
        for item in ("floor_b2", "sds"):
            mine, ref = samples[f"{name}/{item}"], samples[f"{reference}/{item}"]
            figure[f"{item}_s"] = statistics.median(mine)
            figure[f"{item}_samples_s"] = mine
            figure[f"{item}_speedup"] = statistics.median(r / m for r, m in zip(ref, mine))
        variants[name] = figure
    return short_run_result(args, started, reference=reference, variants=variants)


def _with_cudnn_benchmark(fn):
    import torch

    def run():
        with torch.backends.cudnn.flags(enabled=True, benchmark=True):
            fn()
    return run


def format_variants(result: dict) -> str:
    """Return the human-readable table of a --variants result."""
    lines = [f"{result['model']} on {result['device']} ({result['device_name']}, {result['threads']} threads), "
             f"{result['precision']} unless the variant says otherwise; median of {result['rounds']} rounds; "
             f"speed-up over {result['reference']}, per round; {result['date']}",
             f"{'variant':20s} {'floor b2 s':>11s} {'speed-up':>9s} {'SDS step s':>11s} {'speed-up':>9s}"]
    for name, figure in result["variants"].items():
        if "error" in figure:
            lines.append(f"{name:20s} failed: {figure['error']}")
        else:
            lines.append(f"{name:20s} {figure['floor_b2_s']:11.4f} {figure['floor_b2_speedup']:9.3f} "
                         f"{figure['sds_s']:11.4f} {figure['sds_speedup']:9.3f}")
    return "\n".join(lines)
