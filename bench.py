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
pipelines of that architecture built from config (guidance/random_sd.py) and cached under --cache_dir: a denoiser's
cost does not depend on its weights. --memory gives one family's memory table (python bench.py --model sdxl --memory).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from guidance.random_sd import SIZES as RANDOM_MODELS  # tiny, mid, sd21, sd15, sdxl, sd35m, ...
# The targets, set for --model mid on a CPU in fp32 (ratio to floor, MB added over the loaded model).
TARGETS = {"sds": {"ratio": 1.05, "added_mb": 250}, "pds": {"ratio": 1.05, "added_mb": 250},
           "vsd": {"ratio": 3.0}, "main_loop": {"ratio": 1.10}}
SD21_FP16_CUDA_MIN_SDS_STEPS_PER_S = 40.0
PROMPT, EDIT_PROMPT = "a red circle", "a blue square"
# name -> (label, floor it is compared with)
FIGURES = {
    "floor_b2": ("bare UNet forward, batch 2", None),
    "floor_b4": ("bare UNet forward, batch 4", None),
    "sds": ("SDS step", "floor_b2"),
    "pds": ("PDS step", "floor_b4"),
    "vsd": ("VSD step (LoRA at fresh t)", "floor_b2"),
    "vsd_shared": ("VSD step (LoRA on shared x_t)", "floor_b2"),
    "lora_forward": ("  VSD part: LoRA forward (no grad)", None),
    "lora_train": ("  VSD part: LoRA training step", None),
    "main_loop_nolog": ("main.py loop, logging off", "floor_b2"),
    "main_loop": ("main.py loop, --log_step {log_step}", "floor_b2"),
}
# Steps whose one-off costs another step's warm-up pays (the same UNet calls at the same shapes): not warmed twice.
WARMED_BY = {"floor_b2": "sds", "floor_b4": "pds", "lora_forward": "vsd", "lora_train": "vsd", "vsd_shared": "vsd"}
MB = 1e6
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


def build_parser() -> argparse.ArgumentParser:
    """Return bench.py's argument parser."""
    p = argparse.ArgumentParser(description="Time and peak memory of SDS / PDS / VSD steps against the bare UNet forward.")
    p.add_argument("--model", default="mid", help=f"{' | '.join(RANDOM_MODELS)} (random weights of that architecture, "
                                                 f"built once and cached) | toy | a diffusers folder (default: mid)")
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
    if args.model not in RANDOM_MODELS + ("toy",) and not Path(args.model).expanduser().is_dir():
        raise UserError(f"unknown model {args.model!r}: use one of {', '.join(RANDOM_MODELS)}, toy, or a diffusers "
                        f"folder")
    modes = [flag for flag in ("variants", "methods", "generators") if getattr(args, flag) is not None]
    if args.memory and (modes or args.no_memory or args.model == "toy"):
        raise UserError(f"--memory is a run of its own: drop {', '.join('--' + m for m in modes) or '--no_memory'}"
                        if modes or args.no_memory else "--memory measures Stable Diffusion models, not the toy world")
    return args


