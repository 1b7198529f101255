"""Watch score distillation work: a local web page (Gradio) that runs any method and shows the image as it forms.

    python app.py                       # the toy world on a machine without CUDA, Stable Diffusion with it
    python app.py --model toy --port 7860 --host 127.0.0.1

Run streams the image every few steps with the loss curve and the current timestep t; Stop ends the run and keeps
the current image; a finished run offers its PNG and its run folder as a zip. Compare runs up to four methods on
the same prompt and seed, one after another, and shows them side by side as they progress. "Show what the
guidance sees" adds main.py's --log_guidance panel (x, x_t, x0_hat, |grad|; guidance/diagnostics.py). Every run goes
through main.run (the project's one optimisation loop) on one model that the app loads once and reuses; runs
queue, one at a time. Errors in what was asked (RunConfig.resolved, the toy world's prompt parser) show in the
page as the CLI's one-line message.

Stable names for scripts and tests: elements with elem_id prompt, edit_prompt, source, method, model, guidance,
steps, seed, run, stop, result, status, loss (and log_guidance, guidance_panel, downloads, compare_methods,
compare, compare_result, compare_status); the API endpoint "/run" takes prompt, method, steps, seed (the rest
optional) and returns the final image file first:

    from gradio_client import Client
    image_path = Client("http://127.0.0.1:7860/").predict("a red circle", "sds", 200, 0, api_name="/run")[0]
"""
from __future__ import annotations

from utils import interrupt_quietly  # first: Ctrl-C while torch and the rest import exits 130 quietly

interrupt_quietly(__name__)

import argparse
import os
import queue
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from app_requests import (MAX_SOURCE_PIXELS, as_number, as_prompt, as_switch, as_text, as_whole, blank,
                          describe_error, page_error, page_message, source_image, user_error)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry: the app works offline

REPO = Path(__file__).resolve().parent
DEFAULT_PORT = 7860
DEFAULT_HOST = "127.0.0.1"  # this machine only, unless told otherwise
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
PREVIEW_SECONDS = 0.25  # at most this often a live preview goes to the page
PREVIEW_PIXELS = 384  # a live preview's longest side (the page shows 320 px; the result file keeps its own size)
# What one request may ask of the server (README, "The app's limits"). --max_steps overrides the step ceiling, whose
# default follows the model and the device: a toy world's step takes milliseconds, Stable Diffusion's SDS step 11-41 ms
# on an H100 (README) but seconds on a CPU, where 500 (the course's most) is already a long run.
MAX_STEPS = {"a toy world": 20000, "Stable Diffusion on a GPU": 5000, "Stable Diffusion on a CPU": 500}
MAX_UPLOAD = "25mb"  # Gradio refuses larger uploads before they reach the app
# Gradio's cache of what the page was sent (previews, results): every CACHE_SWEEP_SECONDS the files older than
# CACHE_MAX_AGE_SECONDS are deleted, and all of it when the server stops. The runs themselves stay in --save_dir.
CACHE_SWEEP_SECONDS, CACHE_MAX_AGE_SECONDS = 300, 1800
SHUTDOWN_SECONDS = 60  # on Ctrl-C / SIGTERM, how long a run in progress gets to end its step and write its files
LOSS_POINTS = 400  # the loss curve is drawn from at most this many points
LOSS_AXIS = "log10 loss"
MAX_COMPARE = 4
APP_MESHES = ("box", "sphere")  # what --generator mesh paints from the page (a file of one's own: main.py --mesh)
# The example a Stable Diffusion page starts with (a toy world's page starts with its world's own example).
SD_EXAMPLE = ("A castle next to a river", "A rainbow castle next to a river",
              REPO / "data" / "imgs" / "A_castle_next_to_a_river.png")
# The toy's 64x64 images, shown large with their pixels sharp (the files stay at their own size). The comparison's
# tiles keep MAX_COMPARE columns whatever their number (Gradio would widen two square tiles past the gallery's height,
# showing only their top half), and no tile is taller than the gallery: on a wide page a tile is wider than tall and
# its image, contained, whole.
CSS = """
#result img { width: 100%; height: 100%; object-fit: contain; }
#result img, #compare_result img, #guidance_panel img { image-rendering: pixelated; }
#compare_result .grid-container { grid-template-columns: repeat(MAX_COMPARE, minmax(100px, 1fr)); }
#compare_result .thumbnail-item { max-height: 280px; }
""".replace("MAX_COMPARE", str(MAX_COMPARE))


# ----------------------------------------------------------------------------------------------- what main.py offers
def loss_types() -> list[str]:
    """Return every method of the table (main.py's --loss_type choices)."""
    from guidance.methods import LOSS_TYPES

    return list(LOSS_TYPES)


