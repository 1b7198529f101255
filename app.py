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

import argparse
import os
import queue
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry: the app works offline

REPO = Path(__file__).resolve().parent
DEFAULT_PORT = 7860
DEFAULT_HOST = "127.0.0.1"  # this machine only, unless told otherwise
PREVIEW_SECONDS = 0.25  # at most this often a live preview goes to the page
LOSS_POINTS = 400  # the loss curve is drawn from at most this many points
LOSS_AXIS = "log10 loss"
MAX_COMPARE = 4
# The example a Stable Diffusion page starts with (a toy world's page starts with its world's own example).
SD_EXAMPLE = ("A castle next to a river", "A rainbow castle next to a river",
              REPO / "data" / "imgs" / "A_castle_next_to_a_river.png")
# The toy's 64x64 images, shown large with their pixels sharp (the files stay at their own size).
CSS = """
#result img { width: 100%; height: 100%; object-fit: contain; }
#result img, #compare_result img, #guidance_panel img { image-rendering: pixelated; }
"""


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
                 tensorboard: str | None = None, models: list[str] | None = None):
        self.save_root = Path(save_root)
        self.device, self.precision, self.tensorboard = device, precision, tensorboard
        self.models = models  # the models a page may ask for (None: any hub id or local folder)
        self.model_name, self.model = None, None
        self.stop_flags: dict[str, threading.Event] = {}  # session -> the stop flag of its current run
        self.lock = threading.Lock()  # guards the stop flags and the folder counter
        # Held while a run uses the model. The event queue already runs one run at a time, but a run whose page
        # went away still finishes its step in the background: the next one waits for it here.
        self.model_lock = threading.Lock()
        self.counter = 0

    # -- arguments and model
    def make_args(self, prompt, method, steps, seed, edit_prompt=None, source=None, guidance=None, model=None,
                  generator=None, log_guidance=True, save_dir=None):
        """Return the resolved run configuration of one run (UserError for anything main.py would refuse)."""
        from guidance.config import RunConfig
        from utils import UserError

        methods = loss_types()
        if method not in methods:
            raise UserError(f"unknown method {method!r}: choose one of {', '.join(methods)}")
        model = (model or "").strip() or default_model()
        if self.models is not None and model not in self.models:
            raise UserError(f"model {model!r} is not offered by this server: choose one of {', '.join(self.models)}")
        edits = method_info(method).edits
        config = RunConfig(
            prompt=prompt or "", loss_type=method, model=model,
            step=None if steps in (None, "") else _whole(steps, "steps"),
            seed=0 if seed in (None, "") else _whole(seed, "seed"),
            guidance_scale=None if guidance is None or not str(guidance).strip() else _number(guidance, "guidance"),
            edit_prompt=(edit_prompt or None) if edits else None, src_img_path=(source or None) if edits else None,
            generator=generator or RunConfig.generator, device=self.device, precision=self.precision,
            tensorboard=self.tensorboard, save_dir=str(save_dir or self.new_save_dir()))
        config.log_guidance = bool(log_guidance) and config.log_step > 0
        return config.resolved()

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

    # -- one run, as a stream of events
    def stream(self, args, session: str):
        """Yield ('progress', step, total, t, losses, image) in a run, then ('done', result) or ('error', text)."""
        import main
        from utils import torch_to_pil

        updates: queue.Queue = queue.Queue()
        flag = self.new_stop_flag(session)
        last = [0.0]

        def callback(info) -> None:
            now = time.monotonic()
            if info.step == info.total or now - last[0] >= PREVIEW_SECONDS:
                last[0] = now
                updates.put(("progress", info.step, info.total, info.t, list(info.losses),
                             torch_to_pil(info.image()[:1].cpu())))

        def work() -> None:
            try:
                with self.model_lock:
                    model = self.get_model(args)
                    model.get_text_embeds(args.prompt)  # a prompt the model refuses fails here, before any file
                    if method_info(args.loss_type).edits:
                        model.get_text_embeds(args.edit_prompt)
                    result = main.run(model, args, progress=False, callback=callback, should_stop=flag.is_set)
                updates.put(("done", result))
            except Exception as err:  # noqa: BLE001 (every failure must reach the page, and the server go on)
                updates.put(("error", describe_error(err)))

        threading.Thread(target=work, name="distil", daemon=True).start()
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


