"""Benchmark every distillation step against its floor, the bare batched UNet forward it cannot avoid.

    python bench.py --model mid --json                      # this CPU: SD 2.1-base's UNet scaled to 36 M params
    python bench.py --model sd21 --device cuda --precision fp16

Floors: one batch-2 UNet forward (SDS's classifier-free guidance, and VSD's pretrained pass) and one batch-4
forward (PDS: source and target together), under no_grad. A step is what main.py does per iteration: the
loss, its backward into the latents and their AdamW step (VSD: the LoRA's training step too). Floors and steps
run interleaved, round by round, after warm-up. Each time is the median over rounds; each ratio is the median
over rounds of step / floor within the round, so that load drifting between rounds cancels out. main.py's
own loop runs through main.run on the same model. On CPU one run at --log_step, with a bare batch-2 forward
timed (and left out of the loop's time) before every step, gives both loop figures: logging off is the median
of its steps that do not log; at --log_step it is that plus a logging step's extra time spread over the
--log_step steps it serves; each over the median of those floors. On CUDA each loop runs undisturbed as a whole.

Peak memory is "added over the loaded model". On CPU each method runs in its own process, forked from the
bench right after it loaded the model, and counts its peak RSS (VmHWM, reset through /proc/self/clear_refs once
loaded) minus its RSS once loaded with every weight read (safetensors are memory-mapped: a weight is
resident only once read). On CUDA: max_memory_allocated minus what the loaded models hold.

'tiny', 'mid', 'sd21', 'sd15', 'sdxl', 'sd35m' (and the tests' 'tiny-v', 'tiny-sdxl', 'tiny-sd3') are random-weight
pipelines of that architecture built from config (benchmarks/random_sd.py) and cached under --cache_dir: a denoiser's
cost does not depend on its weights. --memory gives one family's memory table (python bench.py --model sdxl --memory).

This file is the command line; each mode lives in benchmarks/ (full.py, methods.py, generators.py, memory.py,
variants.py), over the helpers they share (common.py).
"""
from __future__ import annotations

from utils import interrupt_quietly  # first: Ctrl-C while torch and the rest import exits 130 quietly

