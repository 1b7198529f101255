"""CUDA graphs for the UNet and the VAE decoder: capture a call once per input shape, then replay it with one launch.

At Stable Diffusion's size a UNet forward is ~1500 small kernels; on a fast GPU the CPU cannot launch them
as fast as the GPU runs them (on an H100 a batch-4 forward takes no longer than a batch-2 one), so a
distillation step is bound by Python and kernel launches. A CUDA graph records the kernels once and replays
them from the GPU's side. Two things are graphed:

- calls under no_grad: the UNet forward (SDS, PDS, VSD's pretrained pass and its LoRA pass at a fresh t), one
  graph per (input shapes, dtype, LoRA adapters on or off), and the VAE decoder (main.py's progress images);
- VSD's LoRA training step (guidance/core.py's _lora_step, the same function that runs eagerly): forward with
  autograd, the LoRA's denoising loss on the model's native output, backward and the AdamW step (which must be
  created with capturable=True), one graph per input shape.

A graph reads its inputs from fixed buffers and the weights from their storage, so each call copies its
inputs in, and in-place weight updates (the LoRA's AdamW) are seen by later replays. Anything that replaces
modules or parameter storage (adding or removing the LoRA, .to(), loading weights) must call clear().
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

WARMUP_CALLS = 2  # eager calls on a side stream before capture, as CUDA graph capture requires


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple  # the static buffers each call copies its inputs into
    outputs: tuple  # the static tensors each replay writes


def _key(*tensors: torch.Tensor) -> tuple:
    return tuple((tuple(x.shape), x.dtype, x.device) for x in tensors)


class CudaGraphs:
    """CUDA graphs of a model's no-grad calls (UNet, VAE decoder) and of its LoRA training step, captured on first
    use per input shape."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        """Drop every captured graph (and its memory): call after modules or parameter storage change."""
        self._forwards: dict[tuple, _Graph] = {}
        self._train_steps: dict[tuple, _Graph] = {}
        self._pool = None  # one memory pool for all graphs: they replay one at a time and outputs are copied out

    @property
    def n_graphs(self) -> int:
        """Return how many graphs are captured."""
        return len(self._forwards) + len(self._train_steps)

    def _capture(self, fn, inputs: tuple, before_warmup=None, after_warmup=None) -> _Graph:
        """Return a graph of fn(*inputs) (a tuple of tensors), after WARMUP_CALLS eager calls on a side stream."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        if before_warmup:
            before_warmup()
        stream = torch.cuda.Stream(device=inputs[0].device)
        stream.wait_stream(torch.cuda.current_stream(inputs[0].device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_CALLS):
                fn(*inputs)
        torch.cuda.current_stream(inputs[0].device).wait_stream(stream)
        if after_warmup:
            after_warmup()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = fn(*inputs)
        return _Graph(graph, inputs, outputs)

    @staticmethod
    def _replay(entry: _Graph, *values: torch.Tensor) -> tuple:
        for buffer, value in zip(entry.inputs, values):
            buffer.copy_(value)
        entry.graph.replay()
        # Copied out: the next replay of any graph (they share one pool) may overwrite the static outputs.
        return tuple(out.clone() for out in entry.outputs)

    def call(self, name: tuple, fn, *inputs: torch.Tensor) -> torch.Tensor:
        """Return fn(*inputs) under no_grad, replayed from the CUDA graph captured for (name, input shapes).

        name must determine fn (e.g. ('unet', adapters on)): the graph recorded for a name is what it replays.
        """
        key = (name,) + _key(*inputs)
        entry = self._forwards.get(key)
        if entry is None:
            def record(*args):
                with torch.no_grad():
                    return (fn(*args),)
            entry = self._capture(record, tuple(v.clone() for v in inputs))
            self._forwards[key] = entry
        return self._replay(entry, *inputs)[0]

    def train_step(self, name: tuple, step, inputs: tuple, optimizer: torch.optim.Optimizer,
                   parameters: list) -> tuple:
        """Return step(*inputs), a training step that updates `parameters` in place, replayed from a CUDA graph.

        step is the model's own eager step (guidance/core.py's _lora_step: forward, loss, backward, AdamW), captured
        once per (name, input shapes): the graphed and the eager step are one function. The optimizer must be
        capturable. The capture's warm-up calls would train, so parameters and optimizer state are restored after
        them: the graph's first replay is the first step.
        """
        key = (name,) + _key(*inputs)
        entry = self._train_steps.get(key)
        if entry is None:
            saved = {}

            def save():
                saved["params"] = [p.detach().clone() for p in parameters]
                saved["state"] = {id(p): {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
                                  for p in parameters if p in optimizer.state}

            def restore():
                with torch.no_grad():
                    for p, value in zip(parameters, saved["params"]):
                        p.copy_(value)
                    for p in parameters:  # in place: the graph will read these very tensors
                        before = saved["state"].get(id(p), {})
                        for state_name, value in optimizer.state[p].items():
                            if torch.is_tensor(value):
                                value.copy_(before[state_name]) if state_name in before else value.zero_()

            entry = self._capture(step, tuple(v.clone() for v in inputs), before_warmup=save, after_warmup=restore)
            self._train_steps[key] = entry
        return self._replay(entry, *inputs)