def _number(value, name: str) -> float:
    from utils import UserError

    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} {value!r} is not a number: give e.g. 7.5, or leave it blank for the method's "
                        f"default") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise UserError(f"{name} {value!r} must be a finite number")
    return number


def _whole(value, name: str) -> int:
    from utils import UserError

    number = _number(value, name)
    if number != int(number):
        raise UserError(f"{name} {value} must be a whole number")
    return int(number)


def describe_error(err: BaseException) -> str:
    """Return the one line the page shows for an error: the CLI's message for user errors, a pointer for bugs."""
    from utils import UserError

    if isinstance(err, UserError):
        return f"error: {err}"
    traceback.print_exception(err, file=sys.stderr)
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    return f"error: {err.__class__.__name__}: {first} (a bug: the traceback is in the app's log)"


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

    @staticmethod
    def method_changed(method):
        """Return the page updates for a newly chosen method: edit fields shown or hidden, its defaults."""
        import gradio as gr

        info = method_info(method)
        return (gr.update(visible=info.edits), gr.update(visible=info.edits),
                gr.update(placeholder=f"blank: {method}'s default, {info.guidance_scale:g}"),
                gr.update(value=info.steps))

    def run(self, prompt, method, steps, seed, edit_prompt=None, source=None, guidance=None, model=None,
            generator=None, log_guidance=True, request=None):
        """Run one method; stream (image, status, loss curve, downloads, newest guidance panel)."""
        try:
            args = self.runner.make_args(prompt, method, steps, seed, edit_prompt, source, guidance, model, generator,
                                         log_guidance)
        except Exception as err:  # noqa: BLE001
            yield None, describe_error(err), loss_frame([]), None, None
            return
        yield None, f"starting {method} with {args.model} ({args.step} steps)", loss_frame([]), None, None
        for event in self.runner.stream(args, self.session_of(request)):
            if event[0] == "progress":
                _, step, total, t, losses, image = event
                yield (image, progress_text(method, step, total, t, losses), loss_frame(losses), None,
                       newest_panel(args))
            elif event[0] == "error":
                yield None, event[1], loss_frame([]), None, None
            else:
                result = event[1]
                files = [str(result.image_path), str(zip_run(result))]
                yield (str(result.image_path), result_text(result), loss_frame(result.losses), files,
                       newest_panel(args))

    def compare(self, prompt, chosen, steps, seed, edit_prompt=None, source=None, guidance=None, model=None,
                generator=None, log_guidance=True, request=None):
        """Run up to four methods on one prompt and seed, one after another; stream the gallery and a status."""
        methods = loss_types()
        chosen = [m for m in methods if m in (chosen or [])]
        if not chosen or len(chosen) > MAX_COMPARE:
            yield [], f"error: choose one to {MAX_COMPARE} methods to compare (chose {len(chosen)})"
            return
        root = self.runner.new_save_dir("-compare")
        try:
            all_args = [self.runner.make_args(prompt, m, steps if steps else None, seed, edit_prompt, source, guidance,
                                              model, generator, log_guidance, save_dir=root / m) for m in chosen]
        except Exception as err:  # noqa: BLE001
            yield [], describe_error(err)
            return
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

    def stop(self, request=None):
        """Stop the session's current run (or comparison)."""
        self.runner.request_stop(self.session_of(request))


def build_app(model: str | None = None, save_dir: str | Path = "outputs/app", device: str | None = None,
              precision: str = "fp32", tensorboard: str | None = None, any_model: bool = True):
    """Return (the gr.Blocks page, its Runner).

    any_model=False offers only the listed models (the start model, the toy worlds, SD 2.1-base): for a page served
    beyond this machine, where a visitor should not make the server download or open whatever model it names.
    """
    from guidance.models import DEFAULT_MODEL, worlds

    model = model or default_model()
    model_choices = list(dict.fromkeys([model, *worlds(), DEFAULT_MODEL]))
    runner = Runner(save_dir, device=device, precision=precision, tensorboard=tensorboard,
                    models=None if any_model else model_choices)
    page, ui = layout(model, model_choices, any_model)
    wire(page, ui, Handlers(runner))
    page.queue(default_concurrency_limit=1)
    return page, runner