# ----------------------------------------------------------------------------------------- models
def cache_root(cache_dir: str | None) -> Path:
    """Return the folder random-weight models are cached in."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "score-distillation"


def model_source(name: str, cache_dir: str | None) -> str:
    """Return what guidance.load_model takes for a bench model name, building a random-weight folder if needed."""
    if name not in RANDOM_MODELS:
        return name if name == "toy" else str(Path(name).expanduser())
    folder = cache_root(cache_dir) / f"random-sd-{name}"
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        _log(f"building the random-weight {name!r} model in {folder} (once)")
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        # In a process of its own: building runs OpenMP thread pools, and GNU OpenMP hangs in a process forked
        # (the memory children) after its parent ran one.
        subprocess.run([sys.executable, "-c", "import sys; from guidance.random_sd import build_random_sd; "
                        "build_random_sd(sys.argv[1], sys.argv[2])", str(partial), name],
                       check=True, cwd=Path(__file__).resolve().parent)
        try:
            partial.rename(folder)  # atomic: a concurrent build or an interrupted one never leaves half a model
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
    return str(folder)


def load(source: str, args: argparse.Namespace):
    """Return the guidance model for source, as main.py would load it with the same flags."""
    from guidance import load_model
    from utils import resolve_precision

    optional = {"lora_checkpointing": True} if getattr(args, "lora_checkpointing", False) else {}
    return load_model(source, device=args.device, precision=resolve_precision(args.precision),
                      channels_last=args.channels_last, compile=args.compile, cuda_graphs=args.cuda_graphs, **optional)


# ----------------------------------------------------------------------------------------- timing
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    """Return the wall-clock seconds fn() takes, GPU work included."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def make_steps(model, vsd_model) -> dict:
    """Return name -> callable for each floor and each step, in the order a round runs them.

    Steps use main.py's guidance scales and loss scale; vsd_model is a second instance so that the LoRA VSD
    adds never touches the UNet the other steps and floors run.
    """
    import torch

    from guidance.loop import LOSS_SCALE
    from guidance.methods import METHODS

    uncond = model.get_text_embeds("low quality")
    text_embeddings = torch.cat([uncond, model.get_text_embeds(PROMPT)])
    edit_embeddings = torch.cat([uncond, model.get_text_embeds(EDIT_PROMPT)])
    vsd_embeddings = torch.cat([vsd_model.get_text_embeds("low quality"), vsd_model.get_text_embeds(PROMPT)])
    shape, device = model.latent_shape(1), model.device
    source = torch.randn(shape, device=device)
    floor_inputs = {b: (torch.randn(model.latent_shape(b), device=device), text_embeddings.repeat_interleave(b // 2, 0))
                    for b in (2, 4)}

    def floor(batch: int):
        x, embeddings = floor_inputs[batch]

        def run():
            with torch.no_grad():
                model.predict_eps(x, model.sample_timestep(), embeddings)
        return run

    def step(loss_fn, before=None):
        # A small lr keeps the latents in range however many steps the bench takes; cost does not depend on it.
        latents = torch.randn(shape, device=device).requires_grad_(True)
        optimizer = torch.optim.AdamW([latents], lr=1e-3, weight_decay=0)

        def run():
            if before:
                before()
            optimizer.zero_grad(set_to_none=True)
            (LOSS_SCALE * loss_fn(latents)).backward()
            optimizer.step()
        return run

    vsd_cond = vsd_embeddings.chunk(2)[1]
    lora_latents = torch.randn(shape, device=device)

    def lora_forward():
        vsd_model.enable_lora()
        with torch.no_grad():
            vsd_model.predict_eps(lora_latents, vsd_model.sample_timestep(), vsd_cond)

    def lora_timestep(mode):
        return lambda: setattr(vsd_model, "vsd_lora_timestep", mode)

    scale = {name: m.guidance_scale for name, m in METHODS.items()}
    return {
        "floor_b2": floor(2),
        "sds": step(lambda x: model.get_sds_loss(x, text_embeddings, guidance_scale=scale["sds"])),
        "floor_b4": floor(4),
        "pds": step(lambda x: model.get_pds_loss(source, x, text_embeddings, edit_embeddings,
                                                 guidance_scale=scale["pds"])),
        "vsd": step(lambda x: vsd_model.get_vsd_loss(x, vsd_embeddings, guidance_scale=scale["vsd"]),
                    before=lora_timestep("fresh")),
        "vsd_shared": step(lambda x: vsd_model.get_vsd_loss(x, vsd_embeddings, guidance_scale=scale["vsd"]),
                           before=lora_timestep("shared")),
        # VSD's own UNet work besides its batch-2 floor: the LoRA's forward at the particles' x_t, and its
        # training step at a fresh t (forward with autograd, backward, AdamW), each alone.
        "lora_forward": lora_forward,
        "lora_train": lambda: vsd_model.train_lora(lora_latents, vsd_cond),
    }


def time_rounds(steps: dict, rounds: int, warmup: int, device) -> dict:
    """Return name -> list of seconds, from `rounds` rounds that each run every step once (after `warmup` rounds)."""
    samples = {name: [] for name in steps}
    for i in range(warmup + rounds):
        for name, fn in steps.items():
            seconds = timed(fn, device)
            if i >= warmup:
                samples[name].append(seconds)
        _log(f"round {i + 1}/{warmup + rounds}" + (" (warm-up)" if i < warmup else "") + ": "
             + ", ".join(f"{name} {s[-1]:.3f}s" for name, s in samples.items() if s and i >= warmup))
    return samples


class _LoopTimer:
    """Stands in for the model inside main.run: times the loop's steps, with a bare forward before each.

    Before every loss it times `floor`, kept out of the loop's time: a step runs from the start of its loss
    (after its floor) to the start of the next floor; the last one ends where main.run decodes the final image.
    """

    def __init__(self, model, floor, device):
        self._model, self._floor, self._device = model, floor, device
        self.floors, self.step_starts, self.step_ends, self.last_decode = [], [], [], None
        self.loop_start = None

    def __getattr__(self, name):
        return getattr(self._model, name)

    def _before_step(self):
        if self._floor is None:  # whole-loop timing: no sync, no floor, only the time the first loss starts
            if self.loop_start is None:
                _sync(self._device)
                self.loop_start = time.perf_counter()
            self.step_starts.append(None)
            return
        _sync(self._device)
        if self.step_starts:
            self.step_ends.append(time.perf_counter())
        self.floors.append(timed(self._floor, self._device))
        self.step_starts.append(time.perf_counter())

    def get_sds_loss(self, *args, **kwargs):
        self._before_step()
        return self._model.get_sds_loss(*args, **kwargs)

    def decode_latents(self, latents):
        _sync(self._device)
        self.last_decode = time.perf_counter()
        return self._model.decode_latents(latents)

    def step_seconds(self) -> list:
        """Return the seconds of each loop step."""
        return [end - start for start, end in zip(self.step_starts, self.step_ends + [self.last_decode])]


def time_main_loop(model, floor, source: str, args: argparse.Namespace, log_step: int, n_steps: int) -> dict:
    """Return {'time_s' (CUDA only), 'floor_s', 'steps', 'samples_s', 'floor_samples_s'} for main.run's SDS loop
    over n_steps with the given --log_step.

    CPU: samples_s holds each step's seconds, floor_samples_s the floor timed before each; floor_s is their
    median. split_loop turns them into figures.
    CUDA: a GPU is not shared, and syncing around each step would hide what the loop does (queue the next step
    while the GPU runs this one), so the loop runs undisturbed for a whole number of --log_step periods and
    time_s is its wall time from the first loss to the final decode over its steps; floor_s is then given by the
    caller, as floor (a number of seconds).
    """
    from guidance.config import RunConfig
    from guidance.loop import run

    if args.device.type == "cuda":
        floor_s, floor = floor, None
        n_steps = max(n_steps, 2 * log_step) // max(log_step, 1) * max(log_step, 1) if log_step else n_steps

    with tempfile.TemporaryDirectory(prefix="bench-main-") as save_dir:
        run_config = RunConfig(prompt=PROMPT, loss_type="sds", model=source, step=n_steps, log_step=log_step,
                               save_dir=save_dir, device=str(args.device), precision=args.precision).resolved()
        timer = _LoopTimer(model, floor, args.device)
        result = run(timer, run_config, progress=False)
    if result.status != "finished" or len(timer.step_starts) != n_steps or timer.last_decode is None:
        raise RuntimeError(f"main.run stopped early ({result.status}) after {result.steps_done} of {n_steps} steps")
    if floor is None:
        _sync(args.device)
        total = timer.last_decode - timer.loop_start
        return {"time_s": total / n_steps, "floor_s": floor_s, "steps": n_steps, "samples_s": [total],
                "floor_samples_s": []}
    return {"floor_s": statistics.median(timer.floors), "steps": n_steps, "samples_s": timer.step_seconds(),
            "floor_samples_s": timer.floors}


def split_loop(run: dict, log_step: int) -> dict:
    """Return {'main_loop_nolog', 'main_loop'} from one CPU run of main.py's loop at --log_step (time_main_loop);
    without 'main_loop_nolog' when every step logged (--log_step 1).

    Medians, so that a burst of load does not decide. A step without logging runs the very code of a run with
    logging off, so 'main_loop_nolog' is the median of the steps that did not log (main.run logs every --log_step
    steps and the last one); 'main_loop' adds what a logging step takes beyond it, spread over the --log_step steps it serves (logging counts in full even when
    the run is shorter than --log_step).
    """
    steps = run["samples_s"]
    logged = [i for i in range(len(steps)) if log_step and (i % log_step == 0 or i == len(steps) - 1)]
    plain = [s for i, s in enumerate(steps) if i not in logged]
    common = {"floor_s": run["floor_s"], "floor_samples_s": run["floor_samples_s"]}
    if not plain:
        return {"main_loop": {**common, "time_s": statistics.median(steps), "steps": len(steps), "samples_s": steps}}
    typical = statistics.median(plain)
    extra = statistics.fmean(steps[i] - typical for i in logged) / log_step if logged else 0.0
    return {"main_loop_nolog": {**common, "time_s": typical, "steps": len(plain), "samples_s": plain},
            "main_loop": {**common, "time_s": typical + extra, "steps": len(steps), "samples_s": steps}}


# ----------------------------------------------------------------------------------------- memory
# On CPU each group is measured in a fresh process, so that no measurement inherits another's leftovers (heap
# the allocator keeps, kernel caches); within a group the step runs after its floor, whose peak it exceeds.
# A loaded model's weight-holding parts (unet: the denoiser, SD 3's transformer too), where it has them.
MODEL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
MEMORY_GROUPS = (("floor_b2", "sds"), ("floor_b4", "pds"), ("vsd",), ("vsd_shared",))
MEMORY_TIMEOUT_S = 1800


def cuda_memory(steps: dict, device, baseline_mb: float, loaded_mb: float) -> dict:
    """Return {'added_mb': name -> peak MB above baseline_mb} for one call of each step (CUDA, after warm-up).

    baseline_mb is what the bench's loaded models hold, loaded_mb what one of them holds.
    """
    import torch

    added = {}
    for name, fn in steps.items():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        added[name] = torch.cuda.max_memory_allocated(device) / MB - baseline_mb
    return {"method": "torch.cuda.max_memory_allocated", "loaded_mb": loaded_mb, "added_mb": added}


class MemoryChildren:
    """One child process per memory group, forked from this one right after it loaded the model, so that they share
    its loaded weights without loading again. They wait, idle, until the timed rounds are over, then measure one
    group after another.

    Fork before this process has used more than one thread: GNU OpenMP hangs in a child forked after its parent
    ran a thread pool. Each child restores the thread count.
    """

    def __init__(self, model, threads: int, groups: tuple = MEMORY_GROUPS, free_text_encoders: bool = False,
                 tolerate_failures: bool = False):
        import traceback

        self.children = {}
        self.groups = groups
        self.tolerate_failures = tolerate_failures  # a group whose process dies (out of memory) gets None figures
        for group in groups:
            go_read, go_write = os.pipe()
            reply_read, reply_write = os.pipe()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    ctypes.CDLL("libc.so.6").prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL: die with the parent
                    os.dup2(2, 1)  # stdout is the parent's (its JSON): a child writes nowhere but stderr
                    for _, other_go, other_reply in self.children.values():  # its siblings' pipes are not its own
                        other_go.close()
                        os.close(other_reply)
                    os.close(go_write)
                    os.close(reply_read)
                    _memory_child(model, threads, group, os.fdopen(go_read), os.fdopen(reply_write, "w"),
                                  free_text_encoders)
                    code = 0
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(code)  # no atexit handlers, no flushing of the parent's buffers
            os.close(go_read)
            os.close(reply_write)
            self.children[group] = (pid, os.fdopen(go_write, "w"), reply_read)
        self.failed = set()

    def wait_ready(self) -> None:
        """Return once every child has loaded what it measures with (so that none is busy while the parent times)."""
        for group, (_, _, reply) in self.children.items():
            if _read_line(reply, MEMORY_TIMEOUT_S) != "ready":
                self.failed.add(group)

    def measure(self) -> dict:
        """Return {'method', 'loaded_mb', 'added_mb': name -> MB} measured by the children, one after another (side
        by side, their thread pools would spin against each other: 45 s instead of 19 on 'mid')."""
        added, seconds, loaded = {}, {}, None
        for group in self.groups:
            _, go, reply = self.children[group]
            answer = None
            if group not in self.failed:
                go.write("go\n")
                go.flush()
                answer = _read_line(reply, MEMORY_TIMEOUT_S)
            self.close([group])
            if not answer and self.tolerate_failures:
                _log(f"the process measuring {', '.join(group)} died or hung (out of memory?): not measured")
                added.update(dict.fromkeys(group))
                seconds.update(dict.fromkeys(group))
                continue
            if not answer:
                self.close()
                raise RuntimeError(f"the process measuring the memory of {', '.join(group)} died or hung "
                                   f"(any traceback is above)")
            answer = json.loads(answer)
            added.update(answer["added_mb"])
            seconds.update(answer["seconds"])
            loaded = answer["loaded_mb"] if loaded is None else loaded
        return {"method": "peak RSS (VmHWM) of a fresh process per group, minus its RSS once loaded",
                "loaded_mb": loaded, "added_mb": added, "first_step_s": seconds}

    def close(self, groups=None) -> None:
        """Kill and reap the children of groups (default: all that are left)."""
        import signal

        for group in list(self.children if groups is None else groups):
            pid, go, reply = self.children.pop(group)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            with contextlib.suppress(OSError):
                go.close()
            os.close(reply)


def _read_line(fd: int, timeout: float) -> str | None:
    """Return the next line written to fd, stripped; None if the writer closed it or timeout seconds passed."""
    import select

    data, deadline = b"", time.monotonic() + timeout
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 1) if ready else b""
        if not chunk:
            return None
        data += chunk
    return data.decode().strip()


def _memory_child(model, threads: int, group: tuple, go, reply, free_text_encoders: bool = False) -> None:
    import torch

    torch.set_num_threads(threads)
    steps = make_steps(model, model)
    if free_text_encoders:  # as main.py and run_all.py do once every prompt is encoded
        model.free_text_encoders()
    libc = ctypes.CDLL("libc.so.6")
    _touch_weights(model)
    gc.collect()
    libc.malloc_trim(0)
    _reset_peak_rss()  # loading peaks above the loaded model's RSS; that is not the steps' doing
    loaded_mb = _proc_status_kb("VmRSS") * 1024 / MB
    reply.write("ready\n")
    reply.flush()
    go.readline()
    added, seconds = {}, {}
    for name in group:
        # a fresh process's first step: it pays the one-off costs too, as main.py's does
        seconds[name] = timed(steps[name], model.device)
        added[name] = _proc_status_kb("VmHWM") * 1024 / MB - loaded_mb
    reply.write(json.dumps({"loaded_mb": loaded_mb, "added_mb": added, "seconds": seconds}) + "\n")
    reply.flush()


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)


