"""The one optimisation loop: x = g(theta; c), a method's loss on x, AdamW on theta; and the samplers' twin.

    result = run(model, config)          # config: guidance.config.RunConfig, resolved; model: guidance.load_model

`run` reads top to bottom on one screen (nanoGPT's train loop, diffusers' numbered __call__): start the run
(folder, seed, prompts, theta, optimiser), then per step: the view, the latents, the loss, backward, the update,
the watchers; then finish (images, files, record). Everything optional is a small watcher object it calls, never
an inline branch: progress images, guidance panels and TensorBoard, the caller's callback (the app's live
preview), the stop request, the loss reader that finds a NaN (and steps back to the last finite theta on GPUs,
where losses are read once per window), the UNet-row counter. Samplers (ddim) share the start and the finish.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from guidance.common import (atomic_write_bytes, get_cosine_schedule_with_warmup, load_image, pil_to_torch,
                             save_image_atomic, save_torch_atomic, seed_everything, torch_to_pil)
from guidance.core import TimestepSchedule
from guidance.generators import from_config as generator_from_config
from guidance.methods import METHODS, StepContext
from guidance.runfolder import RunFolder, changed_settings

LOSS_SCALE = 2000.0  # the course multiplies every loss by 2000 before backward
WARMUP_STEPS = 100
# Steps between reads of the loss (each read waits for the device): every step on a CPU, where it costs nothing.
LOSS_READ_EVERY = {"cpu": 1, "default": 25}


@dataclass
class StepInfo:
    """What run() tells its callback after each optimisation step."""

    step: int  # steps done, 1..total
    total: int
    loss: float | None  # this step's loss; None until it is read (on a GPU every LOSS_READ_EVERY steps)
    losses: list  # every loss read so far, losses[i] of step i (run()'s own list: read it, do not change it)
    t: int | None  # the timestep this step's loss used (None for a model that does not record it)
    lr: float  # the learning rate this step's update used
    image: Callable[[], torch.Tensor]  # decodes the current latents on demand: [B, 3, H, W] in [0, 1]


@dataclass
class RunResult:
    """What one distillation run produced."""

    status: str  # finished | diverged | interrupted
    image_path: Path | None
    run_dir: Path
    steps_done: int
    losses: list = field(default_factory=list)
    seconds: float = 0.0
    latents: torch.Tensor | None = None  # the final latents, unclamped (the toy world's image itself)


class StopRequested(Exception):
    """Raised inside run() when should_stop() says so: the run ends like Ctrl-C ('interrupted', image kept)."""


class Diverged(Exception):
    """Raised inside run() when a loss read back is NaN or inf; .step is the first such step."""

    def __init__(self, step: int):
        super().__init__(f"the loss became NaN/inf at step {step}")
        self.step = step


# ----------------------------------------------------------------------------------------------- the loop
def run(model, config, progress: bool = True, init_latents: torch.Tensor | None = None,
        callback: Callable[[StepInfo], None] | None = None, should_stop: Callable[[], bool] | None = None) -> RunResult:
    """Return the result of optimising one image (or 3D scene) with config's method against a loaded model, writing
    its run folder (guidance/runfolder.py).

    init_latents, if given, replaces the starting latents (e.g. SDS started from a source image's latents).
    callback, if given, gets a StepInfo after every step (StepInfo.image() decodes the current image: call it
    inside the callback, and only as often as needed). should_stop, if given, is asked before every step; when it
    returns True the run ends as Ctrl-C ends it: status 'interrupted', the current image in interrupted.png.
    """
    state = RunState.start(model, config, init_latents)
    if state.method.sampler is not None:
        return state.sample(progress)
    watchers = Watchers(state, progress, callback, should_stop)
    status, steps_done = "finished", config.step
    try:
        for step in watchers.steps():
            view = state.sample_view(step)
            state.optimizer.zero_grad(set_to_none=True)
            latents = state.generator.latents(model, view)
            loss = state.loss(latents, step, view)
            watchers.after_loss(step, latents, loss)
            (LOSS_SCALE * loss + state.generator.regularization()).backward()
            state.optimizer.step()
            state.scheduler.step()
            watchers.after_step(step)
    except Diverged as err:
        status, steps_done = "diverged", err.step
    except (KeyboardInterrupt, StopRequested):
        status, steps_done = "interrupted", watchers.steps_done
    finally:
        watchers.close()
    return state.finish(status, steps_done, watchers)


def view_sampler(config, generator) -> Callable[[int], object]:
    """Return the function that gives each step's view c: cameras drawn from the run's ranges for a 3D generator
    (needs_cameras), else the generator's own (None, or --augment's random crop and warp)."""
    if generator.needs_cameras:
        from guidance.cameras import CameraSampler

        return CameraSampler(config.camera_ranges(), config.views_per_step,
                             torch.Generator().manual_seed(int(config.seed) + 1))
    return lambda step: generator.sample_view()


@dataclass
class RunState:
    """Everything a run holds between its steps: built once by start(), written out once by finish()."""

    model: object
    config: object
    method: object
    folder: RunFolder
    record: dict
    context: StepContext
    generator: object
    timesteps: TimestepSchedule
    optimizer: torch.optim.Optimizer
    scheduler: object
    sample_view: Callable
    init_latents: torch.Tensor
    first_step: int = 0  # where a resumed run goes on
    resumed_losses: list = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    writer: "ImageWriter" = field(default_factory=lambda: ImageWriter())

    @classmethod
    def start(cls, model, config, init_latents: torch.Tensor | None = None) -> "RunState":
        """Return a started run: its folder and record (status 'running'), seed, prompts, theta and optimiser."""
        method = METHODS[config.loss_type]
        folder = RunFolder(config.save_dir, config.name)
        record = dict(config.to_record(), name=folder.name, final_image=str(folder.image), status="running",
                      device=str(model.device), started=time.strftime("%Y-%m-%dT%H:%M:%S"), torch=torch.__version__,
                      command=sys.argv)
        resume = load_checkpoint(config) if config.resume else None  # read before the folder it may be in is cleared
        config.check_replace()
        folder.clear()  # nothing of an earlier run stays beside this one's files
        folder.write_config(record)
        model.reset_lora()  # a reused model starts every run pristine: no LoRA left over from an earlier VSD run
        seed_everything(config.seed)
        uncond = model.negative_embedding(config.negative_prompt)  # "" is the null prompt's (SDXL: zeros)
        text_embeddings = torch.cat([uncond, model.get_text_embeds(config.prompt)])
        latents, src_latents = initial_latents(model, config, folder)
        if init_latents is not None:
            latents = init_latents.detach().to(device=model.device, dtype=torch.float32).clone()
        folder.save_latents(latents, initial=True)
        # theta -> latents: the generator sits between the optimiser and the losses. Others than 'latent' start from
        # a fit to the image an edit starts from (or init_latents), else from their own initialisation.
        starts_from_image = src_latents is not None or init_latents is not None
        generator = generator_from_config(config, model, latents.requires_grad_(True),
                                          latents if starts_from_image else None)
        edit_embeddings = torch.cat([uncond, model.get_text_embeds(config.edit_prompt)]) if method.edits else None
        timesteps = timestep_schedule(model, config)
        context = StepContext(model, config, text_embeddings, edit_embeddings, src_latents, timesteps.min_step,
                              timesteps.max_step, view_prompts=view_prompts(config, generator),
                              perp_neg=bool(getattr(config, "perp_neg", False)))
        optimizer = torch.optim.AdamW(generator.param_groups(config.lr), lr=config.lr, weight_decay=0)
        scheduler = get_cosine_schedule_with_warmup(optimizer, WARMUP_STEPS, int(config.step * 1.5))
        state = cls(model, config, method, folder, record, context, generator, timesteps, optimizer, scheduler,
                    view_sampler(config, generator), latents.detach().clone())
        if resume is not None:
            state.restore(resume)
        return state

    def loss(self, latents: torch.Tensor, step: int, view) -> torch.Tensor:
        """Return the method's loss at this step and view (with --score_clip, its gradient clamped)."""
        loss = self.method.compute_loss(self.model, self.context.at_view(view), latents, self.timesteps(step), step)
        if self.config.score_clip:
            from guidance.core import reparam_loss
            from guidance.views import clip_score

            loss = reparam_loss(latents, clip_score(self.model.last_guidance["grad"], step))
        return loss

    def checkpoint(self, steps_done: int, losses: list) -> Path:
        """Save theta, the optimiser, the schedule, the random streams and VSD's LoRA to <run>/<generator>.pt; return
        the path."""
        state = {"generator": self.generator.checkpoint(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "steps_done": steps_done, "losses": list(losses),
                 "record": self.config.to_record(), "torch_rng": torch.get_rng_state(),
                 "camera_rng": self.sample_view.generator.get_state(), "generator_rng": self.generator.rng.get_state(),
                 "lora": self.model.lora_state()}
        return save_torch_atomic(state, self.folder.path(f"{self.generator.name}.pt"))

    def restore(self, saved: dict) -> None:
        """Go on from a checkpoint of this same run (UserError naming what differs otherwise)."""
        from guidance.common import UserError

        mine = self.config.to_record()
        names = [k for k in self.config.result_fields() if k != "step"]
        differ = [f"{k} {saved['record'].get(k)!r} (now {mine[k]!r})"
                  for k in changed_settings(saved["record"], mine, names)]
        if differ:
            raise UserError(f"--resume: the checkpoint is of another run ({', '.join(differ[:4])}): resume with its "
                            f"settings, or start afresh without --resume")
        if saved["steps_done"] >= self.config.step:
            raise UserError(f"--resume: the checkpoint has done {saved['steps_done']} steps already; give --step "
                            f"above that to go on")
        self.generator.restore(saved["generator"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.model.load_lora_state(saved.get("lora"))  # before the random streams: a new LoRA draws its init
        torch.set_rng_state(saved["torch_rng"])
        self.sample_view.generator.set_state(saved["camera_rng"])
        self.generator.rng.set_state(saved["generator_rng"])
        self.first_step, self.resumed_losses = int(saved["steps_done"]), list(saved["losses"])

    def sample(self, progress: bool) -> RunResult:
        """Return the result of a sampler method (ddim): the model's own sample, written as finish() writes a run."""
        counter = UnetRowCounter(self.model)
        with torch.no_grad():
            latents = self.method.sampler(self.model, self.context, self.init_latents)
        steps = self.config.ddim_steps
        images = self.model.decode_latents(latents)
        self.writer.save(images, self.folder.image)
        result = self._write(images, latents, "finished", steps, [], counter.close(), self.folder.image)
        if progress:
            print(f"{self.config.loss_type}: {steps} DDIM steps in {result.seconds:.1f} s")
        return result

    def finish(self, status: str, steps_done: int, watchers: "Watchers") -> RunResult:
        """Return the run's result after writing its image (or interrupted / last finite one) and every file."""
        if status == "finished" and not self.generator.finite():
            status = "diverged"
        with torch.no_grad():  # of the final theta (the loop's are one update behind); a 3D generator's front view
            latents = self.generator.latents(self.model, self.generator.final_view())
        images = self.generator.image(self.model)
        image_path = self.folder.image if status == "finished" else self.folder.unfinished_image(status)
        self.writer.save(images, image_path)
        self.generator.save(image_path.parent, image_path.stem)  # e.g. the vector generator's SVG beside the PNG
        watchers.finish()
        return self._write(images, latents, status, steps_done, watchers.losses, watchers.unet_rows, image_path)

    def _write(self, images, latents, status, steps_done, losses, unet_rows, image_path) -> RunResult:
        """Return the RunResult after writing particles, loss.csv, latents.pt and the final record."""
        if images.shape[0] > 1:
            for i in range(images.shape[0]):
                self.writer.save(images[i:i + 1], self.folder.particle_image(i))
        self.writer.close()
        self.folder.write_losses(losses)
        self.folder.save_latents(latents)
        seconds = time.perf_counter() - self.started
        self.record.update(status=status, steps_done=steps_done, seconds=round(seconds, 3),
                           finished=time.strftime("%Y-%m-%dT%H:%M:%S"), image=str(image_path),
                           max_abs=float(latents.detach().abs().max()), unet_rows=unet_rows,
                           unet_rows_per_step=unet_rows / steps_done if steps_done else None)
        self.folder.write_config(self.record)
        return RunResult(status, image_path, self.folder.dir, steps_done, losses, seconds, latents.detach())


def view_prompts(config, generator):
    """Return the run's ViewPrompts when its generator draws cameras (guidance/views.py), else None."""
    if not generator.needs_cameras:
        return None
    from guidance.views import ViewPrompts

    return ViewPrompts(config.prompt, enabled=not config.no_view_prompts, interpolate=config.view_interpolation,
                       ranges=config.camera_ranges())


def load_checkpoint(config) -> dict:
    """Return a checkpoint written by RunState.checkpoint (UserError for a file that is not one)."""
    from guidance.common import UserError

    try:
        saved = torch.load(config.resume, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 (any unreadable file is the user's to replace)
        raise UserError(f"--resume {config.resume}: not a checkpoint this toolkit wrote "
                        f"({err.__class__.__name__}); give <run>/{config.generator}.pt") from None
    if not isinstance(saved, dict) or not {"generator", "record", "steps_done"} <= set(saved):
        raise UserError(f"--resume {config.resume}: not a checkpoint of a run (write one with --checkpoint_every)")
    return saved


def initial_latents(model, config, folder: RunFolder):
    """Return (latents to optimise, source latents or None): N(0, I) at the model's size, or the encoded source (edits)."""
    if not METHODS[config.loss_type].edits:
        shape = model.latent_shape(config.num_particles)
        return torch.randn(shape, dtype=torch.float32).to(model.device), None
    source = load_image(config.src_img_path)
    height, width = model.source_size(source.height, source.width)
    if (height, width) != (source.height, source.width):
        source = source.resize((width, height), resample=3)  # bicubic
    save_image_atomic(source, folder.path("source.png"))
    src_latents = model.encode_imgs(pil_to_torch(source).to(model.device))
    return src_latents.clone(), src_latents


def timestep_schedule(model, config) -> TimestepSchedule:
    """Return the run's TimestepSchedule: config.t_schedule over config.t_range of the model's T timesteps."""
    n = model.schedule.num_train_timesteps
    low, high = config.t_range
    min_step, max_step = max(1, int(n * low)), min(n - 1, int(n * high))
    return TimestepSchedule(config.t_schedule, min_step, max_step, config.step, int(n * config.t_anneal_to))


def encode_then_free_text_encoders(model, prompts) -> None:
    """Encode prompts into a Stable Diffusion model's cache, then free its text encoders (a toy world has none)."""
    if prompts and hasattr(model, "free_text_encoders"):
        model.encode_prompts(prompts)
        model.free_text_encoders()


# ----------------------------------------------------------------------------------------------- watchers
class Watchers:
    """What the loop calls around each step: the loss reader, progress images, guidance logs, checkpoints (3D
    generators), the caller's callback and stop request, the progress bar and the UNet-row counter."""

    def __init__(self, state: RunState, progress: bool, callback, should_stop):
        self.state, self.callback, self.should_stop = state, callback, should_stop
        config = state.config
        self.reader = LossReader(state.generator, LOSS_READ_EVERY.get(state.model.device.type, LOSS_READ_EVERY["default"]),
                                 config.step, losses=state.resumed_losses)
        self.counter = UnetRowCounter(state.model)
        self.bar = tqdm(range(state.first_step, config.step), desc=f"{config.loss_type} {state.folder.name[:32]}",
                        disable=not progress, dynamic_ncols=True)
        self.checkpoint_every = config.checkpoint_every if state.generator.needs_cameras else 0
        self.diagnostics = None
        if config.log_guidance or config.tensorboard:
            from guidance.diagnostics import GuidanceLog

            tensorboard = config.tensorboard  # one TensorBoard run per method, prompt and seed
            self.diagnostics = GuidanceLog(state.folder.dir, config.log_step, config.log_guidance,
                                           Path(tensorboard, config.loss_type, state.folder.name, f"seed_{config.seed}")
                                           if tensorboard else None)
        self.steps_done, self.lr, self.unet_rows = state.first_step, 0.0, 0

    @property
    def losses(self) -> list:
        return self.reader.losses

    def steps(self):
        """Yield the step indices, asking the caller whether to stop before each one."""
        for step in self.bar:
            if self.should_stop is not None and self.should_stop():
                raise StopRequested
            self.reader.before_step(step)
            yield step

    def after_loss(self, step: int, latents: torch.Tensor, loss: torch.Tensor) -> None:
        """Read the loss when due (Diverged on NaN/inf), then log what the guidance saw, before the update."""
        value = self.reader.after_loss(step, loss)
        if value is not None:
            self.bar.set_postfix(loss=f"{value:.4g}", refresh=False)
        self.lr = self.state.scheduler.get_last_lr()[0]
        if self.diagnostics is not None:  # before the update: x, x_t, x0_hat and grad of this very step
            self.diagnostics.after_loss(step, self.state.model, latents, self.losses, self.lr)

    def after_step(self, step: int) -> None:
        """Save the progress image and the checkpoint when due, and tell the caller."""
        self.steps_done = step + 1
        state, config = self.state, self.state.config
        if config.log_step and (step % config.log_step == 0 or step == config.step - 1):
            state.writer.save(state.generator.image(state.model), state.folder.progress_image(step), compress_level=1)
        # Only a theta whose every loss was read finite (a NaN keeps the last finite checkpoint).
        if self.checkpoint_every and self.steps_done % self.checkpoint_every == 0 and not self.reader.pending \
                and state.generator.finite():
            state.checkpoint(self.steps_done, self.losses)
        if self.callback is not None:
            record = getattr(state.model, "last_guidance", None)
            losses = self.losses
            self.callback(StepInfo(step + 1, config.step, losses[-1] if len(losses) == step + 1 else None, losses,
                                   int(record["t"]) if record else None, self.lr,
                                   lambda: state.generator.image(state.model)))

    def close(self) -> None:
        """End the progress bar and the UNet-row count (also after an error)."""
        self.bar.close()
        self.unet_rows = self.counter.close()
        self.reader.flush(self.steps_done)

    def finish(self) -> None:
        """Write what the watchers keep for the end: the TensorBoard tail, the progress GIF."""
        if self.diagnostics is not None:
            self.diagnostics.close(self.losses)
        if self.state.config.gif:
            self.state.writer.close()
            write_progress_gif(self.state.folder)


class LossReader:
    """Reads each step's loss back, every step on a CPU and once per window of steps on a GPU, where a read makes the
    CPU wait for the device. A loss that turns NaN/inf raises Diverged at its step; on a GPU the later steps of its
    window already took the NaN gradients, so theta goes back to the window's start (the last finite image read)."""

    def __init__(self, generator, read_every: int, total: int, losses: list | None = None):
        self.generator, self.read_every, self.total = generator, read_every, total
        self.losses, self.pending, self.window_start, self.window_state = list(losses or []), [], 0, None

    def before_step(self, step: int) -> None:
        if not self.pending:
            self.window_start = step
            if self.read_every > 1:
                self.window_state = self.generator.state()

    def after_loss(self, step: int, loss: torch.Tensor) -> float | None:
        """Return the newest loss when this step read the window, else None; raise Diverged on a NaN/inf loss."""
        self.pending.append(loss.detach())
        if len(self.pending) < self.read_every and step != self.total - 1:
            return None
        values, self.pending = torch.stack(self.pending).tolist(), []
        bad = next((i for i, value in enumerate(values) if not math.isfinite(value)), None)
        if bad is not None:
            self.losses.extend(values[:bad])
            if self.window_state is not None:
                self.generator.load_state(self.window_state)
            raise Diverged(self.window_start + bad)
        self.losses.extend(values)
        return values[-1]

    def flush(self, steps_done: int) -> None:
        """Read the losses still pending when the run stops early (an interruption), up to steps_done."""
        if self.pending:
            self.losses.extend(torch.stack(self.pending).tolist()[:steps_done - len(self.losses)])
            self.pending = []


class UnetRowCounter:
    """Counts the batch rows of every UNet forward while it is open (forward hook); close() returns the count."""

    def __init__(self, model):
        self.rows = 0
        unet = getattr(getattr(model, "unet", None), "_orig_mod", getattr(model, "unet", None))
        self._handle = unet.register_forward_hook(self._count) if isinstance(unet, torch.nn.Module) else None

    def _count(self, module, inputs, output):
        self.rows += int(inputs[0].shape[0]) if inputs else 0

    def close(self) -> int:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return self.rows  # the same count when closed again


class ImageWriter:
    """Writes PNGs on a background thread so the optimisation loop never waits for PNG encoding."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = []

    def save(self, images: torch.Tensor, path: Path, compress_level: int = 6) -> None:
        """Queue the first image of a [B, 3, H, W] batch in [0, 1] to be written to path as a PNG (atomically)."""
        img = torch_to_pil(images.cpu())
        self.pending.append(self.pool.submit(save_image_atomic, img, path, compress_level))

    def close(self) -> None:
        """Wait for every queued image to be written (the writer can still be used after)."""
        for job in self.pending:
            job.result()
        self.pending = []


def write_progress_gif(folder: RunFolder, seconds_per_frame: float = 0.2) -> Path | None:
    """Return the path of <run>/progress.gif, an animation of the run's progress images (None if there are none)."""
    import io

    from PIL import Image

    frames = folder.progress_images()
    if not frames:
        return None
    images = [Image.open(f).convert("RGB") for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=int(seconds_per_frame * 1000), loop=0)
    path = folder.path("progress.gif")
    atomic_write_bytes(path, buffer.getvalue())
    return path
