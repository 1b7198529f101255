"""The scripts' command-line helpers (one-line usage errors, exit codes, a quiet Ctrl-C) and, re-exported from
guidance/, the course skeleton's utils: images to and from tensors, user errors, devices, precisions, atomic writes,
file names.

`import utils` itself imports no more than the standard library: the re-exported names load guidance/ (and torch) on
first use, so that a script can make Ctrl-C quiet (interrupt_quietly) before its imports that take seconds.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys

# name -> the guidance/ module it is re-exported from (loaded on first use: see __getattr__)
REEXPORTS = {
    **dict.fromkeys(("PRECISIONS", "UserError", "atomic_write_bytes", "check_writable_dir", "file_write_problem",
                     "get_cosine_schedule_with_warmup", "load_image", "pil_to_torch", "resolve_device",
                     "resolve_precision", "save_image_atomic", "save_json_atomic", "seed_everything", "torch_to_pil"),
                    "guidance.common"),
    **dict.fromkeys(("MAX_NAME_BYTES", "filename_to_prompt", "prompt_for_stem", "prompt_to_filename"),
                    "guidance.runfolder"),
}


def __getattr__(name: str):
    """Return a name re-exported from guidance/, importing its module on first use (PEP 562)."""
    if name not in REEXPORTS:
        raise AttributeError(f"module 'utils' has no attribute {name!r}")
    value = getattr(importlib.import_module(REEXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *REEXPORTS])


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line ('error: ...; see --help') and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def interrupt_quietly(module_name: str) -> None:
    """In a script run as __main__, make Ctrl-C exit 130 without a traceback until run_cli starts.

    Call it first thing, before the imports that take seconds (torch): they run before run_cli can catch anything.
    A Ctrl-C the shell told this process to ignore (a background job) stays ignored.
    """
    if module_name == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _exit_interrupted)


def _exit_interrupted(signum, frame) -> None:
    print("\nInterrupted.", file=sys.stderr, flush=True)
    sys.exit(130)


def run_cli(main_fn, interrupted: str = "Interrupted.") -> None:
    """Run main_fn() and exit with its code: a UserError becomes 'error: ...' on stderr and exit code 2; Ctrl-C exits
    130 with the line `interrupted`, never a traceback. Inside main_fn, Ctrl-C is KeyboardInterrupt again (after
    interrupt_quietly), so that a run in progress ends as interrupted and keeps its image."""
    from guidance.common import UserError

    if signal.getsignal(signal.SIGINT) is _exit_interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main_fn()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def add_config_arguments(parser: argparse.ArgumentParser, config_class, skip=(), none_required: bool = False) -> None:
    """Add a --<field> flag to parser for every field of a configuration dataclass (guidance/config.py's RunConfig),
    from the field's metadata: its help, and argparse's type / choices / nargs / metavar / const; a bool is a switch.
    Every flag defaults to None (unset), so that the caller can tell a flag given from one left out; none_required
    makes the flags a field marks required optional (run_all sets --prompt per run)."""
    import dataclasses

    own = [f for f in dataclasses.fields(config_class) if f.name in config_class.__annotations__]
    inherited = [f for f in dataclasses.fields(config_class) if f.name not in config_class.__annotations__]
    for f in own + inherited:  # the class's own flags first (--prompt ...), then those it inherits
        if f.name in skip:
            continue
        cli = dict(f.metadata.get("cli", {}))
        if none_required:
            cli.pop("required", None)
        if f.default is False and "type" not in cli:
            cli["action"] = "store_true"
        parser.add_argument(f"--{f.name}", dest=f.name, default=None, help=f.metadata.get("help"), **cli)


def config_from_args(args: argparse.Namespace, config_class, **fixed):
    """Return config_class built from the parsed flags that were given (the others keep the class's defaults)."""
    import dataclasses

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
             if getattr(args, f.name, None) is not None}
    return config_class(**{**given, **fixed})
