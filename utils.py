"""The scripts' command-line helpers (one-line usage errors, exit codes) and, re-exported from guidance/, the
course skeleton's utils: images to and from tensors, user errors, devices, precisions, atomic writes, file names."""
from __future__ import annotations

import argparse
import sys

from guidance.common import (PRECISIONS, UserError, atomic_write_bytes, check_writable_dir,  # noqa: F401 (re-exported)
                             get_cosine_schedule_with_warmup, load_image, pil_to_torch, resolve_device,
                             resolve_precision, save_image_atomic, save_json_atomic, seed_everything, torch_to_pil)
from guidance.runfolder import (MAX_NAME_BYTES, filename_to_prompt, prompt_for_stem,  # noqa: F401 (re-exported)
                                prompt_to_filename)


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line ('error: ...; see --help') and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_cli(main_fn) -> None:
    """Run main_fn(); a UserError becomes 'error: ...' on stderr and exit code 2."""
    try:
        code = main_fn()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
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