def generator_choices() -> tuple[list[str], str]:
    """Return (the generators main.py's --generator offers, the default one)."""
    from guidance.config import RunConfig
    from guidance.generators import GENERATORS

    return list(GENERATORS), RunConfig.generator


def method_info(method: str):
    """Return the method's row of guidance/methods.py (defaults, whether it edits an image)."""
    from guidance.methods import METHODS

    return METHODS[method]


def default_model() -> str:
    """Return the app's default model: the 2D toy world without CUDA, Stable Diffusion with it."""
    import torch

    from guidance.models import DEFAULT_MODEL
    from guidance.toy import ToyDiffusion

    return DEFAULT_MODEL if torch.cuda.is_available() else ToyDiffusion.name


def example_for(model: str) -> tuple[str, str, Path]:
    """Return (prompt, edit prompt, source image) the page starts with for a model: a toy world's own example."""
    from guidance.models import world

    found = world(model)
    return found.example if found is not None else SD_EXAMPLE


# ----------------------------------------------------------------------------------------------- running
class Runner:
    """Runs main.run for the page: one loaded model, reused, serving one run at a time; Stop per browser session."""

    def __init__(self, save_root: str | Path, device: str | None = None, precision: str = "fp32",
                 tensorboard: str | None = None, models: list[str] | None = None, max_steps: int | None = None):
        self.save_root = Path(save_root)
        self.device, self.precision, self.tensorboard = device, precision, tensorboard
        self.models = models  # the models a page may ask for (None: any hub id or local folder)
        self.max_steps = max_steps  # None: MAX_STEPS for the run's model and the device
        self.model_name, self.model = None, None
        self.stop_flags: dict[str, threading.Event] = {}  # session -> the stop flag of its current run
        self.lock = threading.Lock()  # guards the stop flags, the workers and the folder counter
        # Held while a run uses the model. The event queue already runs one run at a time, but a run whose page
        # went away still finishes its step in the background: the next one waits for it here.
        self.model_lock = threading.Lock()
        self.counter = 0
        self.workers: set[threading.Thread] = set()  # runs in progress (shutdown waits for them)
        self.closing = threading.Event()  # set by shutdown: runs in progress stop, new ones are refused

    # -- arguments and model
    def make_args(self, prompt, method, steps, seed, edit_prompt=None, source=None, guidance=None, model=None,
                  generator=None, log_guidance=True, save_dir=None, mesh=None):
        """Return the resolved run configuration of one run from what a page or an API client sent (any JSON value
        may arrive): UserError, phrased for the page, for anything this server or main.py would refuse."""
        from guidance.config import RunConfig
        from utils import UserError

        if self.closing.is_set():
            raise UserError("the server is shutting down: try again once it is back")
        methods = loss_types()
        if method not in methods:
            raise UserError(f"unknown method {method!r}: choose one of {', '.join(methods)}")
        model = as_text(model, "model").strip() or default_model()
        if self.models is not None and model not in self.models:
            raise UserError(f"model {model!r} is not offered by this server: choose one of {', '.join(self.models)}")
        limit = self.step_limit(model)
        steps = None if blank(steps) else as_whole(steps, "steps")
        if steps is not None and steps > limit:
            raise UserError(f"steps {steps} is more than this server runs ({limit} at most{self.limit_note(model)}): "
                            f"give fewer steps")
        edits = method_info(method).edits
        if edits and blank(edit_prompt):
            raise UserError(f"{method.upper()} edits an image: type the edit prompt (what the edited image shows)")
        if edits and blank(source):
            raise UserError(f"{method.upper()} edits an image: upload a source image")
        generators, default_generator = generator_choices()
        if not blank(generator) and generator not in generators:
            raise UserError(f"unknown generator {generator!r}: choose one of {', '.join(generators)}")
        if generator == "mesh" and not blank(mesh) and mesh not in APP_MESHES:
            raise UserError(f"the page paints the built-in {' or '.join(APP_MESHES)} (main.py --mesh paints your "
                            f"own mesh file)")
        config = RunConfig(
            prompt=as_prompt(prompt, "prompt"), loss_type=method, model=model, step=steps,
            seed=0 if blank(seed) else as_whole(seed, "seed"),
            guidance_scale=None if blank(guidance) else as_number(guidance, "guidance"),
            edit_prompt=as_prompt(edit_prompt, "edit prompt") or None if edits else None,
            src_img_path=source_image(source) if edits else None, generator=generator or default_generator,
            mesh=(mesh if not blank(mesh) else APP_MESHES[0]) if generator == "mesh" else None,
            device=self.device, precision=self.precision, tensorboard=self.tensorboard,
            save_dir=str(save_dir or self.new_save_dir()))
        config.log_guidance = as_switch(log_guidance, "show what the guidance sees") and config.log_step > 0
        try:
            config = config.resolved()
        except UserError as err:
            raise UserError(page_message(str(err))) from None
        if config.step > limit:  # the method's default steps, above a lower --max_steps
            raise UserError(f"{method}'s default of {config.step} steps is more than this server runs ({limit} at "
                            f"most): give fewer steps")
        return config

    def step_limit(self, model: str) -> int:
        """Return the most steps one run of `model` may take: --max_steps, or MAX_STEPS for the model and device."""
        return self.max_steps or MAX_STEPS[self.model_kind(model)]

    def model_kind(self, model: str) -> str:
        from guidance.models import world
        from utils import resolve_device

        if world(model) is not None:
            return "a toy world"
        on_gpu = resolve_device(self.device).type != "cpu"
        return f"Stable Diffusion on a {'GPU' if on_gpu else 'CPU'}"

    def limits_text(self) -> str:
        """Return the page's line about this server's limits."""
        steps = (f"{self.max_steps} steps" if self.max_steps else
                 "; ".join(f"{n} steps for {kind}" for kind, n in MAX_STEPS.items()))
        return (f"This server runs at most {steps} per run, up to {MAX_COMPARE} methods per comparison, and takes "
                f"source images of up to {MAX_SOURCE_PIXELS / 1e6:.1f} million pixels.")

    def limit_note(self, model: str) -> str:
        return "" if self.max_steps else f" for {self.model_kind(model)}"

    def new_save_dir(self, suffix: str = "") -> Path:
        """Return a fresh folder under the app's output root for one run (or one comparison)."""
        with self.lock:
            self.counter += 1
            return self.save_root / f"{time.strftime('%Y%m%d-%H%M%S')}-{self.counter:03d}{suffix}"

    def get_model(self, config):
        """Return the loaded model the run configuration names, loading it only when it differs from the one held."""
        import main

        if self.model is None or self.model_name != config.model:
            self.model, self.model_name = None, None  # free the old one first (SD is several GB)
            self.model = main.build_model(config)
            self.model_name = config.model
        return self.model

    # -- stop
    def new_stop_flag(self, session: str) -> threading.Event:
        """Return a fresh stop flag for the session's next run (an earlier run keeps its own)."""
        with self.lock:
            self.stop_flags[session] = threading.Event()
            return self.stop_flags[session]

    def request_stop(self, session: str) -> None:
        """Stop the session's current run (it ends as Ctrl-C ends main.py: 'interrupted', its image kept)."""
        with self.lock:
            flag = self.stop_flags.get(session)
        if flag is not None:
            flag.set()

    def shutdown(self, seconds: float = SHUTDOWN_SECONDS) -> bool:
        """Stop every run in progress as Stop does (each ends 'interrupted' with its image kept), refuse new ones, and
        wait up to `seconds` for them to write their files; return whether all of them ended."""
        self.closing.set()
        with self.lock:
            for flag in self.stop_flags.values():
                flag.set()
            workers = list(self.workers)
        deadline = time.monotonic() + seconds
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        return not any(worker.is_alive() for worker in workers)

    # -- one run, as a stream of events
    def stream(self, args, session: str):
        """Yield ('progress', step, total, t, losses, image) in a run, then ('done', result) or ('error', text)."""
        updates: queue.Queue = queue.Queue()
        flag = self.new_stop_flag(session)
        worker = threading.Thread(target=self._work, args=(args, flag, updates), name="distil", daemon=True)
        with self.lock:
            self.workers.add(worker)
        worker.start()
        ended = False
        try:
            while not ended:
                event = updates.get()
                # Only the newest preview matters: skip those a slow page has not taken yet.
                while event[0] == "progress" and not updates.empty():
                    event = updates.get()
                ended = event[0] in ("done", "error")
                yield event
        finally:
            if not ended:  # the page went away (closed, or its request cancelled): stop its run
                flag.set()

    def _work(self, args, flag: threading.Event, updates: queue.Queue) -> None:
        """Run one configuration on the held model (a worker thread), putting its progress and its end on updates."""
        import main
        from utils import torch_to_pil

        last = [0.0]

        def callback(info) -> None:
            now = time.monotonic()
            if info.step == info.total or now - last[0] >= PREVIEW_SECONDS:
                last[0] = now
                image = torch_to_pil(info.image()[:1].cpu())
                image.thumbnail((PREVIEW_PIXELS, PREVIEW_PIXELS))  # what the page shows; the run's files keep all
                updates.put(("progress", info.step, info.total, info.t, list(info.losses), image))

        try:
            with self.model_lock:
                if self.closing.is_set():
                    raise user_error("the server is shutting down: the run did not start")
                model = self.get_model(args)
                model.get_text_embeds(args.prompt)  # a prompt the model refuses fails here, before any file
                if method_info(args.loss_type).edits:
                    model.get_text_embeds(args.edit_prompt)
                result = main.run(model, args, progress=False, callback=callback,
                                  should_stop=lambda: flag.is_set() or self.closing.is_set())
            updates.put(("done", result))
        except Exception as err:  # noqa: BLE001 (every failure must reach the page, and the server go on)
            updates.put(("error", describe_error(err)))
        finally:
            with self.lock:
                self.workers.discard(threading.current_thread())


