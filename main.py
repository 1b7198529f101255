"""Distil an image from Stable Diffusion (or the toy world) with any method of guidance/methods.py: the course's main.py.

    python main.py --prompt "A castle next to a river" --loss_type sds --guidance_scale 25 --step 500
    python main.py --prompt P --edit_prompt E --src_img_path S --loss_type pds      # or dds
    python main.py --prompt P --loss_type vsd --num_particles 4
    python main.py --prompt P --loss_type sdi                                       # nfsd csd bridge asd ism sdi
    python main.py --model toy --prompt "a red circle" --loss_type sds      # offline, seconds on a CPU
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from utils import (PRECISIONS, CliParser, UserError, check_writable_dir, get_cosine_schedule_with_warmup, load_image,
                   atomic_write_bytes, pil_to_torch, prompt_to_filename, resolve_device, resolve_precision, run_cli,
                   save_image_atomic, save_json_atomic, seed_everything, torch_to_pil)
from guidance.methods import LOSS_TYPES, METHODS, OPTION_FLAGS, StepContext  # the one table of methods
from guidance.generators import GENERATORS, check_args as check_generator_args, from_args as generator_from_args

# The course's settings per loss: (guidance scale, optimisation steps), read from the table.
LOSS_DEFAULTS = {name: (m.guidance_scale, m.steps) for name, m in METHODS.items()}
T_ANNEAL_TO = 0.5  # --t_schedule anneal: max t falls to this fraction of T
LOSS_SCALE = 2000.0  # the course multiplies every loss by 2000 before backward
WARMUP_STEPS = 100
# Steps between reads of the loss (each read waits for the device): every step on a CPU, where it costs nothing.
LOSS_READ_EVERY = {"cpu": 1, "default": 25}


def build_parser() -> argparse.ArgumentParser:
    """Return main.py's argument parser (the course skeleton's flags plus ours)."""
    from guidance.core import T_SCHEDULES
    from guidance.methods import method_help
    from guidance.schedule import WEIGHTINGS
    from guidance.sd import DEFAULT_MODEL, ON_OFF_AUTO, VSD_LORA_TIMESTEPS

    p = CliParser(description="Score distillation on Stable Diffusion or the toy world. Methods (--loss_type):\n"
                              + method_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=str, required=True, help="generation prompt (PDS: the source image's prompt)")
    p.add_argument("--negative_prompt", type=str, default="low quality", help="prompt for the unconditional CFG branch")
    p.add_argument("--edit_prompt", type=str, default=None, help="editing methods (pds, dds): the target prompt")
    p.add_argument("--src_img_path", type=str, default=None, help="editing methods (pds, dds): the source image")
    p.add_argument("--save_dir", type=str, default="./outputs")
    p.add_argument("--loss_type", type=str, default="sds", choices=LOSS_TYPES)
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="default per method: " + ", ".join(f"{k} {m.guidance_scale:g}" for k, m in METHODS.items()))
    p.add_argument("--step", type=int, default=None,
                   help="optimisation steps; default per method: " + ", ".join(f"{k} {m.steps}" for k, m in METHODS.items()))
    p.add_argument("--device", type=str, default=None, help="cpu, cuda, cuda:N, an integer GPU index, or mps (default: best available)")
    p.add_argument("--lr", type=float, default=0.1, help="AdamW learning rate of the latents")
    p.add_argument("--log_step", type=int, default=25, help="save a progress image every N steps (0: never)")
    p.add_argument("--precision", type=str, default="fp32", choices=list(PRECISIONS))
    p.add_argument("--model", type=str, default=DEFAULT_MODEL,
                   help="short name (sd15, sd21, sd21-768, sdxl, sd35m), hub id, local diffusers folder, or 'toy'")
    p.add_argument("--no_t5", action="store_true", help="SD 3: leave the T5 text encoder unloaded (zeros in its "
                                                        "place, as diffusers does; saves 9.5 GB in fp16)")
    p.add_argument("--lora_checkpointing", action="store_true",
                   help="VSD: recompute the denoiser's activations in the LoRA's backward (same result, much less "
                        "memory, one more forward's time; BENCHMARKS.md)")
    p.add_argument("--cpu_offload", action="store_true", help="keep the text encoders and the VAE in CPU memory, "
                                                              "on the GPU only while they run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weighting", type=str, default=None, choices=WEIGHTINGS,
                   help="w(t); default: the method's paper weighting (" + ", ".join(
                       f"{k} {m.weighting}" for k, m in METHODS.items()) + ")")
    p.add_argument("--t_schedule", type=str, default=None, choices=T_SCHEDULES,
                   help="timestep per step: random (uniform), linear (max to min over the run), anneal (uniform "
                        "under a falling max); default per method: " + ", ".join(
                            f"{k} {m.t_schedule}" for k, m in METHODS.items() if m.t_schedule != "random") + ", else random")
    p.add_argument("--t_range", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="timesteps as fractions of T (default 0.02 0.98; dds 0.05 0.95)")
    p.add_argument("--t_anneal_to", type=float, default=T_ANNEAL_TO,
                   help=f"--t_schedule anneal: the max t falls linearly to this fraction of T (default {T_ANNEAL_TO})")
    for dest, option in OPTION_FLAGS.items():
        p.add_argument(f"--{dest}", type=option.kind, default=None, help=option.help)
    p.add_argument("--num_particles", type=int, default=1, help="VSD particles (images optimised together)")
    p.add_argument("--generator", type=str, default="latent", choices=GENERATORS,
                   help="what is optimised: the latents (the course), pixels, 2D gaussians, or vector shapes (also an SVG)")
    p.add_argument("--render_size", type=int, default=None, help="pixels / gaussians / vector: render size in pixels "
                                                                  "(default: the model's resolution)")
    p.add_argument("--num_shapes", type=int, default=None, help="gaussians / vector: how many (default 256)")
    p.add_argument("--pixel_size", type=int, default=None, help="pixels: theta's resolution, upsampled to the render")
    p.add_argument("--augment", action="store_true", help="pixels / gaussians / vector: a random view (crop and "
                                                          "perspective) of the render each step")
    p.add_argument("--lora_lr", type=float, default=None, help="VSD: AdamW learning rate of the LoRA (default: the model's, 1e-4 for SD)")
    p.add_argument("--vsd_lora_timestep", type=str, default="fresh", choices=VSD_LORA_TIMESTEPS,
                   help="VSD: train the LoRA at a fresh t (default) or on the same x_t as the gradient (faster)")
    p.add_argument("--channels_last", nargs="?", const="on", default="auto", choices=ON_OFF_AUTO,
                   help="UNet in channels_last memory format (auto: on CUDA devices; --channels_last alone: on)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--cuda_graphs", type=str, default="auto", choices=ON_OFF_AUTO,
                   help="replay the UNet's calls as CUDA graphs (auto: on CUDA devices, unless --compile)")
    p.add_argument("--gif", action="store_true", help="also write <save_dir>/<name>/progress.gif from the progress images")
    p.add_argument("--log_guidance", action="store_true",
                   help="every --log_step steps, save a panel of x, x_t, x0_hat and |grad| to <save_dir>/<name>/guidance/")
    p.add_argument("--tensorboard", type=str, default=None, metavar="DIR",
                   help="log loss, |grad|, t, lr, LoRA loss and the guidance panels for TensorBoard, in "
                        "DIR/<loss_type>/<name>/seed_<seed>")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Return main.py's parsed and validated arguments (fails fast, before any model is loaded)."""
    return validate_args(build_parser().parse_args(argv))