def _touch_weights(model) -> None:
    """Read every weight once: safetensors are memory-mapped, so a weight counts in the RSS only once read."""
    import torch

    with torch.no_grad():
        for attr in MODEL_PARTS:
            module = getattr(model, attr, None)
            if isinstance(module, torch.nn.Module):
                for tensor in module.state_dict().values():
                    tensor.sum()


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


# ----------------------------------------------------------------------------------------- report
def device_name(device) -> str:
    """Return the GPU's name, or the CPU's model name and core count."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} cores"


def summarise(samples: dict, loops: dict, memory: dict | None, context: dict) -> dict:
    """Return the benchmark's JSON object: every figure with its floor, ratio and memory, and the targets."""
    figures = {}
    for name, seconds in samples.items():
        figures[name] = {"time_s": statistics.median(seconds), "samples_s": seconds}
        floor = FIGURES[name][1]
        if floor is not None:
            # Per round, the step over the floor timed in the same round: load that drifts cancels out.
            figures[name]["ratio"] = statistics.median(s / f for s, f in zip(seconds, samples[floor]))
    if "lora_train" in samples:
        # VSD over the sum of its parts, round by round: what the step adds beyond the UNet work it must do.
        parts = [b2 + fwd + train for b2, fwd, train in zip(samples["floor_b2"], samples["lora_forward"],
                                                             samples["lora_train"])]
        figures["vsd"]["parts_s"] = statistics.median(parts)
        figures["vsd"]["parts_floor_ratio"] = statistics.median(p / f for p, f in zip(parts, samples["floor_b2"]))
        figures["vsd"]["ratio_to_parts"] = statistics.median(v / p for v, p in zip(samples["vsd"], parts))
    for name, loop in loops.items():
        figures[name] = {"time_s": loop["time_s"], "samples_s": loop["samples_s"], "steps": loop["steps"],
                         "floor_samples_s": loop["floor_samples_s"]}
    for name, figure in figures.items():
        label, floor = FIGURES[name]
        figure["label"] = label.format(log_step=context["log_step"])
        figure["steps_per_s"] = 1.0 / figure["time_s"]
        if floor is not None:
            figure["floor"] = floor
            figure["floor_s"] = loops[name]["floor_s"] if name in loops else figures[floor]["time_s"]
            figure.setdefault("ratio", figure["time_s"] / figure["floor_s"])
        if memory is not None and name in memory["added_mb"]:
            figure["peak_added_mb"] = memory["added_mb"][name]
    targets = {}
    for name, target in TARGETS.items():
        if name in figures:
            targets[f"{name}_ratio"] = _target(figures[name]["ratio"], target["ratio"], "max")
            if "added_mb" in target and "peak_added_mb" in figures[name]:
                targets[f"{name}_added_mb"] = _target(figures[name]["peak_added_mb"], target["added_mb"], "max")
    if (context["model"], context["device"].split(":")[0], context["precision"]) == ("sd21", "cuda", "fp16"):
        targets["sds_steps_per_s"] = _target(figures["sds"]["steps_per_s"], SD21_FP16_CUDA_MIN_SDS_STEPS_PER_S, "min")
    result = dict(context)
    result["memory"] = None if memory is None else {"method": memory["method"], "loaded_mb": memory["loaded_mb"]}
    result["figures"] = figures
    result["targets"] = targets
    return result


