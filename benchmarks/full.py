"""The full benchmark (python bench.py): the SDS, PDS and VSD steps and main.py's loop, each against its floor, with
their peak memory."""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from benchmarks.common import (MB, PROMPT, MemoryChildren, cuda_memory, device_name, load, log, make_steps,
                               model_source, sync, time_rounds, timed)

# The targets, set for --model mid on a CPU in fp32 (ratio to floor, MB added over the loaded model).
TARGETS = {"sds": {"ratio": 1.05, "added_mb": 250}, "pds": {"ratio": 1.05, "added_mb": 250},
           "vsd": {"ratio": 3.0}, "main_loop": {"ratio": 1.10}}

SD21_FP16_CUDA_MIN_SDS_STEPS_PER_S = 40.0

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
                sync(self._device)
                self.loop_start = time.perf_counter()
            self.step_starts.append(None)
            return
        sync(self._device)
        if self.step_starts:
            self.step_ends.append(time.perf_counter())
        self.floors.append(timed(self._floor, self._device))
        self.step_starts.append(time.perf_counter())

    def get_sds_loss(self, *args, **kwargs):
        self._before_step()
        return self._model.get_sds_loss(*args, **kwargs)

    def decode_latents(self, latents):
        sync(self._device)
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
        sync(args.device)
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


def run_benchmark(args: argparse.Namespace) -> dict:
    """Return the benchmark result (see summarise) for parsed arguments."""
    import torch

    started, load_start = time.perf_counter(), os.getloadavg()[0]
    threads = args.threads or torch.get_num_threads()
    source = model_source(args.model, args.cache_dir)
    cuda = args.device.type == "cuda"
    children = None
    try:
        log(f"loading {source} twice ({args.device}, {args.precision})")
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
                log(f"main.run: SDS steps, --log_step {every}")
                loops[name] = time_main_loop(model, statistics.median(samples["floor_b2"]), source, args, every,
                                             args.steps + 1)
        else:  # one run: its steps that log and those that do not give both figures
            for every in (args.log_step, 0):
                log(f"main.run: {args.steps + 1} SDS steps, --log_step {every}, a bare forward before each")
                run = time_main_loop(model, steps["floor_b2"], source, args, every, args.steps + 1)
                loops = {**split_loop(run, every), **loops}
                if "main_loop_nolog" in loops:
                    break
        if children is not None:
            log("peak memory: one fresh process per group")
            memory = children.measure()
    finally:
        if children is not None:
            children.close()
    if memory is not None:
        log("peak MB added: " + ", ".join(f"{k} {v:.0f}" for k, v in memory["added_mb"].items()))

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
