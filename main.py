"""Distil an image from Stable Diffusion (or a toy world) with any method of guidance/methods.py: the course's main.py.

    python main.py --prompt "A castle next to a river" --loss_type sds --guidance_scale 25 --step 500
    python main.py --prompt P --edit_prompt E --src_img_path S --loss_type pds      # or dds
    python main.py --prompt P --loss_type vsd --num_particles 4
    python main.py --prompt P --loss_type sdi                                       # nfsd csd bridge asd ism sdi
    python main.py --model toy --prompt "a red circle" --loss_type sds      # offline, seconds on a CPU

This file is the command line only: its flags are guidance/config.py's RunConfig, the loop is guidance/loop.py's
run (re-exported here as main.run), the model comes from guidance.load_model.
"""
from __future__ import annotations

from utils import interrupt_quietly  # first: Ctrl-C while torch and the rest import exits 130 quietly

interrupt_quietly(__name__)

import argparse  # noqa: E402
import sys  # noqa: E402

from guidance.config import RunConfig  # noqa: E402
from guidance.loop import (LOSS_READ_EVERY, LOSS_SCALE, RunResult, StepInfo, StopRequested,  # noqa: F401,E402 (API)
                           encode_then_free_text_encoders, initial_latents, run, write_progress_gif)
from guidance.methods import METHODS, method_help  # noqa: E402
from utils import CliParser, add_config_arguments, config_from_args, run_cli  # noqa: E402

# The course's settings per loss: (guidance scale, optimisation steps), read from the table.
LOSS_DEFAULTS = {name: (m.guidance_scale, m.steps) for name, m in METHODS.items()}


def build_parser() -> argparse.ArgumentParser:
    """Return main.py's argument parser: one flag per field of RunConfig (the course skeleton's flags plus ours)."""
    parser = CliParser(description="Score distillation on Stable Diffusion or a toy world. Methods (--loss_type):\n"
                                   + method_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, RunConfig)
    return parser


def parse_args(argv=None) -> RunConfig:
    """Return main.py's run configuration, resolved and checked (fails fast, before any model is loaded)."""
    return config_from_args(build_parser().parse_args(argv), RunConfig).resolved()


def validate_args(config: RunConfig) -> RunConfig:
    """Return config resolved: the method's defaults filled in, everything checked that can be without a model."""
    return config.resolved()


def output_name(config: RunConfig) -> str:
    """Return the course's file stem of a run: the prompt (the edit prompt for editing methods), spaces as underscores."""
    return config.name


def build_model(config: RunConfig):
    """Return the guidance model that config names (loaded once; run() can reuse it for many prompts)."""
    from guidance import load_model

    return load_model(config.model, **config.model_options())


def main(argv=None) -> int:
    """Run main.py; return the exit code (0 finished, 1 diverged, 130 interrupted)."""
    from guidance.methods import run_prompts

    config = parse_args(argv)
    config.check_replace()  # before the model loads: a finished result made with other settings is not replaced
    print(f"[*] {config.loss_type.upper()} with {config.model}: guidance {config.guidance_scale}, {config.step} steps, "
          f"seed {config.seed}")
    model = build_model(config)
    encode_then_free_text_encoders(model, run_prompts(config))  # one run: its prompts are all known
    result = run(model, config)
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