# ----------------------------------------------------------------------------------------------- checking a request
def compared_methods(chosen) -> list[str]:
    """Return the methods a comparison asked for, in the table's order: one to MAX_COMPARE known methods."""
    methods = loss_types()
    if isinstance(chosen, str):
        chosen = [chosen]
    if not isinstance(chosen, (list, tuple)):
        raise user_error(f"the methods to compare must be a list of names, not {chosen!r:.60}")
    unknown = [m for m in chosen if m not in methods]
    if unknown:
        raise user_error(f"unknown method(s) {', '.join(map(repr, unknown))}: choose among {', '.join(methods)}")
    chosen = [m for m in methods if m in chosen]
    if not chosen or len(chosen) > MAX_COMPARE:
        raise user_error(f"choose one to {MAX_COMPARE} methods to compare (chose {len(chosen)})")
    return chosen


def loss_frame(losses: list):
    """Return the loss curve as a DataFrame (step, log10 loss) of at most LOSS_POINTS rows.

    log10, because a distillation loss spans decades (noisy t, CFG): on a linear axis a few spikes hide the rest.
    """
    import math

    import pandas as pd

    stride = max(1, -(-len(losses) // LOSS_POINTS))
    steps = [i for i in range(0, len(losses), stride) if losses[i] > 0 and math.isfinite(losses[i])]
    return pd.DataFrame({"step": steps, LOSS_AXIS: [math.log10(losses[i]) for i in steps]})


def progress_text(method: str, step: int, total: int, t, losses: list) -> str:
    loss = f" · loss {losses[-1]:.4g}" if losses else ""
    return f"running {method}: step {step}/{total}" + (f" · t = {t}" if t is not None else "") + loss


def result_text(result) -> str:
    """Return the status line of a finished, stopped or diverged run (only a finished one says 'finished')."""
    if result.status == "finished":
        return f"finished: {result.steps_done} steps in {result.seconds:.1f} s · {result.image_path}"
    if result.status == "interrupted":
        return f"stopped at step {result.steps_done}: the current image is kept ({result.image_path})"
    return (f"diverged: the loss became NaN/inf at step {result.steps_done}; the last finite image is "
            f"{result.image_path}. Try a lower guidance scale.")


def newest_panel(config) -> str | None:
    """Return the path of the run's newest guidance panel (--log_guidance), or None."""
    panels = sorted((config.run_dir / "guidance").glob("step_*.png"))
    return str(panels[-1]) if panels else None


def three_d_outputs(result) -> tuple[str | None, str | None]:
    """Return (the run's mesh, .glb, for the 3D viewer; its turntable GIF), each None when the run made none."""
    mesh = result.image_path.with_suffix(".glb")
    gif = result.run_dir / "turntable.gif"
    return (str(mesh) if mesh.is_file() else None), (str(gif) if gif.is_file() else None)


def zip_run(result) -> Path:
    """Return a zip of the run's folder, written beside it (<save_dir>/<name>.zip)."""
    base = result.run_dir.parent / result.run_dir.name
    return Path(shutil.make_archive(str(base), "zip", root_dir=result.run_dir.parent, base_dir=result.run_dir.name))


# ----------------------------------------------------------------------------------------------- the page
class Handlers:
    """What the page's buttons do: run one method, compare several, stop; each streams its updates to the page."""

    def __init__(self, runner: Runner):
        self.runner = runner

    @staticmethod
    def session_of(request) -> str:
        return getattr(request, "session_hash", None) or "api"

    def method_changed(self, method):
        """Return the page updates for a newly chosen method: edit fields shown or hidden, its defaults."""
        import gradio as gr

        info = method_info(method)
        return (gr.update(visible=info.edits), gr.update(visible=info.edits),
                gr.update(placeholder=f"blank: {method}'s default, {info.guidance_scale:g}"),
                gr.update(value=min(info.steps, self.runner.max_steps or info.steps)))

    def run(self, prompt, method, steps, seed, edit_prompt=None, source=None, guidance=None, model=None,
            generator=None, log_guidance=True, mesh=None, request=None):
        """Run one method; stream (image, status, loss curve, downloads, newest guidance panel, and for a 3D
        generator the mesh for the 3D viewer and the turntable GIF)."""
        try:
            args = self.runner.make_args(prompt, method, steps, seed, edit_prompt, source, guidance, model, generator,
                                         log_guidance, mesh=mesh)
        except Exception as err:  # noqa: BLE001
            status = describe_error(err)
            yield None, status, loss_frame([]), None, None, None, None
            raise page_error(status) from None
        yield None, f"starting {method} with {args.model} ({args.step} steps)", loss_frame([]), None, None, None, None
        for event in self.runner.stream(args, self.session_of(request)):
            if event[0] == "progress":
                _, step, total, t, losses, image = event
                yield (image, progress_text(method, step, total, t, losses), loss_frame(losses), None,
                       newest_panel(args), None, None)
            elif event[0] == "error":
                yield None, event[1], loss_frame([]), None, None, None, None
                raise page_error(event[1])
            else:
                result = event[1]
                mesh, gif = three_d_outputs(result)
                meshes = [str(p) for p in (result.image_path.with_suffix(s) for s in (".glb", ".obj", ".mtl"))
                          if p.is_file()]
                files = [str(result.image_path), *meshes, str(zip_run(result))]
                yield (str(result.image_path), result_text(result), loss_frame(result.losses), files,
                       newest_panel(args), mesh, gif)

    def compare(self, prompt, chosen, steps, seed, edit_prompt=None, source=None, guidance=None, model=None,
                generator=None, log_guidance=True, request=None):
        """Run up to four methods on one prompt and seed, one after another; stream the gallery and a status."""
        try:
            chosen = compared_methods(chosen)
            root = self.runner.new_save_dir("-compare")
            all_args = [self.runner.make_args(prompt, m, steps if steps else None, seed, edit_prompt, source, guidance,
                                              model, generator, log_guidance, save_dir=root / m) for m in chosen]
        except Exception as err:  # noqa: BLE001
            status = describe_error(err)
            yield [], status
            raise page_error(status) from None
        done, lines, stopped = [], [], False
        for method, args in zip(chosen, all_args):
            if stopped:
                lines.append(f"{method}: skipped (stopped)")
                continue
            for event in self.runner.stream(args, self.session_of(request)):
                if event[0] == "progress":
                    _, step, total, t, losses, image = event
                    yield done + [(image, f"{method} · step {step}/{total}")], \
                        "\n".join(lines + [progress_text(method, step, total, t, losses)])
                elif event[0] == "error":
                    lines.append(f"{method}: {event[1]}")
                else:
                    result = event[1]
                    done.append((str(result.image_path), f"{method} · {result.status}"))
                    lines.append(f"{method}: {result_text(result)}")
                    stopped = result.status == "interrupted"  # a Stop ends the whole comparison
            yield done, "\n".join(lines)
        yield done, "\n".join(lines + ["stopped" if stopped else "finished comparing " + ", ".join(chosen)])
        if not done:  # every method failed: the client hears it as an error, not as an empty gallery
            raise page_error("error: " + "; ".join(lines))

    def stop(self, request=None):
        """Stop the session's current run (or comparison)."""
        self.runner.request_stop(self.session_of(request))


def on_disk(model: str) -> bool:
    """Return whether a model loads without the network: a toy world, a local folder, or a hub id (or short name)
    whose model_index.json is in the Hugging Face cache. Reads the cache only: never touches the network."""
    from guidance.models import FAMILIES, world

    if world(model) is not None or Path(model).expanduser().is_dir():
        return True
    from huggingface_hub import try_to_load_from_cache

    hub_id = FAMILIES[model].hub_id if model in FAMILIES else model
    try:
        return isinstance(try_to_load_from_cache(hub_id, "model_index.json"), str)
    except ValueError:  # not a hub id at all (huggingface_hub's HFValidationError)
        return False


def build_app(model: str | None = None, save_dir: str | Path = "outputs/app", device: str | None = None,
              precision: str = "fp32", tensorboard: str | None = None, any_model: bool = True,
              max_steps: int | None = None):
    """Return (the gr.Blocks page, its Runner).

    any_model=False offers only the listed models that are already on this machine (the start model, the toy worlds,
    SD 2.1-base when its files are in the cache): for a page served beyond this machine, where a visitor should not
    make the server download or open whatever model it names. max_steps: the step ceiling (None: MAX_STEPS).
    """
    from guidance.models import DEFAULT_MODEL, worlds

    model = model or default_model()
    model_choices = list(dict.fromkeys([model, *worlds(), DEFAULT_MODEL]))
    if not any_model:
        model_choices = [m for m in model_choices if on_disk(m)]
    runner = Runner(save_dir, device=device, precision=precision, tensorboard=tensorboard,
                    models=None if any_model else model_choices, max_steps=max_steps)
    page, ui = layout(model, model_choices, any_model, runner.step_limit(model), runner.limits_text())
    wire(page, ui, Handlers(runner))
    page.queue(default_concurrency_limit=1)
    return page, runner


def layout(model: str, model_choices: list[str], any_model: bool, step_limit: int, limits: str = ""):
    """Return (the gr.Blocks page, {elem_id: component}) laid out, without any event wired."""
    import gradio as gr

    from guidance.models import world

    methods, generators = loss_types(), generator_choices()
    first = "sds" if "sds" in methods else methods[0]
    example_prompt, example_edit, source_default = example_for(model)
    source_default = source_default or Path()  # a world without edit sources (toy3d) starts with none
    ui = {}
    with gr.Blocks(title="Score distillation: watch it work",
                   delete_cache=(CACHE_SWEEP_SECONDS, CACHE_MAX_AGE_SECONDS)) as page:
        gr.Markdown("## Score distillation: watch it work\n"
                    "Distil an image with any method; it updates every few steps. "
                    + f"The model: {getattr(world(model), 'description', model)}. {limits}")
        with gr.Row():
            with gr.Column(scale=1):
                ui["prompt"] = gr.Textbox(label="Prompt", value=example_prompt, elem_id="prompt")
                ui["method"] = gr.Dropdown(methods, value=first, label="Method", elem_id="method")
                edits = method_info(first).edits
                ui["edit_prompt"] = gr.Textbox(label="Edit prompt", value=example_edit, elem_id="edit_prompt",
                                               visible=edits)
                ui["source"] = gr.Image(label="Source image", type="filepath", elem_id="source", visible=edits,
                                        height=200, value=str(source_default) if source_default.is_file() else None)
                ui["model"] = gr.Dropdown(model_choices, value=model, label="Model", allow_custom_value=any_model,
                                          elem_id="model")
                with gr.Row():
                    # A text box, so that blank (the method's default) is a value the page and the API can send.
                    ui["guidance"] = gr.Textbox(label="Guidance scale", value="", elem_id="guidance",
                                                placeholder=f"blank: {first}'s default, "
                                                            f"{method_info(first).guidance_scale:g}")
                    ui["steps"] = gr.Number(label="Steps", value=min(method_info(first).steps, step_limit),
                                            precision=0, minimum=1, elem_id="steps")
                    ui["seed"] = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                ui["generator"] = gr.Dropdown(generators[0], label="Generator", value=generators[1],
                                              elem_id="generator")
                ui["mesh"] = gr.Dropdown(list(APP_MESHES), value=APP_MESHES[0], label="Mesh to paint (built in)",
                                         elem_id="mesh", visible=False)
                ui["log_guidance"] = gr.Checkbox(value=True, label="Show what the guidance sees (x_t, x0_hat, |grad|)",
                                                 elem_id="log_guidance")
                with gr.Row():
                    ui["run"] = gr.Button("Run", variant="primary", elem_id="run")
                    ui["stop"] = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column(scale=2):
                with gr.Row():
                    ui["result"] = gr.Image(label="Result", elem_id="result", format="png", interactive=False,
                                            height=320)
                    ui["loss"] = gr.LinePlot(x="step", y=LOSS_AXIS, label="Loss", elem_id="loss", height=320)
                ui["status"] = gr.Textbox(label="Status", elem_id="status", interactive=False, lines=2)
                ui["guidance_panel"] = gr.Image(
                    label="What the guidance sees (every 25 steps): x · x_t · x0_hat (where the guidance points) · "
                          "|grad|", elem_id="guidance_panel", format="png", interactive=False, height=170)
                ui["downloads"] = gr.File(label="Downloads: the PNG (and mesh) and the run folder (zip)",
                                          file_count="multiple", elem_id="downloads", interactive=False)
                with gr.Row():  # a 3D generator's (nerf, mesh) mesh and turntable, once its run has finished
                    ui["model3d"] = gr.Model3D(label="The mesh (nerf, mesh generators)", elem_id="model3d",
                                               height=280, interactive=False)
                    ui["turntable"] = gr.Image(label="Turntable", elem_id="turntable", format="gif",
                                               interactive=False, height=280)
        with gr.Accordion("Compare methods: same prompt and seed, side by side", open=True):
            with gr.Row():
                ui["compare_methods"] = gr.CheckboxGroup(methods, value=[m for m in ("sds", "vsd") if m in methods],
                                                         label=f"Methods (up to {MAX_COMPARE})",
                                                         elem_id="compare_methods", scale=3)
                ui["compare"] = gr.Button("Compare", elem_id="compare", scale=1)
            ui["compare_result"] = gr.Gallery(label="Compared", columns=MAX_COMPARE, height=340,
                                              elem_id="compare_result", format="png", object_fit="contain")
            ui["compare_status"] = gr.Textbox(label="Compare status", elem_id="compare_status", interactive=False,
                                              lines=2)
    return page, ui


def wire(page, ui: dict, handlers: Handlers) -> None:
    """Connect the page's events to the handlers: Run and Compare share the one model (one at a time), Stop does not
    wait; the API names are /run, /compare and /stop."""
    import gradio as gr

    def run(prompt, method, steps, seed, edit_prompt=None, source=None, guidance=None, model=None, generator=None,
            log_guidance=True, mesh=None, request: gr.Request = None):
        yield from handlers.run(prompt, method, steps, seed, edit_prompt, source, guidance, model, generator,
                                log_guidance, mesh, request)

    def compare(prompt, chosen, steps, seed, edit_prompt=None, source=None, guidance=None, model=None, generator=None,
                log_guidance=True, request: gr.Request = None):
        yield from handlers.compare(prompt, chosen, steps, seed, edit_prompt, source, guidance, model, generator,
                                    log_guidance, request)

    def stop(request: gr.Request = None):
        handlers.stop(request)

    with page:
        common = [ui[k] for k in ("edit_prompt", "source", "guidance", "model", "generator", "log_guidance")]
        ui["method"].change(handlers.method_changed, ui["method"],
                            [ui["edit_prompt"], ui["source"], ui["guidance"], ui["steps"]], api_visibility="private")
        # preprocess=False: the handlers get what the client sent, unconverted, and check every value themselves, so
        # that a bad one (seed "x", 1.5, a text file named .png, a 20000 x 20000 PNG) is a message the client and
        # the page receive, not an error inside Gradio's conversion (which they see as a bare "Error").
        ui["generator"].change(lambda generator: gr.update(visible=generator == "mesh"), ui["generator"],
                               ui["mesh"], api_visibility="private")
        ui["run"].click(run, [ui["prompt"], ui["method"], ui["steps"], ui["seed"], *common, ui["mesh"]],
                        [ui["result"], ui["status"], ui["loss"], ui["downloads"], ui["guidance_panel"],
                         ui["model3d"], ui["turntable"]],
                        api_name="run", concurrency_id="model", concurrency_limit=1, preprocess=False)
        ui["compare"].click(compare, [ui["prompt"], ui["compare_methods"], ui["steps"], ui["seed"], *common],
                            [ui["compare_result"], ui["compare_status"]], api_name="compare", concurrency_id="model",
                            concurrency_limit=1, preprocess=False)
        ui["stop"].click(stop, None, None, api_name="stop", concurrency_limit=None)


def launch(page, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, save_dir: str | Path = "outputs/app",
           block: bool = True):
    """Serve the page on host:port (blocking unless block=False); return the page."""
    page.launch(server_name=host, server_port=port, allowed_paths=[str(Path(save_dir).resolve())],
                show_error=False, ssr_mode=False, css=CSS, prevent_thread_lock=not block, quiet=not block,
                max_file_size=MAX_UPLOAD)
    return page


def check_port(host: str, port: int) -> None:
    """Raise UserError (one line) unless this process can listen on host:port: a port in use or out of range, or an
    address that is not this machine's, fails here, before anything loads."""
    import errno

    from utils import UserError

    if not 0 < port < 65536:
        raise UserError(f"--port {port} is not a port: give one in 1-65535, e.g. --port {DEFAULT_PORT}")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no obstacle
            probe.bind(address)
    except socket.gaierror as err:
        raise UserError(f"--host {host} is not an address ({err.strerror}): give 127.0.0.1 (this machine only) or "
                        f"0.0.0.0 (every network)") from None
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use (another app.py?): choose another --port, e.g. --port "
                            f"{port + 1 if port < 65535 else DEFAULT_PORT}") from None
        if err.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"--host {host} is not an address of this machine: give 127.0.0.1 (this machine only) or "
                            f"0.0.0.0 (every network)") from None
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror or err}): choose another --port, e.g. "
                        f"--port {DEFAULT_PORT}") from None


