"""app.py: the page in a real (headless Chromium) browser, the /run API through gradio_client, queueing, Stop,
errors in the page, and one model per app. The server runs in this process on the toy world."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import main

REPO = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage",
                  "--window-size=1400,1000")
SCREENSHOT = os.environ.get("APP_SCREENSHOT")  # where to keep the page's screenshot after a finished run


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nearest(path_or_bytes) -> tuple[str, str]:
    """Return (colour, shape) of the toy template nearest to an image file (or its bytes)."""
    from guidance.toy import from_pil, nearest_template

    source = BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    template, _ = nearest_template(from_pil(Image.open(source)))
    return template.colour, template.shape


class Calls:
    """Counts main.build_model calls and the most main.run calls that were ever running at once."""

    def __init__(self):
        self.builds, self.active, self.most_active, self.lock = 0, 0, 0, threading.Lock()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Serve app.py's page on a free port (toy world); yield (url, runner, calls, save_dir)."""
    pytest.importorskip("gradio")
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio_cache"))
    import app

    calls = Calls()
    real_build, real_run = main.build_model, main.run

    def build_model(args):
        calls.builds += 1
        return real_build(args)

    def run(*args, **kwargs):
        with calls.lock:
            calls.active += 1
            calls.most_active = max(calls.most_active, calls.active)
        try:
            return real_run(*args, **kwargs)
        finally:
            with calls.lock:
                calls.active -= 1

    main.build_model, main.run = build_model, run
    save_dir = tmp_path_factory.mktemp("app_runs")
    page, runner = app.build_app(model="toy", save_dir=save_dir, device="cpu")
    port = _free_port()
    app.launch(page, "127.0.0.1", port, save_dir, block=False)
    try:
        yield f"http://127.0.0.1:{port}/", runner, calls, save_dir
    finally:
        page.close()
        main.build_model, main.run = real_build, real_run


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False, download_files=str(server[3] / "client_downloads"))