def validate_args(args: argparse.Namespace) -> argparse.Namespace:
    """Return args with per-loss defaults filled in, after checking everything that can be checked without a model."""
    if not args.prompt or not args.prompt.strip():
        raise UserError("--prompt is empty: give the text to distil, e.g. --prompt \"A castle next to a river\"")
    method = METHODS[args.loss_type]
    args.guidance_scale = method.guidance_scale if args.guidance_scale is None else args.guidance_scale
    args.step = method.steps if args.step is None else args.step
    args.weighting = method.weighting if getattr(args, "weighting", None) is None else args.weighting
    args.t_schedule = method.t_schedule if getattr(args, "t_schedule", None) is None else args.t_schedule
    args.t_range = list(method.t_range if getattr(args, "t_range", None) is None else args.t_range)
    args.t_anneal_to = getattr(args, "t_anneal_to", T_ANNEAL_TO)
    _fill_method_options(args, method)
    if args.step < 1:
        raise UserError(f"--step {args.step} must be at least 1")
    if args.log_step < 0:
        raise UserError(f"--log_step {args.log_step} must be >= 0 (0 turns progress images off)")
    if args.num_particles < 1:
        raise UserError(f"--num_particles {args.num_particles} must be at least 1")
    if args.lr <= 0:
        raise UserError(f"--lr {args.lr} must be positive, e.g. 0.1")
    if method.edits:
        label = args.loss_type.upper()
        if not args.edit_prompt or not args.edit_prompt.strip():
            raise UserError(f"{label} edits an image: give the target text with --edit_prompt "
                            "(and the source with --src_img_path)")
        if not args.src_img_path:
            raise UserError(f"{label} edits an image: give the source image with --src_img_path")
        if args.num_particles != 1:
            raise UserError(f"--num_particles {args.num_particles}: {label} edits one image; particles are for "
                            f"generation methods")
        load_image(args.src_img_path)  # a missing or unreadable image fails here, not after loading the model
    if getattr(args, "lora_checkpointing", False) and not method.lora:
        raise UserError(f"--lora_checkpointing is for the methods that train a LoRA "
                        f"({', '.join(n for n, m in METHODS.items() if m.lora)}), not {args.loss_type}: drop it")
    _check_timesteps(args)
    if method.sampler is not None and getattr(args, "generator", "latent") != "latent":
        raise UserError(f"--loss_type {args.loss_type} samples latents with the model itself: drop --generator "
                        f"{args.generator}")
    check_generator_args(args)
    from guidance.sd import resolve_channels_last, resolve_cuda_graphs

    device = resolve_device(args.device)
    resolve_cuda_graphs(args.cuda_graphs, device, args.compile)
    resolve_channels_last(args.channels_last, device)
    check_writable_dir(args.save_dir)
    if getattr(args, "log_guidance", False) and not args.log_step:
        raise UserError("--log_guidance saves its panels every --log_step steps: give --log_step N (N > 0)")
    if getattr(args, "tensorboard", None):
        from guidance.diagnostics import require_tensorboard

        require_tensorboard()
        check_writable_dir(args.tensorboard)
    return args


