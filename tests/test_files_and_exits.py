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


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


# ----------------------------------------------------------------------------------------------- unwritable targets
def script(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, name, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})))


def one_line_error(done: subprocess.CompletedProcess, expected: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [f"error: {expected}"], done.stderr[-2000:]


def toy_folder(folder: Path) -> Path:
    """Return a course-style folder of finished toy runs (two PNGs with their run records), made by main.run."""
    import main

    for prompt in ("a red circle", "a blue square"):
        config = main.parse_args(["--model", "toy", "--prompt", prompt, "--step", "3", "--log_step", "1",
                                  "--save_dir", str(folder), "--device", "cpu"])
        main.run(main.build_model(config), config, progress=False)
    return folder


def test_eval_into_an_unwritable_target_fails_in_one_line_before_scoring(tmp_path):
    fdir = toy_folder(tmp_path / "sds")
    (fdir / "eval.json").mkdir()  # the target cannot be written, by root either
    done = script("eval.py", "--fdir1", str(fdir), "--clip_pretrained", "none", "--device", "cpu")
    one_line_error(done, f"cannot write {fdir / 'eval.json'} (it is a folder): eval.py writes the scores beside the "
                         f"images; remove or rename that folder")
    assert "CLIP:" not in done.stdout  # refused before the scorer was built, not after scoring


def test_eval_in_a_read_only_folder_fails_in_one_line(tmp_path, monkeypatch):
    """A folder the process may not write (root writes anywhere, so the system's refusal is simulated)."""
    import eval as evaluation
    from utils import UserError

    fdir = toy_folder(tmp_path / "sds")
    real_open = os.open

    def read_only(path, flags, *args):
        if Path(path).parent == fdir and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(UserError) as info:
        evaluation.evaluate_dir(fdir, scorer="toy")
    assert str(info.value) == (f"cannot write {fdir / 'eval.json'} (Permission denied): eval.py writes the scores "
                               f"beside the images; make the folder writable, or score a writable copy of it")


@pytest.mark.parametrize("where,expected", [
    ("folder", "--pdf {pdf} is a folder: give a file name, e.g. --pdf {pdf}/report.pdf"),
    ("under_a_file", "cannot write {pdf} (Not a directory): choose another --pdf"),
    ("proc", "cannot write {pdf} (No such file or directory): choose another --pdf"),
])
def test_report_pdf_target_that_cannot_be_written_is_one_line(tmp_path, where, expected):
    out = toy_folder(tmp_path / "out" / "sds").parent
    if where == "folder":
        pdf = tmp_path / "pdfs"
        pdf.mkdir()
    elif where == "under_a_file":
        (tmp_path / "a_file").write_text("x")
        pdf = tmp_path / "a_file" / "report.pdf"
    else:
        pdf = Path("/proc/report.pdf")  # no file can be created in /proc, by root either
    done = script("report.py", str(out), "--pdf", str(pdf))
    one_line_error(done, expected.format(pdf=pdf))
    assert not list(tmp_path.rglob("*.pdf"))


def test_report_default_target_that_is_a_folder(tmp_path):
    out = toy_folder(tmp_path / "out" / "sds").parent
    (out / "report.pdf").mkdir()
    done = script("report.py", str(out))
    one_line_error(done, f"cannot write {out / 'report.pdf'}: it is a folder; remove or rename it, or give --pdf FILE")


@pytest.mark.parametrize("case", ["empty", "empty task folder", "wrong folder"])
def test_report_refuses_a_folder_with_nothing_to_report(tmp_path, case):
    out = tmp_path / "out"
    out.mkdir()
    if case == "empty task folder":
        (out / "sds").mkdir()
    elif case == "wrong folder":
        (out / "notes.txt").write_text("not a run")
        Image.new("RGB", (8, 8)).save(out / "holiday.png")
    done = script("report.py", str(out), "--pdf", str(tmp_path / "new" / "report.pdf"))
    one_line_error(done, f"nothing to report in {out}: no run_all.json and no runs in task folders (ddim, sds, nfsd, "
                         f"csd, ...): give the output folder of run_all.py (e.g. outputs/)")
    assert not (tmp_path / "new").exists()  # nothing made


def test_report_names_the_scorer_that_scored(tmp_path):
    """A course-style folder of toy runs (no run_all.json) was scored by the toy world's scorer, not by CLIP."""
    import matplotlib.pyplot as plt

    import eval as evaluation
    import report

    out = tmp_path / "out"
    evaluation.evaluate_dir(toy_folder(out / "sds"), scorer="toy")
    figures = report.render(report.collect(out))
    words = " ".join(t.get_text() for t in figures[0].texts)
    plt.close("all")
    assert "Scorer: toy" in words and "CLIP" not in words.split("Prompts:")[0]
    assert "The toy world's scorer is not CLIP" in words


def test_run_all_names_its_own_flag_for_an_unwritable_output_folder(tmp_path):
    (tmp_path / "a_file").write_text("x")
    done = script("run_all.py", "--model", "toy", "--tasks", "sds", "--out", str(tmp_path / "a_file" / "out"))
    one_line_error(done, f"cannot write to output folder {tmp_path / 'a_file' / 'out'} (Not a directory): choose "
                         f"another --out")


def test_app_names_its_own_flags_for_unwritable_folders(tmp_path):
    pytest.importorskip("tensorboard")
    (tmp_path / "a_file").write_text("x")
    port = ["--port", str(free_port())]
    done = script("app.py", "--model", "toy", "--save_dir", str(tmp_path / "a_file" / "runs"), *port)
    one_line_error(done, f"cannot write to save directory {tmp_path / 'a_file' / 'runs'} (Not a directory): choose "
                         f"another --save_dir")
    done = script("app.py", "--model", "toy", "--save_dir", str(tmp_path / "runs"), "--tensorboard",
                  str(tmp_path / "a_file" / "tb"), *port)
    one_line_error(done, f"cannot write to folder {tmp_path / 'a_file' / 'tb'} (Not a directory): choose another "
                         f"--tensorboard")


def test_eval_device_without_cuda_is_refused_as_main_refuses_it(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = script("eval.py", "--fdir1", str(toy_folder(tmp_path / "sds")), "--scorer", "toy", "--device", "cuda")
    one_line_error(done, "device 'cuda' asked for CUDA, but no CUDA GPU is visible: use --device cpu")


# ----------------------------------------------------------------------------------------------- Ctrl-C
SLOW_IMPORT = '''
import os, sys, time
TARGET, MARK = os.environ["SLOW_IMPORT"], os.environ["SLOW_IMPORT_MARK"]


class Slow:
    """Holds the first import of TARGET for 60 s (where the test sends Ctrl-C), after writing MARK."""

    def find_spec(self, name, path=None, target=None):
        if name == TARGET:
            sys.meta_path.remove(self)
            open(MARK, "w").close()
            time.sleep(60)
        return None


sys.meta_path.insert(0, Slow())
'''


def ctrl_c_during_import(tmp_path: Path, module: str, *argv: str) -> subprocess.CompletedProcess:
    """Run a script, send it SIGINT while it imports `module` (held there by a sitecustomize hook); return its end."""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(SLOW_IMPORT)
    mark = tmp_path / "importing"
    env = dict(os.environ, HF_HUB_OFFLINE="1", SLOW_IMPORT=module, SLOW_IMPORT_MARK=str(mark),
               PYTHONPATH=os.pathsep.join([str(tmp_path / "hook"), os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not mark.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mark.exists(), process.communicate()[1][-2000:]
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.parametrize("argv,module", [
    (["eval.py", "--fdir1", "x"], "torch"),  # the imports at the top of each script, before run_cli
    (["report.py", "x"], "torch"),
    (["run_all.py", "--model", "toy"], "torch"),
    (["app.py", "--model", "toy", "--port", "0"], "html"),
    (["report.py", "OUT"], "matplotlib.backends.backend_pdf"),  # inside main: drawing the report
    (["eval.py", "--fdir1", "OUT/sds", "--clip_pretrained", "none"], "open_clip"),  # inside main: building CLIP
    (["app.py", "--model", "toy", "--save_dir", "OUT/app"], "torch"),  # inside main: before serving
])
def test_ctrl_c_at_any_moment_exits_130_without_a_traceback(tmp_path, argv, module):
    if "OUT" in " ".join(argv):
        out = toy_folder(tmp_path / "out" / "sds").parent
        argv = [a.replace("OUT", str(out)) for a in argv]
    done = ctrl_c_during_import(tmp_path, module, *argv)
    assert done.returncode == 130, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == "Interrupted.", done.stderr[-3000:]