def _target(value: float, limit: float, kind: str) -> dict:
    return {"value": value, kind: limit, "met": value <= limit if kind == "max" else value >= limit}


def format_table(result: dict) -> str:
    """Return the human-readable table of a benchmark result."""
    head = (f"{result['model']} (UNet {result['unet_params'] / 1e6:.1f} M params, latents {result['latent_shape']}) on "
            f"{result['device']} ({result['device_name']}, {result['threads']} threads), {result['precision']}"
            f"{', compiled' if result['compile'] else ''}{', channels_last' if result['channels_last'] else ''}"
            f"{', CUDA graphs' if result.get('cuda_graphs') else ''}; "
            f"median of {result['rounds']} rounds after {result['warmup']} warm-up; {result['date']}, load average "
            f"{result['load_average_start_end'][0]:.1f} at the start, {result['load_average_start_end'][1]:.1f} at the end")
    lines = [head, f"{'':34s} {'time s':>9s} {'steps/s':>8s} {'x floor':>8s} {'target':>7s} {'peak +MB':>9s} {'target':>7s}"]
    targets = result["targets"]
    for name, figure in result["figures"].items():
        ratio = f"{figure['ratio']:.3f}" if "ratio" in figure else ""
        mem = f"{figure['peak_added_mb']:.0f}" if "peak_added_mb" in figure else "-"
        ratio_target = targets.get(f"{name}_ratio")
        mem_target = targets.get(f"{name}_added_mb")
        lines.append(f"{figure['label']:34s} {figure['time_s']:9.4f} {figure['steps_per_s']:8.2f} {ratio:>8s} "
                     f"{_mark(ratio_target, '<=')} {mem:>9s} {_mark(mem_target, '<=')}")
    vsd = result["figures"].get("vsd", {})
    if "parts_s" in vsd:
        lines.append(f"VSD's UNet work (batch-2 floor + LoRA forward + LoRA training step): {vsd['parts_s']:.4f} s = "
                     f"{vsd['parts_floor_ratio']:.3f} x floor; the VSD step is {vsd['ratio_to_parts']:.3f} x its parts")
    if "sds_steps_per_s" in targets:
        t = targets["sds_steps_per_s"]
        lines.append(f"SDS steps/s {t['value']:.1f} (target >= {t['min']:.0f}): {'met' if t['met'] else 'MISSED'}")
    if result["memory"]:
        lines.append(f"memory: {result['memory']['method']}; the loaded model holds {result['memory']['loaded_mb']:.0f} MB")
    lines.append(f"bench took {result['seconds']:.0f} s")
    return "\n".join(lines)