def _fill_method_options(args: argparse.Namespace, method) -> None:
    """Set each method-specific flag to its value or the method's default; a flag of another method is an error."""
    for dest in OPTION_FLAGS:
        value = getattr(args, dest, None)
        if dest in method.options:
            setattr(args, dest, method.options[dest] if value is None else value)
        elif value is not None:
            owners = [name for name, m in METHODS.items() if dest in m.options]
            raise UserError(f"--{dest} belongs to --loss_type {' / '.join(owners)}, not {args.loss_type}: drop it "
                            f"or choose that method")
        else:
            setattr(args, dest, None)


def _check_timesteps(args: argparse.Namespace, num_train_timesteps: int = 1000) -> None:
    """Check --t_range, --t_anneal_to and the methods' timestep flags before any model loads."""
    low, high = args.t_range
    if not 0.0 <= low < high <= 1.0:
        raise UserError(f"--t_range {low:g} {high:g} is invalid: give MIN MAX with 0 <= MIN < MAX <= 1, e.g. 0.02 0.98")
    if not 0.0 <= args.t_anneal_to <= 1.0:
        raise UserError(f"--t_anneal_to {args.t_anneal_to:g} must be a fraction of T in [0, 1], e.g. 0.5")
    min_step = max(1, int(num_train_timesteps * low))
    if args.inversion_steps is not None:
        if args.inversion_steps < 1:
            raise UserError(f"--inversion_steps {args.inversion_steps} must be at least 1")
        smallest = max(0, min_step - args.ism_delta_t) if args.loss_type == "ism" else min_step
        if args.loss_type == "sdi" and args.inversion_steps > smallest:
            raise UserError(f"--inversion_steps {args.inversion_steps} is larger than the smallest t ({smallest}) it "
                            f"must invert to: use at most {smallest}, or raise the first value of --t_range")
    if args.asd_ratio is not None and not 0.0 <= args.asd_ratio <= 1.0:
        raise UserError(f"--asd_ratio {args.asd_ratio:g} must be in [0, 1], e.g. 0.1")
    if args.sdi_eta is not None and not 0.0 <= args.sdi_eta <= 1.0:
        raise UserError(f"--sdi_eta {args.sdi_eta:g} must be in [0, 1] (0: deterministic inversion, 1: SDS)")
    if args.bridge_start is not None and not 0.0 <= args.bridge_start <= 1.0:
        raise UserError(f"--bridge_start {args.bridge_start:g} must be a fraction of the steps in [0, 1], e.g. 0.5")
    for dest in ("ism_delta_t", "ism_delta_s", "ddim_steps"):
        if getattr(args, dest) is not None and getattr(args, dest) < 1:
            raise UserError(f"--{dest} {getattr(args, dest)} must be at least 1")


