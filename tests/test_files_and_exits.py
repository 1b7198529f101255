"""Files follow the umask; every script reports an unwritable target in one line (exit 2) before its expensive work;
report.py refuses an empty folder and names the scorer that scored; Ctrl-C exits 130 without a traceback, also while
a script is still importing torch."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_written_files_follow_the_umask(tmp_path, umask_022):
    from guidance.common import atomic_write_bytes, save_image_atomic, save_json_atomic

    atomic_write_bytes(tmp_path / "a.bin", b"x")
    save_json_atomic({"a": 1}, tmp_path / "b.json")
    save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "c.png")
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == {"a.bin": 0o644, "b.json": 0o644, "c.png": 0o644}
    os.umask(0o077)  # a private umask is followed too (read at each write, not once at import)
    atomic_write_bytes(tmp_path / "a.bin", b"y")
    assert mode(tmp_path / "a.bin") == 0o600 and (tmp_path / "a.bin").read_bytes() == b"y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.json", "c.png"]  # no temporary file left


def test_a_whole_run_folder_follows_the_umask(tmp_path, umask_022):
    import main

    config = main.parse_args(["--model", "toy", "--prompt", "a red circle", "--step", "3", "--log_step", "1",
                              "--save_dir", str(tmp_path), "--device", "cpu"])
    main.run(main.build_model(config), config, progress=False)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"a_red_circle.png", "run_config.json", "loss.csv", "latents.pt",
                                        "step_00000.png"}
    assert {str(p.relative_to(tmp_path)): oct(mode(p)) for p in files if mode(p) != 0o644} == {}