def start_model(requested: str | None, public: bool) -> str:
    """Return the model the page starts with. A server open to the network loads only models already on this machine:
    a --model that is not is an error; the default (Stable Diffusion on a CUDA machine) gives way to a toy world."""
    from guidance.models import worlds
    from utils import UserError

    model = requested or default_model()
    if not public or on_disk(model):
        return model
    if requested:
        raise UserError(f"--model {model} is not on this machine, and a page served to the network loads only models "
                        f"already here: download it first (`hf download {model}`), give a local folder, or --model "
                        f"{next(iter(worlds()))}")
    fallback = next(iter(worlds()))
    print(f"note: {model} is not on this machine and a page served to the network downloads nothing: starting with "
          f"the {fallback} world", file=sys.stderr)
    return fallback


def serve(page, runner: Runner, host: str, port: int, save_dir: Path) -> int:
    """Serve the page until Ctrl-C or SIGTERM; then stop the run in progress as Stop does (it ends 'interrupted', its
    image kept), close the server and return 130 (Ctrl-C, as every script here) or 0 (SIGTERM: a service's stop)."""
    from utils import UserError

    received: list[int] = []
    wake = threading.Event()

    def on_signal(signum, frame) -> None:
        if received:  # a second Ctrl-C: do not wait for the run any longer
            print("stopping now, without waiting for the run", file=sys.stderr, flush=True)
            os._exit(130)
        received.append(signum)
        wake.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        launch(page, host, port, save_dir, block=False)
    except OSError as err:  # the port was taken since check_port
        raise UserError(f"cannot serve on {host}:{port} ({str(err).splitlines()[0]}): choose another --port") from None
    print(f"Serving on http://{host}:{port}/ (Ctrl-C to stop); runs go to {save_dir}", flush=True)
    while not wake.wait(0.5):
        pass
    print("stopping: the run in progress (if any) ends as Stop ends it, keeping its image", file=sys.stderr, flush=True)
    ended = runner.shutdown()
    page.close()  # (it gives the pages' open connections up to 5 s to end)
    clear_cache(page)
    code = 130 if received[0] == signal.SIGINT else 0
    if not ended:  # a run still inside a model load or a step: leaving normally would abort in its native code
        print(f"a run did not end within {SHUTDOWN_SECONDS} s; stopping without it", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code)
    return code