interrupt_quietly(__name__)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.random_sd import SIZES as RANDOM_MODELS  # noqa: E402 (tiny, mid, sd21, sd15, sdxl, sd35m, ...)
from benchmarks.variants import VARIANTS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """Return bench.py's argument parser."""
    p = argparse.ArgumentParser(description="Time and peak memory of SDS / PDS / VSD steps against the bare UNet forward.")
    p.add_argument("--model", default="mid", help=f"{' | '.join(RANDOM_MODELS)} (random weights of that architecture, "
                                                 f"built once and cached) | a toy world | a diffusers folder "
                                                 f"(default: mid)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: best available)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--steps", type=int, default=None,
                   help="timed rounds after warm-up (default: 5 on CPU, 30 on CUDA); main.py's loop runs steps + 1 "
                        "steps (on CPU those at multiples of --log_step log; on CUDA as many without logging, and 2 x "
                        "--log_step with it)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: 1 on CPU, 3 on CUDA)")
    p.add_argument("--json", action="store_true", help="print one JSON object with every figure (the table goes to stderr)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--channels_last", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                   help="UNet in channels_last memory format, as main.py (auto: on CUDA; --channels_last alone: on)")
    p.add_argument("--cuda_graphs", default="auto", choices=("auto", "on", "off"),
                   help="replay the UNet's calls as CUDA graphs, as main.py does (auto: on CUDA, unless --compile)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log_step", type=int, default=None, help="main.py's --log_step for its timed loop (default: main.py's, 25)")
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--variants", default=None,
                   help=f"instead of the full benchmark, time the batch-2 floor and the SDS step under each of these "
                        f"comma-separated variants, interleaved: {', '.join(VARIANTS)}")
    p.add_argument("--methods", nargs="*", default=None, metavar="METHOD",
                   help="instead of the full benchmark, time each method's step (loss, backward, AdamW) against its own "
                        "UNet work: the very UNet calls the step made (rows and timesteps recorded), replayed bare under "
                        "no_grad; no names: every method of guidance/methods.py but VSD (which the full run covers)")
    p.add_argument("--nerf", nargs="*", type=int, default=None, metavar="SIZE",
                   help="instead of the full benchmark, the NeRF generator's render, render + backward and render + VAE "
                        "encode + backward (and --latent_render's) per view against the batch-2 UNet floor, with their "
                        "peak memory, at these render sizes (default 64 128); benchmarks/nerf.py")
    p.add_argument("--mesh", nargs="*", type=int, default=None, metavar="SIZE",
                   help="instead of the full benchmark, the mesh renderer: rasterising a view (new and cached), texture "
                        "sampling + backward, for 10k- and 100k-face meshes at these sizes (default 512 1024), with "
                        "peak memory (no model needed); benchmarks/mesh.py")
    p.add_argument("--generators", nargs="*", default=None, metavar="GENERATOR",
                   help="instead of the full benchmark, time each generator's render, its render + VAE encode + "
                        "backward, and its whole SDS step against the batch-2 floor, and (CPU) the peak memory of a "
                        "render with its backward; no names: latent pixels gaussians vector")
    p.add_argument("--memory", action="store_true",
                   help="instead of the full benchmark, the memory table of one model: its weights per part, and the "
                        "peak one SDS, PDS and VSD step adds as main.py runs it (prompts encoded, text encoders "
                        "freed), with each step's time; one model loaded, so SDXL and SD 3.5 fit in 24 GB")
    p.add_argument("--lora_checkpointing", action="store_true",
                   help="VSD's LoRA training step with gradient checkpointing, as main.py --lora_checkpointing")
    p.add_argument("--render_size", type=int, default=None, help="--generators: render size (default: the model's)")
    p.add_argument("--num_shapes", type=int, default=256, help="--generators: gaussians / vector shapes (default 256)")
    p.add_argument("--cache_dir", default=None,
                   help="where random-weight models are built (default: $XDG_CACHE_HOME or ~/.cache, /score-distillation)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Return bench.py's parsed arguments, checked before anything is loaded."""
    from utils import UserError, resolve_device

    args = build_parser().parse_args(argv)
    args.device = resolve_device(args.device)
    if args.steps is None:
        args.steps = 30 if args.device.type == "cuda" else 5
    if args.warmup is None:
        args.warmup = 3 if args.device.type == "cuda" else 1
    if args.steps < 1 or args.warmup < 0:
        raise UserError(f"--steps {args.steps} must be >= 1 and --warmup {args.warmup} >= 0")
    if args.log_step is None:
        from guidance.config import RunConfig

        args.log_step = RunConfig.log_step
    if args.log_step < 1:
        raise UserError(f"--log_step {args.log_step} must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads} must be at least 1")
    from guidance.sd import resolve_cuda_graphs

    resolve_cuda_graphs(args.cuda_graphs, args.device, args.compile)  # a bad combination fails before loading
    if args.variants is not None:
        args.variants = [name.strip() for name in args.variants.split(",") if name.strip()]
        unknown = [name for name in args.variants if name not in VARIANTS]
        if unknown or not args.variants:
            raise UserError(f"unknown --variants {', '.join(unknown) or '(none)'}: use some of {', '.join(VARIANTS)}")
    if args.methods is not None:
        from guidance.methods import METHODS

        timed = [name for name, m in METHODS.items() if not m.lora and m.sampler is None]
        args.methods = args.methods or timed
        unknown = [name for name in args.methods if name not in timed]
        if unknown:
            raise UserError(f"unknown --methods {', '.join(unknown)}: use some of {', '.join(timed)} (VSD: the full "
                            f"benchmark; ddim is a sampler, not a step)")
    if args.generators is not None:
        from guidance.generators import GENERATORS

        args.generators = args.generators or list(GENERATORS)
        if any(name not in GENERATORS for name in args.generators):
            raise UserError(f"unknown --generators {' '.join(args.generators)}: use some of {', '.join(GENERATORS)}")
    from guidance.models import world, worlds

    if args.model not in RANDOM_MODELS + tuple(worlds()) and not Path(args.model).expanduser().is_dir():
        raise UserError(f"unknown model {args.model!r}: use one of {', '.join(RANDOM_MODELS)}, a toy world "
                        f"({', '.join(worlds())}), or a diffusers folder")
    modes = [flag for flag in ("variants", "methods", "generators", "nerf", "mesh") if getattr(args, flag) is not None]
    if len(modes) > 1:
        raise UserError(f"--{' and --'.join(modes)} are separate runs: give one of them")
    for flag, default in (("nerf", [64, 128]), ("mesh", [512, 1024])):
        if getattr(args, flag) is not None:
            setattr(args, flag, getattr(args, flag) or default)
            if any(not 8 <= size <= 4096 for size in getattr(args, flag)):
                raise UserError(f"--{flag} {' '.join(map(str, getattr(args, flag)))}: sizes between 8 and 4096")
    if args.memory and (modes or args.no_memory or world(args.model) is not None):
        raise UserError(f"--memory is a run of its own: drop {', '.join('--' + m for m in modes) or '--no_memory'}"
                        if modes or args.no_memory else f"--memory measures Stable Diffusion models, not the "
                                                        f"{args.model} world")
    return args


def main(argv=None) -> int:
    """Run the benchmark; print the table (and with --json one JSON object on stdout). Return the exit code."""
    from benchmarks import full, generators, memory, mesh, methods, nerf, variants

    args = parse_args(argv)
    if args.memory:
        mode = (memory.run_memory, memory.format_memory)
    elif args.variants:
        mode = (variants.run_variants, variants.format_variants)
    elif args.methods is not None:
        mode = (methods.run_methods, methods.format_methods)
    elif args.nerf is not None:
        mode = (run_nerf, nerf.format)
    elif args.mesh is not None:
        mode = (lambda args: mesh.run(str(args.device), args.mesh, threads=args.threads or 2,
                                      repeats=max(1, args.steps)), mesh.format)
    elif args.generators is not None:
        mode = (generators.run_generators, generators.format_generators)
    else:
        mode = (full.run_benchmark, full.format_table)
    result = mode[0](args)
    table = mode[1](result)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(result, indent=1))
    else:
        print(table)
    return 0


def run_nerf(args) -> dict:
    """Return benchmarks/nerf.py's figures for the bench's model (random weights of its architecture, or a folder)."""
    from benchmarks import nerf
    from benchmarks.common import load_for_mode

    return nerf.run(load_for_mode(args), args.device, tuple(args.nerf), threads=args.threads or 2, rounds=args.steps,
                    warmup=args.warmup)


if __name__ == "__main__":
    from utils import run_cli

    run_cli(main)