def _mark(target: dict | None, sign: str) -> str:
    if target is None:
        return f"{'':>7s}"
    limit = target.get("max", target.get("min"))
    return f"{sign}{limit:g}{'' if target['met'] else '!'}".rjust(7)


_STARTED = time.perf_counter()


def _log(message: str) -> None:
    print(f"[bench {time.perf_counter() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- main
def run_benchmark(args: argparse.Namespace) -> dict:
    """Return the benchmark result (see summarise) for parsed arguments."""
    import torch

    started, load_start = time.perf_counter(), os.getloadavg()[0]
    threads = args.threads or torch.get_num_threads()
    source = model_source(args.model, args.cache_dir)
    cuda = args.device.type == "cuda"
    children = None
    try:
        _log(f"loading {source} twice ({args.device}, {args.precision})")
        if not cuda and not args.no_memory:
            torch.set_num_threads(1)  # no OpenMP thread pool before the memory children are forked
        model = load(source, args)
        if not cuda and not args.no_memory:
            children = MemoryChildren(model, threads)
        torch.set_num_threads(threads)
        loaded_mb = torch.cuda.memory_allocated(args.device) / MB if cuda else None
        vsd_model = load(source, args)
        steps = make_steps(model, vsd_model)
        baseline_mb = torch.cuda.memory_allocated(args.device) / MB if cuda else None

        # Warm-up pays the one-off costs (kernel selection, compilation, the LoRA's creation) before timing.
        time_rounds({name: fn for name, fn in steps.items() if name not in WARMED_BY}, 0, args.warmup, args.device)
        if children is not None:  # they got ready while we warmed up (untimed); now they wait, idle, until the end
            children.wait_ready()
        memory = None
        if args.device.type == "cuda" and not args.no_memory:
            memory = cuda_memory(steps, args.device, baseline_mb, loaded_mb)
        samples = time_rounds(steps, args.steps, 0, args.device)
        loops = {}
        if cuda:  # each loop undisturbed, as a whole
            for name, every in (("main_loop_nolog", 0), ("main_loop", args.log_step)):
                _log(f"main.run: SDS steps, --log_step {every}")
                loops[name] = time_main_loop(model, statistics.median(samples["floor_b2"]), source, args, every,
                                             args.steps + 1)
        else:  # one run: its steps that log and those that do not give both figures
            for every in (args.log_step, 0):
                _log(f"main.run: {args.steps + 1} SDS steps, --log_step {every}, a bare forward before each")
                run = time_main_loop(model, steps["floor_b2"], source, args, every, args.steps + 1)
                loops = {**split_loop(run, every), **loops}
                if "main_loop_nolog" in loops:
                    break
        if children is not None:
            _log("peak memory: one fresh process per group")
            memory = children.measure()
    finally:
        if children is not None:
            children.close()
    if memory is not None:
        _log("peak MB added: " + ", ".join(f"{k} {v:.0f}" for k, v in memory["added_mb"].items()))

    unet = getattr(model.unet, "_orig_mod", model.unet)
    context = {
        "model": args.model, "source": source, "device": str(args.device), "device_name": device_name(args.device),
        "precision": args.precision, "compile": args.compile,
        "channels_last": getattr(model, "channels_last", False),
        "cuda_graphs": getattr(model, "graphs", None) is not None,
        "threads": torch.get_num_threads(), "rounds": args.steps, "warmup": args.warmup, "log_step": args.log_step,
        "unet_params": sum(p.numel() for p in unet.parameters()), "latent_shape": list(model.latent_shape(1)),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average_start_end": [load_start, os.getloadavg()[0]],
    }
    result = summarise(samples, loops, memory, context)
    result["seconds"] = time.perf_counter() - started
    return result


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
        _log(f"loading variant {name}")
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
            _log(f"variant {name} failed: {errors[name]}")
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
    return _short_run_result(args, started, reference=reference, variants=variants)


def _short_run_result(args: argparse.Namespace, started: float, **figures) -> dict:
    """Return the JSON object of a --variants or --methods run: where and how it ran, then its figures."""
    import torch

    return {"model": args.model, "device": str(args.device), "device_name": device_name(args.device),
            "precision": args.precision, "threads": torch.get_num_threads(), "rounds": args.steps, **figures,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
            "seconds": time.perf_counter() - started}


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
    import torch

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    source = model_source(args.model, args.cache_dir)
    _log(f"loading {source} ({args.device}, {args.precision})")
    model = load(source, args)
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
    return _short_run_result(args, started, warmup=args.warmup, methods=methods)


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
    if args.threads:
        torch.set_num_threads(args.threads)
    source = model_source(args.model, args.cache_dir)
    _log(f"loading {source} ({args.device}, {args.precision})")
    model = load(source, args)
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
    import subprocess

    code = (f"import gc, types, torch, bench\n"
            f"from guidance.generators import build_generator\n"
            f"torch.set_num_threads({threads})\n"
            f"model = types.SimpleNamespace(device=torch.device('cpu'), resolution={size})\n"
            f"gen = build_generator({name!r}, model, 1, num_shapes={num_shapes})\n"
            f"gc.collect(); bench._reset_peak_rss(); before = bench._proc_status_kb('VmRSS')\n"
            f"gen.render().mean().backward()\n"
            f"print((bench._proc_status_kb('VmHWM') - before) * 1024 / bench.MB)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent, capture_output=True,
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


MEMORY_STEPS = ("sds", "pds", "vsd")


def weights_mb(model) -> dict:
    """Return MB of parameters and buffers per loaded part (unet: the denoiser, SD 3's transformer too)."""
    import torch

    parts = {}
    for attr in MODEL_PARTS:
        module = getattr(model, attr, None)
        if isinstance(module, torch.nn.Module):
            tensors = list(module.parameters()) + list(module.buffers())
            parts[attr] = sum(t.numel() * t.element_size() for t in tensors) / MB
    return parts


def run_memory(args: argparse.Namespace) -> dict:
    """Return {'weights_mb', 'memory'}: a model's weights per part, and what one SDS, PDS and VSD step adds above the
    model left once main.py has encoded its prompts and freed the text encoders (and each such step's seconds).

    CPU: one fresh process per step, forked after loading (peak RSS); CUDA: max_memory_allocated over one step after
    a warm-up step, and the peak of the whole run (loading included).
    """
    import torch

    started = time.perf_counter()
    threads = args.threads or torch.get_num_threads()
    source = model_source(args.model, args.cache_dir)
    _log(f"loading {source} ({args.device}, {args.precision})")
    cuda = args.device.type == "cuda"
    if not cuda:
        torch.set_num_threads(1)  # no OpenMP thread pool before the children are forked
    model = load(source, args)
    parts = weights_mb(model)
    if cuda:
        steps = make_steps(model, model)
        model.free_text_encoders()
        torch.cuda.empty_cache()
        for name in MEMORY_STEPS:  # the first step pays one-off costs (the LoRA's creation, kernel selection)
            steps[name]()
        baseline = torch.cuda.memory_allocated(args.device) / MB
        first = {name: timed(steps[name], args.device) for name in MEMORY_STEPS}
        memory = cuda_memory({name: steps[name] for name in MEMORY_STEPS}, args.device, baseline, baseline)
        memory.update(first_step_s=first, run_peak_mb=torch.cuda.max_memory_allocated(args.device) / MB)
    else:
        children = MemoryChildren(model, threads, tuple((name,) for name in MEMORY_STEPS), free_text_encoders=True,
                                  tolerate_failures=True)
        torch.set_num_threads(threads)
        try:
            children.wait_ready()
            _log("peak memory: one fresh process per step")
            memory = children.measure()
        finally:
            children.close()
    unet = getattr(model.unet, "_orig_mod", model.unet)
    result = _short_run_result(args, started, family=getattr(model, "family", "sd"),
                               unet_params=sum(p.numel() for p in unet.parameters()),
                               latent_shape=list(model.latent_shape(1)), weights_mb=parts, memory=memory,
                               lora_checkpointing=bool(getattr(model, "lora_checkpointing", False)))
    result["rounds"] = 1
    return result


def format_memory(result: dict) -> str:
    """Return the human-readable table of a --memory result."""
    memory, parts = result["memory"], result["weights_mb"]
    lines = [f"{result['model']} ({result['family']}{', LoRA checkpointing' if result.get('lora_checkpointing') else ''}, denoiser {result['unet_params'] / 1e9:.2f} B params, latents "
             f"{result['latent_shape']}) on {result['device']} ({result['device_name']}, {result['threads']} threads), "
             f"{result['precision']}; {result['date']}",
             "weights MB: " + ", ".join(f"{name} {mb:.0f}" for name, mb in parts.items())
             + f"; all {sum(parts.values()):.0f}",
             f"once the text encoders are freed the process holds {memory['loaded_mb']:.0f} MB"
             + (" (its RSS: the torch runtime included)" if result["device"] == "cpu" else "")
             + f"; peak +MB: {memory['method']}",
             f"{'':10s} {'peak +MB':>9s} {'peak MB':>9s} {'first step s':>13s}"]
    for name in MEMORY_STEPS:
        added = memory["added_mb"][name]
        if added is None:
            lines.append(f"{name:10s} its process died or hung (out of memory?): not measured")
            continue
        lines.append(f"{name:10s} {added:9.0f} {memory['loaded_mb'] + added:9.0f} {memory['first_step_s'][name]:13.2f}")
    if "run_peak_mb" in memory:
        lines.append(f"peak of the whole run (loading, encoding, every step): {memory['run_peak_mb']:.0f} MB")
    lines.append(f"bench took {result['seconds']:.0f} s")
    return "\n".join(lines)


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


def main(argv=None) -> int:
    """Run the benchmark; print the table (and with --json one JSON object on stdout). Return the exit code."""
    args = parse_args(argv)
    if args.model == "toy":
        try:
            import guidance.toy  # noqa: F401
        except Exception as err:  # the toy world is optional: report and skip
            print(f"bench: skipped --model toy: guidance.toy does not import ({err.__class__.__name__}: {err})",
                  file=sys.stderr)
            return 0
    if args.memory:
        result = run_memory(args)
        table = format_memory(result)
    elif args.variants:
        result = run_variants(args)
        table = format_variants(result)
    elif args.methods is not None:
        result = run_methods(args)
        table = format_methods(result)
    elif args.generators is not None:
        result = run_generators(args)
        table = format_generators(result)
    else:
        result = run_benchmark(args)
        table = format_table(result)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(result, indent=1))
    else:
        print(table)
    return 0


if __name__ == "__main__":
    from utils import run_cli

    run_cli(main)
