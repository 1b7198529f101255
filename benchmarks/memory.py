"""bench.py --memory: one model's weights per part and what one SDS, PDS and VSD step adds, as main.py runs it."""
from __future__ import annotations

import argparse
import time

from benchmarks.common import (MB, MODEL_PARTS, MemoryChildren, cuda_memory, load, log, make_steps, model_source,
                               short_run_result, timed)


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
    log(f"loading {source} ({args.device}, {args.precision})")
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
            log("peak memory: one fresh process per step")
            memory = children.measure()
        finally:
            children.close()
    unet = getattr(model.unet, "_orig_mod", model.unet)
    result = short_run_result(args, started, family=getattr(model, "family", "sd"),
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