def test_help_works_without_a_server():
    done = subprocess.run([sys.executable, str(REPO / "app.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--port" in done.stdout and "--host" in done.stdout and "127.0.0.1" in done.stdout


def test_binds_to_this_machine_and_checks_what_a_page_asks_for():
    import app
    from utils import UserError

    assert app.build_parser().parse_args([]).host == "127.0.0.1"
    runner = app.Runner(REPO / "unused", models=["toy"])  # a page served beyond this machine
    with pytest.raises(UserError, match="model '/etc' is not offered by this server"):
        runner.make_args("a red circle", "sds", 5, 0, model="/etc")
    with pytest.raises(UserError, match="unknown method 'rm -rf'"):
        runner.make_args("a red circle", "rm -rf", 5, 0)
    with pytest.raises(UserError, match="steps 2.5 must be a whole number"):
        runner.make_args("a red circle", "sds", 2.5, 0)
    assert not (REPO / "unused").exists()  # nothing is written before a run starts


def test_method_choices_are_main_pys():
    import app

    choices = next(a for a in main.build_parser()._actions if a.dest == "loss_type").choices
    assert app.loss_types() == list(choices) and {"sds", "pds", "vsd"} <= set(choices)


def test_api_run_returns_the_final_image_file(client, server):
    image, status, _, downloads, panel, mesh, turntable = client.predict("a green square", "sds", 150, 1,
                                                                         api_name="/run")
    assert mesh is None and turntable is None  # an image generator: no mesh, no turntable
    assert status.startswith("finished: 150 steps"), status
    from guidance.diagnostics import split_panel

    # The newest --log_guidance panel (every 25 steps: step 125), as main.run wrote it.
    written = next(server[3].glob("*/a_green_square/guidance/step_00125.png"))
    assert Path(panel).name == "step_00125.png"
    assert np.array_equal(np.asarray(Image.open(panel)), np.asarray(Image.open(written)))
    assert split_panel(np.asarray(Image.open(panel)))["x"].shape == (128, 128, 3)
    assert Path(image).suffix == ".png" and nearest(image) == ("green", "square")
    names = sorted(Path(p).name for p in downloads)
    assert names == ["a_green_square.png", "a_green_square.zip"]
    with zipfile.ZipFile(next(p for p in downloads if p.endswith(".zip"))) as archive:
        record = json.loads(archive.read("a_green_square/run_config.json"))
    assert record["status"] == "finished" and record["seed"] == 1 and record["step"] == 150
    assert record["guidance_scale"] == main.LOSS_DEFAULTS["sds"][0]  # blank guidance: the method's default


def test_api_errors_are_one_line_and_the_server_goes_on(client, server):
    # An error reaches an API client as gradio_client's AppError carrying the page's one-line message.
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        client.predict("a purple triangle", "sds", 20, 0, api_name="/run")
    message = str(info.value)
    assert message.startswith("prompt 'a purple triangle' names 'purple', 'triangle'")
    assert "Traceback" not in message and "\n" not in message
    with pytest.raises(AppError) as info:
        client.predict("a red circle", "pds", 20, 0, "", None, api_name="/run")
    message = str(info.value)
    assert "edit prompt" in message and "--" not in message and "\n" not in message, message  # the page's words
    with pytest.raises(AppError, match="guidance 'lots' is not a number"):
        client.predict("a red circle", "sds", 20, 0, guidance="lots", api_name="/run")
    image, status, _, _, panel, *_ = client.predict("a yellow circle", "sds", 100, 0, log_guidance=False,
                                                    api_name="/run")
    assert status.startswith("finished") and nearest(image) == ("yellow", "circle")
    assert panel is None and not list(server[3].glob("*/a_yellow_circle/guidance"))  # diagnostics off


def test_concurrent_requests_queue_on_one_model(client, server):
    _, runner, calls, _ = server
    model_before = runner.model
    jobs = [client.submit(prompt, "sds", 120, 0, api_name="/run") for prompt in ("a blue circle", "a red square")]
    results = [job.result(timeout=120) for job in jobs]
    assert [nearest(r[0]) for r in results] == [("blue", "circle"), ("red", "square")]
    assert calls.most_active == 1  # queued, never two runs on the model at once
    assert calls.builds == 1 and (model_before is None or runner.model is model_before)  # loaded once, reused


def test_api_compare_runs_each_method_on_the_same_prompt(client):
    gallery, status = client.predict("a blue square", ["sds", "vsd"], 80, 3, api_name="/compare")
    assert status.splitlines()[-1] == "finished comparing sds, vsd"
    assert [item["caption"] for item in gallery] == ["sds · finished", "vsd · finished"]
    assert all(nearest(item["image"]) == ("blue", "square") for item in gallery)
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="choose one to 4 methods"):
        client.predict("a blue square", ["sds", "pds", "vsd", "nfsd", "csd"], 10, 0, api_name="/compare")


# ----------------------------------------------------------------------------------------------- the browser
@pytest.fixture(scope="module")
def browser():
    """A headless Chromium driven by selenium, or a loud skip where Debian's chromium / chromium-driver are missing."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        message = (f"BROWSER TEST SKIPPED: {', '.join(missing)} not installed "
                   f"(apt-get install chromium chromium-driver; .ci/run does this)")
        print(f"\n{'!' * 20} {message} {'!' * 20}", file=sys.__stderr__)
        warnings.warn(message)
        pytest.skip(message)
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


class Page:
    """The app's page by its elem_ids."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.common.by import By

        self.driver, self.by = driver, By
        driver.get(url)
        self.wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#prompt textarea"), 60, "the page")

    def wait_for(self, condition, seconds: float, what: str):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out after {seconds} s waiting for {what}; status: {self.status()!r}")

    def element(self, css: str):
        return self.driver.find_element(self.by.CSS_SELECTOR, css)

    def type(self, elem_id: str, text) -> None:
        box = self.element(f"#{elem_id} textarea, #{elem_id} input")
        box.clear()
        box.send_keys(str(text))

    def click(self, elem_id: str) -> None:
        self.element(f"#{elem_id}").click()

    def status(self) -> str:
        boxes = self.driver.find_elements(self.by.CSS_SELECTOR, "#status textarea")
        return boxes[0].get_attribute("value") if boxes else ""

    def result_bytes(self) -> bytes | None:
        images = self.driver.find_elements(self.by.CSS_SELECTOR, "#result img")
        source = images[0].get_attribute("src") if images else None
        if not source:
            return None
        with urllib.request.urlopen(source, timeout=30) as response:
            return response.read()


def test_browser_run_stop_and_error(server, browser, tmp_path):
    url, _, _, save_dir = server
    page = Page(browser, url)
    ids = ["prompt", "method", "model", "guidance", "steps", "seed", "run", "stop", "result", "status", "loss"]
    assert all(browser.find_elements(page.by.ID, i) for i in ids)

    # Run: the finished image is the prompt's shape and colour.
    page.type("prompt", "a blue square")
    page.type("steps", 200)
    page.click("run")
    page.wait_for(lambda: "finished" in page.status(), 90, "'finished'")
    assert nearest(page.result_bytes()) == ("blue", "square")
    assert page.element("#loss svg, #loss canvas")  # the loss curve is drawn
    screenshot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "app.png"
    browser.save_screenshot(str(screenshot))
    assert Image.open(screenshot).size[0] > 800

    # Stop mid-run: the run ends 'interrupted' and its current image stays on the page and on disk.
    page.type("steps", 20000)
    page.click("run")
    page.wait_for(lambda: page.status().startswith("running sds: step"), 60, "a running step")
    page.wait_for(page.result_bytes, 30, "a live preview")
    page.click("stop")
    page.wait_for(lambda: page.status().startswith("stopped at step"), 60, "'stopped at step'")
    assert page.result_bytes() is not None
    stopped = sorted(save_dir.glob("*/a_blue_square/interrupted.png"))
    assert stopped, "no interrupted.png"
    record = json.loads((stopped[-1].parent / "run_config.json").read_text())
    assert record["status"] == "interrupted" and 0 < record["steps_done"] < 20000

    # A prompt the toy world cannot draw: its one-line error in the page, and the server still serves.
    page.type("prompt", "a purple triangle")
    page.type("steps", 50)
    page.click("run")
    page.wait_for(lambda: page.status().startswith("error:"), 60, "the error")
    assert "purple" in page.status() and "Traceback" not in page.status()
    page.type("prompt", "a red circle")
    page.type("steps", 150)
    page.click("run")
    page.wait_for(lambda: "finished" in page.status(), 90, "'finished' after the error")
    assert nearest(page.result_bytes()) == ("red", "circle")


def test_browser_compare_shows_every_tile_whole(server, browser):
    """Two compared methods were shown as two tiles wider than the gallery is tall: only their top half was visible."""
    page = Page(browser, server[0])
    page.type("prompt", "a green circle")
    page.type("steps", 60)
    page.click("compare")
    page.wait_for(lambda: "finished comparing" in (page.element("#compare_status textarea").get_attribute("value")
                                                   or ""), 120, "'finished comparing'")
    boxes = page.wait_for(lambda: browser.execute_script("""
        const wrap = document.querySelector('#compare_result .grid-wrap').getBoundingClientRect();
        const tiles = Array.from(document.querySelectorAll('#compare_result .grid-container img'));
        return tiles.length ? tiles.map(img => { const r = img.getBoundingClientRect();
            return [r.top - wrap.top, wrap.bottom - r.bottom, r.left - wrap.left, wrap.right - r.right,
                    getComputedStyle(img).objectFit]; }) : null;"""), 30, "the compared images")
    assert len(boxes) == 2
    for *margins, fit in boxes:  # each image inside the gallery's visible box, drawn whole (contain)
        assert min(margins) >= -1 and fit == "contain", boxes


def test_api_run_of_a_3d_generator_shows_its_mesh_and_turntable(client):
    """nerf and mesh in the toy 3D world from the page's API: the GLB for the 3D viewer, the turntable GIF, and the
    meshes among the downloads (last in this file: it makes the server load a second model)."""
    for generator, steps in (("nerf", 30), ("mesh", 10)):
        image, status, _, downloads, _, mesh, turntable = client.predict(
            "a blue sphere", "sds", steps, 0, model="toy3d", generator=generator, log_guidance=False, mesh="sphere",
            api_name="/run")
        assert status.startswith(f"finished: {steps} steps"), status
        assert Path(mesh).suffix == ".glb" and Path(turntable).suffix == ".gif", (mesh, turntable)
        import trimesh

        assert len(trimesh.load(mesh, force="mesh").faces) > 0
        assert {Path(p).suffix for p in downloads} >= {".png", ".glb", ".obj", ".zip"}
        assert Image.open(turntable).n_frames == 60
