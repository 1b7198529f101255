"""What every benchmark mode shares: the random-weight models, loading as main.py loads, timing (interleaved rounds,
medians), the SDS / PDS / VSD steps and their floors, and peak memory in forked child processes."""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.random_sd import SIZES as RANDOM_MODELS  # noqa: F401 (tiny, mid, sd21, sd15, sdxl, sd35m, ...)


REPO = Path(__file__).resolve().parent.parent
PROMPT, EDIT_PROMPT = "a red circle", "a blue square"
MB = 1e6


def cache_root(cache_dir: str | None) -> Path:
    """Return the folder random-weight models are cached in."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "score-distillation"


def model_source(name: str, cache_dir: str | None) -> str:
    """Return what guidance.load_model takes for a bench model name, building a random-weight folder if needed."""
    if name not in RANDOM_MODELS:
        from guidance.models import world

        return name if world(name) is not None else str(Path(name).expanduser())
    folder = cache_root(cache_dir) / f"random-sd-{name}"
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        log(f"building the random-weight {name!r} model in {folder} (once)")
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        # In a process of its own: building runs OpenMP thread pools, and GNU OpenMP hangs in a process forked
        # (the memory children) after its parent ran one.
        subprocess.run([sys.executable, "-c", "import sys; from benchmarks.random_sd import build_random_sd; "
                        "build_random_sd(sys.argv[1], sys.argv[2])", str(partial), name],
                       check=True, cwd=REPO)
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


def load_for_mode(args: argparse.Namespace):
    """Return the model of a single-purpose mode: --threads set, the bench model built (once) and loaded."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    source = model_source(args.model, args.cache_dir)
    log(f"loading {source} ({args.device}, {args.precision})")
    return load(source, args)


def sync(device) -> None:
    """Wait for the device to finish its queued work (CUDA; nothing on a CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    """Return the wall-clock seconds fn() takes, GPU work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
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
        log(f"round {i + 1}/{warmup + rounds}" + (" (warm-up)" if i < warmup else "") + ": "
             + ", ".join(f"{name} {s[-1]:.3f}s" for name, s in samples.items() if s and i >= warmup))
    return samples


# ----------------------------------------------------------------------------------------- memory
# A loaded model's weight-holding parts (unet: the denoiser, SD 3's transformer too), where it has them.
MODEL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
# On CPU each group is measured in a fresh process, so that no measurement inherits another's leftovers (heap
# the allocator keeps, kernel caches); within a group the step runs after its floor, whose peak it exceeds.
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
                log(f"the process measuring {', '.join(group)} died or hung (out of memory?): not measured")
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
    reset_peak_rss()  # loading peaks above the loaded model's RSS; that is not the steps' doing
    loaded_mb = proc_status_kb("VmRSS") * 1024 / MB
    reply.write("ready\n")
    reply.flush()
    go.readline()
    added, seconds = {}, {}
    for name in group:
        # a fresh process's first step: it pays the one-off costs too, as main.py's does
        seconds[name] = timed(steps[name], model.device)
        added[name] = proc_status_kb("VmHWM") * 1024 / MB - loaded_mb
    reply.write(json.dumps({"loaded_mb": loaded_mb, "added_mb": added, "seconds": seconds}) + "\n")
    reply.flush()


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS."""
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


def proc_status_kb(field: str) -> int:
    """Return a field of /proc/self/status in kB (VmRSS, VmHWM)."""
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


def short_run_result(args: argparse.Namespace, started: float, **figures) -> dict:
    """Return the JSON object of a single-purpose run (--variants, --methods, --memory): where and how it ran, then
    its figures."""
    import torch

    return {"model": args.model, "device": str(args.device), "device_name": device_name(args.device),
            "precision": args.precision, "threads": torch.get_num_threads(), "rounds": args.steps, **figures,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
            "seconds": time.perf_counter() - started}


_STARTED = time.perf_counter()


def log(message: str) -> None:
    """Print a timestamped progress line to stderr."""
    print(f"[bench {time.perf_counter() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)