def output_name(args: argparse.Namespace) -> str:
    """Return the course's file stem of a run: the prompt (the edit prompt for editing methods), spaces as underscores."""
    return prompt_to_filename(args.edit_prompt if METHODS[args.loss_type].edits else args.prompt)


def encode_then_free_text_encoders(model, prompts) -> None:
    """Encode prompts into a Stable Diffusion model's cache, then free its text encoders (the toy has none)."""
    if prompts and hasattr(model, "free_text_encoders"):
        model.encode_prompts(prompts)
        model.free_text_encoders()


def build_model(args: argparse.Namespace):
    """Return the guidance model that args name (loaded once; run() can reuse it for many prompts)."""
    from guidance import load_model

    if args.model == "toy" and resolve_device(args.device).type == "cpu":
        # The toy's tensors are tiny: extra CPU threads only spin-wait (a 500-step run: 5 s on 1 thread, 25 s on 2).
        torch.set_num_threads(1)
    optional = {} if args.lora_lr is None else {"lora_lr": args.lora_lr}
    for flag in ("no_t5", "cpu_offload", "lora_checkpointing"):  # Stable Diffusion's only
        if getattr(args, flag, False):
            if args.model == "toy":
                raise UserError(f"--{flag} is for Stable Diffusion models, not the toy world: drop it")
            optional[flag] = True
    return load_model(args.model, device=args.device, precision=resolve_precision(args.precision),
                      vsd_lora_timestep=args.vsd_lora_timestep,
                      channels_last=args.channels_last, compile=args.compile, cuda_graphs=args.cuda_graphs,
                      **optional)


def timestep_schedule(model, args: argparse.Namespace):
    """Return the run's TimestepSchedule: args.t_schedule over args.t_range of the model's T timesteps."""
    from guidance.core import TimestepSchedule

    n = model.schedule.num_train_timesteps
    low, high = getattr(args, "t_range", None) or METHODS[args.loss_type].t_range
    min_step, max_step = max(1, int(n * low)), min(n - 1, int(n * high))
    return TimestepSchedule(getattr(args, "t_schedule", None) or "random", min_step, max_step, args.step,
                            int(n * getattr(args, "t_anneal_to", T_ANNEAL_TO)))


@dataclass
class StepInfo:
    """What run() tells its callback after each optimisation step."""

    step: int  # steps done, 1..total
    total: int
    loss: float | None  # this step's loss; None until it is read (on a GPU every LOSS_READ_EVERY steps)
    losses: list  # every loss read so far, losses[i] of step i (run()'s own list: read it, do not change it)
    t: int | None  # the timestep this step's loss used (None for a model that does not record it)
    lr: float  # the learning rate this step's update used
    image: Callable[[], torch.Tensor]  # decodes the current latents on demand: [B, 3, H, W] in [0, 1]


class StopRequested(Exception):
    """Raised inside run() when should_stop() says so: the run ends like Ctrl-C ('interrupted', image kept)."""


@dataclass
class RunResult:
    """What one distillation run produced."""

    status: str  # finished | diverged | interrupted
    image_path: Path | None
    run_dir: Path
    steps_done: int
    losses: list = field(default_factory=list)
    seconds: float = 0.0
    latents: torch.Tensor | None = None  # the final latents, unclamped (the toy world's image itself)