def layout(model: str, model_choices: list[str], any_model: bool):
    """Return (the gr.Blocks page, {elem_id: component}) laid out, without any event wired."""
    import gradio as gr

    from guidance.models import world

    methods, generators = loss_types(), generator_choices()
    first = "sds" if "sds" in methods else methods[0]
    example_prompt, example_edit, source_default = example_for(model)
    ui = {}
    with gr.Blocks(title="Score distillation: watch it work") as page:
        gr.Markdown("## Score distillation: watch it work\n"
                    "Distil an image with any method; it updates every few steps. "
                    + f"The model: {getattr(world(model), 'description', model)}.")
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
                    ui["steps"] = gr.Number(label="Steps", value=method_info(first).steps, precision=0, minimum=1,
                                            elem_id="steps")
                    ui["seed"] = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                ui["generator"] = gr.Dropdown(generators[0], label="Generator", value=generators[1],
                                              elem_id="generator")
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
                ui["downloads"] = gr.File(label="Downloads: the PNG and the run folder (zip)", file_count="multiple",
                                          elem_id="downloads", interactive=False)
        with gr.Accordion("Compare methods: same prompt and seed, side by side", open=True):
            with gr.Row():
                ui["compare_methods"] = gr.CheckboxGroup(methods, value=[m for m in ("sds", "vsd") if m in methods],
                                                         label=f"Methods (up to {MAX_COMPARE})",
                                                         elem_id="compare_methods", scale=3)
                ui["compare"] = gr.Button("Compare", elem_id="compare", scale=1)
            ui["compare_result"] = gr.Gallery(label="Compared", columns=MAX_COMPARE, height=300,
                                              elem_id="compare_result", format="png", object_fit="contain")
            ui["compare_status"] = gr.Textbox(label="Compare status", elem_id="compare_status", interactive=False,
                                              lines=2)
    return page, ui


def wire(page, ui: dict, handlers: Handlers) -> None:
    """Connect the page's events to the handlers: Run and Compare share the one model (one at a time), Stop does not
    wait; the API names are /run, /compare and /stop."""
    import gradio as gr

    def run(prompt, method, steps, seed, edit_prompt=None, source=None, guidance=None, model=None, generator=None,
            log_guidance=True, request: gr.Request = None):
        yield from handlers.run(prompt, method, steps, seed, edit_prompt, source, guidance, model, generator,
                                log_guidance, request)

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
        ui["run"].click(run, [ui["prompt"], ui["method"], ui["steps"], ui["seed"], *common],
                        [ui["result"], ui["status"], ui["loss"], ui["downloads"], ui["guidance_panel"]],
                        api_name="run", concurrency_id="model", concurrency_limit=1)
        ui["compare"].click(compare, [ui["prompt"], ui["compare_methods"], ui["steps"], ui["seed"], *common],
                            [ui["compare_result"], ui["compare_status"]], api_name="compare", concurrency_id="model",
                            concurrency_limit=1)
        ui["stop"].click(stop, None, None, api_name="stop", concurrency_limit=None)


def launch(page, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, save_dir: str | Path = "outputs/app",
           block: bool = True):
    """Serve the page on host:port (blocking unless block=False); return the page."""
    page.launch(server_name=host, server_port=port, allowed_paths=[str(Path(save_dir).resolve())],
                show_error=False, ssr_mode=False, css=CSS, prevent_thread_lock=not block, quiet=not block)
    return page


def build_parser() -> argparse.ArgumentParser:
    from utils import CliParser

    p = CliParser(description="A local web page that runs score distillation and shows the image as it forms.")
    p.add_argument("--model", default=None,
                   help="the model to start with: 'toy', a hub id or a local diffusers folder (default: toy without "
                        "CUDA, Stable Diffusion 2.1-base with it); the page can switch")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 for every network)")
    p.add_argument("--save_dir", default="outputs/app", help="where runs are written, one folder each")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--tensorboard", default=None, metavar="DIR", help="also log every run for TensorBoard in DIR")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from utils import check_writable_dir, resolve_device

    resolve_device(args.device)
    save_dir = check_writable_dir(args.save_dir)
    if args.tensorboard:
        from guidance.diagnostics import require_tensorboard

        require_tensorboard()
        check_writable_dir(args.tensorboard)
    local = args.host in ("127.0.0.1", "localhost", "::1")
    page, _ = build_app(args.model, save_dir, args.device, args.precision, args.tensorboard, any_model=local)
    print(f"Serving on http://{args.host}:{args.port}/ (Ctrl-C to stop); runs go to {save_dir}")
    launch(page, args.host, args.port, save_dir)
    return 0


if __name__ == "__main__":
    from utils import run_cli

    run_cli(main)