def clear_cache(page) -> None:
    """Delete what this server put in Gradio's cache (previews, results). Gradio does it when its server stops only once
    every page has closed its connection (an open tab keeps one), so it is done here, after the server has stopped."""
    try:
        from gradio.route_utils import delete_files_created_by_app
    except ImportError:  # a Gradio without it: its periodic cleanup (delete_cache) still bounds the cache
        return
    delete_files_created_by_app(page, age=None)


def build_parser() -> argparse.ArgumentParser:
    from utils import CliParser

    p = CliParser(description="A local web page that runs score distillation and shows the image as it forms.")
    p.add_argument("--model", default=None,
                   help="the model to start with: 'toy', a hub id or a local diffusers folder (default: toy without "
                        "CUDA, Stable Diffusion 2.1-base with it); the page can switch")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 for every network, "
                        f"and then the page offers only the models already on this machine)")
    p.add_argument("--save_dir", default="outputs/app", help="where runs are written, one folder each")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--tensorboard", default=None, metavar="DIR", help="also log every run for TensorBoard in DIR")
    p.add_argument("--max_steps", type=int, default=None, metavar="N",
                   help="the most steps one run may take (default: " + ", ".join(
                       f"{n} for {kind}" for kind, n in MAX_STEPS.items()) + ")")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from utils import UserError

    check_port(args.host, args.port)  # before anything loads
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max_steps {args.max_steps} must be at least 1")
    from utils import check_writable_dir, resolve_device

    resolve_device(args.device)
    save_dir = check_writable_dir(args.save_dir)
    if args.tensorboard:
        from guidance.diagnostics import require_tensorboard

        require_tensorboard()
        check_writable_dir(args.tensorboard, flag="--tensorboard", what="folder")
    public = args.host not in LOCAL_HOSTS
    if public:
        from guidance.models import work_offline

        work_offline("served to the network, the app downloads nothing")  # models on disk only, from the cache
    model = start_model(args.model, public)
    page, runner = build_app(model, save_dir, args.device, args.precision, args.tensorboard, any_model=not public,
                             max_steps=args.max_steps)
    return serve(page, runner, args.host, args.port, save_dir)


if __name__ == "__main__":
    from utils import run_cli

    run_cli(main)