class _ImageWriter:
    """Writes PNGs on a background thread so the optimisation loop never waits for PNG encoding."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = []

    def save(self, images: torch.Tensor, path: Path, compress_level: int = 6) -> None:
        img = torch_to_pil(images.cpu())

        def write():
            buffer = io.BytesIO()
            img.save(buffer, format="PNG", compress_level=compress_level)
            atomic_write_bytes(path, buffer.getvalue())

        self.pending.append(self.pool.submit(write))

    def close(self) -> None:
        for job in self.pending:
            job.result()
        self.pool.shutdown()


def initial_latents(model, args: argparse.Namespace, run_dir: Path):
    """Return (latents to optimise, source latents or None): N(0, I) at the model's size, or the encoded source (edits)."""
    if not METHODS[args.loss_type].edits:
        shape = model.latent_shape(args.num_particles)
        return torch.randn(shape, dtype=torch.float32).to(model.device), None
    source = load_image(args.src_img_path)
    height, width = model.source_size(source.height, source.width)
    if (height, width) != (source.height, source.width):
        source = source.resize((width, height), resample=3)  # bicubic
    save_image_atomic(source, run_dir / "source.png")
    src_latents = model.encode_imgs(pil_to_torch(source).to(model.device))
    return src_latents.clone(), src_latents


def run(model, args: argparse.Namespace, progress: bool = True, init_latents: torch.Tensor | None = None,
        callback: Callable[[StepInfo], None] | None = None, should_stop: Callable[[], bool] | None = None) -> RunResult:
    """Return the result of optimising one image with args.loss_type against a loaded model, writing its files.

    init_latents, if given, replaces the starting latents (e.g. SDS started from a source image's latents).
    callback, if given, gets a StepInfo after every step (StepInfo.image() decodes the current image: call it
    inside the callback, and only as often as needed). should_stop, if given, is asked before every step; when it
    returns True the run ends as Ctrl-C ends it: status 'interrupted', the current image in interrupted.png.
    --log_guidance / --tensorboard (guidance/diagnostics.py) are written from the same loop.

    Files: <save_dir>/<name>.png (the result, written last of the images), and in <save_dir>/<name>/:
    run_config.json (every setting; 'status' becomes 'finished' only after the PNG is written),
    progress/step_NNNNN.png every --log_step steps, loss.csv, source.png (PDS), particles/ (several particles).
    """
    if METHODS[args.loss_type].sampler is not None:
        return run_sampler(model, args, progress)
    save_dir = check_writable_dir(args.save_dir)
    name = output_name(args)
    run_dir = save_dir / name
    final_path = save_dir / f"{name}.png"
    config = {k: v for k, v in vars(args).items()}
    config.update(name=name, final_image=str(final_path), status="running", device=str(model.device),
                  started=time.strftime("%Y-%m-%dT%H:%M:%S"), torch=torch.__version__, command=sys.argv)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json_atomic(config, run_dir / "run_config.json")

    # A reused model starts every run pristine: no LoRA left over from an earlier VSD run.
    model.reset_lora()
    seed_everything(args.seed)
    uncond = model.get_text_embeds(args.negative_prompt)
    text_embeddings = torch.cat([uncond, model.get_text_embeds(args.prompt)])
    latents, src_latents = initial_latents(model, args, run_dir)
    if init_latents is not None:
        latents = init_latents.detach().to(device=model.device, dtype=torch.float32).clone()
    latents.requires_grad_(True)
    # theta -> latents: the generator sits between the optimiser and the losses. Others than 'latent' start from a
    # fit to the image an edit starts from (or init_latents), else from their own initialisation.
    starts_from_image = src_latents is not None or init_latents is not None
    generator = generator_from_args(args, model, latents, latents if starts_from_image else None)
    method = METHODS[args.loss_type]
    edit_embeddings = torch.cat([uncond, model.get_text_embeds(args.edit_prompt)]) if method.edits else None
    timesteps = timestep_schedule(model, args)
    context = StepContext(model, args, text_embeddings, edit_embeddings, src_latents,
                          timesteps.min_step, timesteps.max_step)

    def loss_fn() -> torch.Tensor:
        return method.compute_loss(model, context, latents, timesteps(step), step)

    optimizer = torch.optim.AdamW(generator.param_groups(args.lr), lr=args.lr, weight_decay=0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, WARMUP_STEPS, int(args.step * 1.5))
    writer = _ImageWriter()
    diagnostics = None
    if getattr(args, "log_guidance", False) or getattr(args, "tensorboard", None):
        from guidance.diagnostics import GuidanceLog

        tensorboard = getattr(args, "tensorboard", None)  # one TensorBoard run per method, prompt and seed
        diagnostics = GuidanceLog(run_dir, args.log_step, getattr(args, "log_guidance", False),
                                  Path(tensorboard, args.loss_type, name, f"seed_{args.seed}") if tensorboard else None)
    losses, status, step, started = [], "finished", 0, time.perf_counter()
    unet_rows = UnetRowCounter(model)
    # Reading a loss back (.item()) makes the CPU wait for the GPU to finish the step, so the next step's kernels
    # cannot be queued meanwhile: on a GPU losses are read once per window of steps, and the latents at the start
    # of each window are kept, so that a loss that turns NaN/inf still leaves the last image read as finite.
    read_every = LOSS_READ_EVERY.get(latents.device.type, LOSS_READ_EVERY["default"])
    pending, window_start, window_latents = [], 0, None
    bar = tqdm(range(args.step), desc=f"{args.loss_type} {name[:32]}", disable=not progress, dynamic_ncols=True)
    try:
        for step in bar:
            if should_stop is not None and should_stop():
                raise StopRequested
            if not pending:
                window_start = step
                if read_every > 1:
                    window_latents = generator.state()
            optimizer.zero_grad(set_to_none=True)
            latents = generator.latents(model)
            loss = loss_fn()
            pending.append(loss.detach())
            if len(pending) == read_every or step == args.step - 1:
                values, pending = torch.stack(pending).tolist(), []
                bad = next((i for i, value in enumerate(values) if not math.isfinite(value)), None)
                if bad is not None:
                    losses.extend(values[:bad])
                    status, step = "diverged", window_start + bad
                    if window_latents is not None:  # later steps of the window already took the NaN gradients
                        generator.load_state(window_latents)
                    break
                losses.extend(values)
                bar.set_postfix(loss=f"{values[-1]:.4g}", refresh=False)
            lr = scheduler.get_last_lr()[0]
            if diagnostics is not None:  # before the update: x, x_t, x0_hat and grad of this very step
                diagnostics.after_loss(step, model, latents, losses, lr)
            (LOSS_SCALE * loss).backward()
            optimizer.step()
            scheduler.step()
            if args.log_step and step % args.log_step == 0:
                writer.save(generator.image(model), run_dir / "progress" / f"step_{step:05d}.png",
                            compress_level=1)
            if callback is not None:
                record = getattr(model, "last_guidance", None)
                callback(StepInfo(step + 1, args.step, losses[-1] if len(losses) == step + 1 else None, losses,
                                  int(record["t"]) if record else None, lr,
                                  lambda: generator.image(model)))
        else:
            step = args.step
    except (KeyboardInterrupt, StopRequested):
        status = "interrupted"
        losses.extend(torch.stack(pending).tolist()[:step - len(losses)] if pending else [])
    finally:
        bar.close()
        unet_rows.close()
    if status == "finished" and not generator.finite():
        status = "diverged"

    with torch.no_grad():
        latents = generator.latents(model)  # of the final theta (the loop's are one update behind)
    images = generator.image(model)
    if status == "finished":
        image_path = final_path
    else:
        image_path = run_dir / ("last_finite.png" if status == "diverged" else "interrupted.png")
    writer.save(images, image_path)
    generator.save(image_path.parent, image_path.stem)  # the vector generator's SVG beside the PNG
    if images.shape[0] > 1:
        for i in range(images.shape[0]):
            writer.save(images[i:i + 1], run_dir / "particles" / f"particle_{i}.png")
    writer.close()
    if diagnostics is not None:
        diagnostics.close(losses)
    if getattr(args, "gif", False):
        write_progress_gif(run_dir)
    _write_losses(run_dir / "loss.csv", losses)
    seconds = time.perf_counter() - started
    config.update(status=status, steps_done=step, seconds=round(seconds, 3),
                  finished=time.strftime("%Y-%m-%dT%H:%M:%S"), image=str(image_path),
                  **_result_figures(latents, run_dir, unet_rows.close(), step))
    save_json_atomic(config, run_dir / "run_config.json")
    return RunResult(status, image_path, run_dir, step, losses, seconds, latents.detach())


class UnetRowCounter:
    """Counts the batch rows of every UNet forward while it is open (forward hook); close() returns the count."""

    def __init__(self, model):
        self.rows = 0
        unet = getattr(getattr(model, "unet", None), "_orig_mod", getattr(model, "unet", None))
        self._handle = unet.register_forward_hook(self._count) if isinstance(unet, torch.nn.Module) else None

    def _count(self, module, inputs, output):
        self.rows += int(inputs[0].shape[0]) if inputs else 0

    def close(self) -> int:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return self.rows  # the same count when closed again


def _result_figures(latents: torch.Tensor, run_dir: Path, rows: int, steps: int) -> dict:
    """Return the run's measured figures for run_config.json, after saving its final latents as latents.pt."""
    buffer = io.BytesIO()
    torch.save(latents.detach().float().cpu(), buffer)
    atomic_write_bytes(run_dir / "latents.pt", buffer.getvalue())
    return {"max_abs": float(latents.detach().abs().max()), "unet_rows": rows,
            "unet_rows_per_step": rows / steps if steps else None}


def run_sampler(model, args: argparse.Namespace, progress: bool = True) -> RunResult:
    """Return the result of a sampler method (ddim): the model's own sample of the prompt, written as run() writes."""
    method = METHODS[args.loss_type]
    save_dir = check_writable_dir(args.save_dir)
    name = output_name(args)
    run_dir, final_path = save_dir / name, save_dir / f"{name}.png"
    config = dict(vars(args), name=name, final_image=str(final_path), status="running", device=str(model.device),
                  started=time.strftime("%Y-%m-%dT%H:%M:%S"), torch=torch.__version__, command=sys.argv)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json_atomic(config, run_dir / "run_config.json")
    model.reset_lora()
    seed_everything(args.seed)
    text_embeddings = torch.cat([model.get_text_embeds(args.negative_prompt), model.get_text_embeds(args.prompt)])
    x_T = torch.randn(model.latent_shape(args.num_particles), dtype=torch.float32).to(model.device)
    started, unet_rows = time.perf_counter(), UnetRowCounter(model)
    context = StepContext(model, args, text_embeddings)
    with torch.no_grad():
        latents = method.sampler(model, context, x_T)
    steps = args.ddim_steps
    writer = _ImageWriter()
    images = model.decode_latents(latents)
    writer.save(images, final_path)
    if images.shape[0] > 1:
        for i in range(images.shape[0]):
            writer.save(images[i:i + 1], run_dir / "particles" / f"particle_{i}.png")
    writer.close()
    _write_losses(run_dir / "loss.csv", [])
    seconds = time.perf_counter() - started
    config.update(status="finished", steps_done=steps, seconds=round(seconds, 3),
                  finished=time.strftime("%Y-%m-%dT%H:%M:%S"), image=str(final_path),
                  **_result_figures(latents, run_dir, unet_rows.close(), steps))
    save_json_atomic(config, run_dir / "run_config.json")
    if progress:
        print(f"{args.loss_type}: {steps} DDIM steps in {seconds:.1f} s")
    return RunResult("finished", final_path, run_dir, steps, [], seconds, latents.detach())


def write_progress_gif(run_dir: Path, seconds_per_frame: float = 0.2) -> Path | None:
    """Return the path of <run_dir>/progress.gif, an animation of the run's progress images (None if there are none)."""
    from PIL import Image

    frames = sorted((run_dir / "progress").glob("step_*.png"))
    if not frames:
        return None
    images = [Image.open(f).convert("RGB") for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=int(seconds_per_frame * 1000), loop=0)
    atomic_write_bytes(run_dir / "progress.gif", buffer.getvalue())
    return run_dir / "progress.gif"


def _write_losses(path: Path, losses: list) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["step", "loss"])
    writer.writerows(enumerate(losses))
    atomic_write_bytes(path, buffer.getvalue().encode())


def main(argv=None) -> int:
    """Run main.py; return the exit code (0 finished, 1 diverged, 130 interrupted)."""
    args = parse_args(argv)
    print(f"[*] {args.loss_type.upper()} with {args.model}: guidance {args.guidance_scale}, {args.step} steps, "
          f"seed {args.seed}")
    model = build_model(args)
    from guidance.methods import run_prompts

    encode_then_free_text_encoders(model, run_prompts(args))  # one run: its prompts are all known
    result = run(model, args)
    if result.status == "finished":
        print(f"Saved {result.image_path}")
        return 0
    if result.status == "diverged":
        print(f"error: the loss became NaN/inf at step {result.steps_done}; stopped. The last finite image is "
              f"{result.image_path}. Try a lower --lr or --guidance_scale, or --precision fp32.", file=sys.stderr)
        return 1
    print(f"Interrupted at step {result.steps_done}; the current image is {result.image_path}", file=sys.stderr)
    return 130


if __name__ == "__main__":
    run_cli(main)
