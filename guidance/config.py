"""What a run is, in one place: the typed run configuration that main.py's flags fill, and that run_all.py, the app and
bench.py build directly.

`RunConfig` has one field per main.py flag (the flag is --<field>; its help, choices and CLI shape are the field's
metadata, read by `utils.add_config_arguments`). Fields left None take the method's default from guidance/methods.py
when the configuration is resolved (`resolved()`), which also checks everything that can be checked before a model
loads: each error names the bad value and the fix. A field's `result` metadata says whether it changes what a run
produces (False: device, logging, speed settings), so that run_all's "this finished run is stale" check covers every
new field without anyone listing it. Method-specific options (guidance/methods.py's OPTION_FLAGS) become fields
automatically.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from guidance.common import ON_OFF_AUTO, PRECISIONS, UserError, check_writable_dir, load_image, resolve_device
from guidance.core import T_SCHEDULES, VSD_LORA_TIMESTEPS
from guidance.generators import GENERATORS
from guidance.methods import DEFAULT_NEGATIVE_PROMPT, LOSS_TYPES, METHODS, OPTION_FLAGS
from guidance.models import DEFAULT_MODEL
from guidance.schedule import WEIGHTINGS

T_ANNEAL_TO = 0.5  # --t_schedule anneal: the largest t falls to this fraction of T
SEED_LIMIT = 2**63  # seeds are in [0, 2^63): torch's and NumPy's generators take them without wrapping


def setting(default=None, help: str = "", result: bool = True, **cli):
    """Return a dataclass field for a flag: its default, help, whether it changes a run's result, and argparse extras."""
    return field(default=default, metadata={"help": help, "result": result, "cli": cli})


def default_save_dir(loss_type: str, generator: str = "latent") -> Path:
    """Return the folder a run writes to without --save_dir: outputs/<loss_type> (the course's layout, what
    eval.py --fdir1 outputs/sds scores), outputs/<loss_type>_<generator> for a generator other than the latents."""
    return Path("outputs") / (loss_type if generator == "latent" else f"{loss_type}_{generator}")


def _per_method(attribute: str, fmt: str = "{}", skip=None) -> str:
    return ", ".join(f"{name} {fmt.format(getattr(m, attribute))}" for name, m in METHODS.items()
                     if skip is None or getattr(m, attribute) != skip)


_MethodOptions = dataclasses.make_dataclass(
    "_MethodOptions", [(dest, "object", setting(None, option.help, type=option.kind))
                       for dest, option in OPTION_FLAGS.items()])


@dataclass
class RunConfig(_MethodOptions):
    """One distillation run: the course's flags and ours (see main.py --help). None means 'the method's default'."""

    prompt: str = setting("", "generation prompt (PDS: the source image's prompt)", required=True)
    negative_prompt: str | None = setting(None, "prompt of the unconditional CFG row; default per method, as its authors' "
                                                "code: \"" + DEFAULT_NEGATIVE_PROMPT + "\" (the course's), \"\" for "
                                                + ", ".join(n for n, m in METHODS.items() if m.negative_prompt == "")
                                                + ", the paper's for nfsd")
    edit_prompt: str | None = setting(None, "editing methods (pds, dds, sds_edit): the target prompt")
    src_img_path: str | None = setting(None, "editing methods (pds, dds, sds_edit): the source image")
    save_dir: str | None = setting(None, "where the result and its run folder are written (default outputs/<loss_type>, "
                                         "the course's layout: eval.py --fdir1 outputs/sds; outputs/<loss_type>_"
                                         "<generator> for the other generators)", result=False)
    overwrite: bool = setting(False, "replace a finished result made with other settings (without it, such a run "
                                     "stops before it starts and says where the result is)", result=False)
    loss_type: str = setting("sds", "the method (see the list above)", choices=LOSS_TYPES)
    guidance_scale: float | None = setting(None, "default per method: " + _per_method("guidance_scale", "{:g}"),
                                           type=float)
    step: int | None = setting(None, "optimisation steps; default per method: " + _per_method("steps"), type=int)
    device: str | None = setting(None, "cpu, cuda, cuda:N, an integer GPU index, or mps (default: best available)",
                                 result=False)
    lr: float = setting(0.1, "AdamW learning rate of the latents", type=float)
    log_step: int = setting(25, "save a progress image every N steps (0: never)", result=False, type=int)
    precision: str = setting("fp32", "UNet / VAE precision (latents and optimiser stay float32)",
                             choices=tuple(PRECISIONS))
    model: str = setting(DEFAULT_MODEL, "short name (sd15, sd21, sd21-768, sdxl, sd35m), hub id, local diffusers "
                                         "folder, or the name of a toy world (see the README)")
    no_t5: bool = setting(False, "SD 3: leave the T5 text encoder unloaded (zeros in its place, as diffusers does; "
                                 "saves 9.5 GB in fp16)")
    lora_checkpointing: bool = setting(False, "VSD: recompute the denoiser's activations in the LoRA's backward "
                                              "(same result, much less memory, one more forward's time)", result=False)
    cpu_offload: bool = setting(False, "keep the text encoders and the VAE in CPU memory, on the GPU only while they "
                                       "run", result=False)
    seed: int = setting(0, "random seed, 0 <= seed < 2^63", type=int)
    weighting: str | None = setting(None, "w(t); default: the method's paper weighting (" + _per_method("weighting")
                                    + "; in the toy 3D world sigma_over_alpha where this says uniform)",
                                    choices=WEIGHTINGS)
    t_schedule: str | None = setting(None, "timestep per step: random (uniform), linear (max to min over the run), "
                                           "anneal (uniform under a falling max); default per method: "
                                     + _per_method("t_schedule", skip="random") + ", else random",
                                     choices=T_SCHEDULES)
    t_range: tuple | None = setting(None, "timesteps as fractions of T (default 0.02 0.98; dds 0.05 0.95)",
                                    type=float, nargs=2, metavar=("MIN", "MAX"))
    t_anneal_to: float = setting(T_ANNEAL_TO, f"--t_schedule anneal: the max t falls linearly to this fraction of T "
                                              f"(default {T_ANNEAL_TO})", type=float)
    num_particles: int = setting(1, "VSD particles (images optimised together)", type=int)
    generator: str = setting("latent", "what is optimised: the latents (the course), pixels, 2D gaussians, or vector "
                                       "shapes (also an SVG)", choices=GENERATORS)
    render_size: int | None = setting(None, "pixels / gaussians / vector: render size in pixels (default: the "
                                            "model's resolution)", type=int)
    num_shapes: int | None = setting(None, "gaussians / vector: how many (default 256)", type=int)
    pixel_size: int | None = setting(None, "pixels: theta's resolution, upsampled to the render", type=int)
    augment: bool = setting(False, "pixels / gaussians / vector: a random view (crop and perspective) of the render "
                                   "each step")
    # 3D generators (nerf: text-to-3D; mesh: a mesh's texture): cameras, view prompts, outputs
    views_per_step: int = setting(1, "nerf / mesh: cameras drawn per step, one render each", type=int)
    elevation_range: tuple | None = setting(None, "nerf / mesh: camera elevation in degrees (default -10 45)",
                                            type=float, nargs=2, metavar=("MIN", "MAX"))
    azimuth_range: tuple | None = setting(None, "nerf / mesh: camera azimuth in degrees, 0 = the front, +x (default "
                                                "-180 180)", type=float, nargs=2, metavar=("MIN", "MAX"))
    distance_range: tuple | None = setting(None, "nerf / mesh: camera distance from the origin; the object fits "
                                                 "in the unit sphere (default 1.5 2.0)", type=float, nargs=2,
                                           metavar=("MIN", "MAX"))
    fovy_range: tuple | None = setting(None, "nerf / mesh: vertical field of view in degrees (default 40 70)",
                                       type=float, nargs=2, metavar=("MIN", "MAX"))
    no_view_prompts: bool = setting(False, "nerf / mesh: the bare prompt for every camera (default: '<prompt>, "
                                           "front view' / side / back / overhead by the camera)")
    view_interpolation: bool = setting(False, "nerf / mesh: interpolate neighbouring views' embeddings by azimuth "
                                              "(stable-dreamfusion; default: each camera's own view's prompt)")
    perp_neg: bool = setting(False, "nerf / mesh with sds or ism: Perp-Neg, the other views as negative prompts "
                                    "(Armandpour et al. 2023; 2x the UNet rows)")
    score_clip: bool = setting(False, "clamp the gradient elementwise to c rising 0.5 -> 2.0 over 5000 steps "
                                      "(score clipping, Hong et al. 2023)")
    shading: str | None = setting(None, "nerf: albedo | lambertian | textureless | random (default random); mesh: "
                                        "albedo | lambertian | mixed (default mixed); toy worlds: albedo",
                                  choices=("albedo", "lambertian", "textureless", "random", "mixed"))
    background: str | None = setting(None, "nerf / mesh: random (a solid colour per view) | black | white; nerf "
                                           "also mlp (learned); toy worlds: black",
                                     choices=("random", "mlp", "black", "white"))
    latent_render: bool = setting(False, "nerf: render the model's latent channels directly, no VAE (Latent-NeRF; "
                                         "faster, unshaded)")
    lambda_orientation: float = setting(0.0, "nerf: weight of the orientation regulariser (normals facing away "
                                             "from the camera), in units of the scaled loss", type=float)
    lambda_sparsity: float = setting(0.0, "nerf: weight of the opacity sparsity regulariser", type=float)
    lambda_entropy: float = setting(0.0, "nerf: weight of the alpha entropy regulariser", type=float)
    mesh: str | None = setting(None, "mesh: what to paint: a .obj / .glb / .gltf / .ply / .stl file, or the "
                                     "built-in box or sphere")
    texture_size: int | None = setting(None, "mesh: texture side in texels, a power of two (default 512)",
                                       type=int)
    texture_param: str | None = setting(None, "mesh: network (a small CNN from fixed noise, Paint-it; default) or "
                                              "direct (the texels themselves)", choices=("network", "direct"))
    mesh_up: str | None = setting(None, "mesh: the file's up axis (default +y for .glb / .gltf / .obj, +z for "
                                        ".ply / .stl)", choices=("+x", "-x", "+y", "-y", "+z", "-z"))
    mesh_front: str | None = setting(None, "mesh: the file's front axis, seen at azimuth 0 (default +z for "
                                           ".glb / .gltf / .obj, -y for .ply / .stl)",
                                     choices=("+x", "-x", "+y", "-y", "+z", "-z"))
    turntable_frames: int = setting(60, "nerf / mesh: frames of the turntable written at the end", result=False,
                                    type=int)
    checkpoint_every: int = setting(100, "nerf / mesh: save theta (and the optimiser) to <run>/<generator>.pt "
                                         "every N steps (0: never)", result=False, type=int)
    resume: str | None = setting(None, "nerf / mesh: continue from a checkpoint (<run>/nerf.pt) of this same run",
                                 result=False, metavar="CHECKPOINT")
    lora_lr: float | None = setting(None, "VSD: AdamW learning rate of the LoRA (default: the model's, 1e-4 for SD)",
                                    type=float)
    vsd_lora_timestep: str = setting("fresh", "VSD: train the LoRA at a fresh t (default) or on the same x_t as the "
                                              "gradient (faster)", choices=VSD_LORA_TIMESTEPS)
    channels_last: str = setting("auto", "UNet in channels_last memory format (auto: on CUDA devices; "
                                         "--channels_last alone: on)", result=False, nargs="?", const="on",
                                 choices=ON_OFF_AUTO)
    compile: bool = setting(False, "torch.compile the UNet", result=False)
    cuda_graphs: str = setting("auto", "replay the UNet's calls as CUDA graphs (auto: on CUDA devices, unless "
                                       "--compile)", result=False, choices=ON_OFF_AUTO)
    gif: bool = setting(False, "also write <save_dir>/<name>/progress.gif from the progress images", result=False)
    log_guidance: bool = setting(False, "every --log_step steps, save a panel of x, x_t, x0_hat and |grad| to "
                                        "<save_dir>/<name>/guidance/", result=False)
    tensorboard: str | None = setting(None, "log loss, |grad|, t, lr, LoRA loss and the guidance panels for "
                                            "TensorBoard, in DIR/<loss_type>/<name>/seed_<seed>", result=False,
                                      metavar="DIR")

    # ---------------------------------------------------------------------------------------------------- views
    @property
    def method(self):
        """Return the method's row of guidance/methods.py."""
        return METHODS[self.loss_type]

    @property
    def name(self) -> str:
        """Return the course's file stem of the run: the prompt (the edit prompt for editing methods)."""
        from guidance.runfolder import prompt_to_filename

        return prompt_to_filename(self.edit_prompt if self.method.edits else self.prompt)

    def replace(self, **changes) -> "RunConfig":
        """Return a copy with some fields changed (not resolved again)."""
        return dataclasses.replace(self, **changes)

    def to_record(self) -> dict:
        """Return the configuration as run_config.json stores it (every field; tuples as lists)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def result_fields(cls) -> tuple[str, ...]:
        """Return the fields that change what a run produces: a finished run made with other values is stale."""
        return tuple(f.name for f in fields(cls) if f.metadata.get("result", True))

    # ---------------------------------------------------------------------------------------------------- checks
    def resolved(self) -> "RunConfig":
        """Return a copy with the method's defaults filled in, after checking everything that can be checked without
        a model (UserError naming the value and the fix)."""
        config = self.replace()
        method = config.method
        if not config.prompt or not config.prompt.strip():
            raise UserError("--prompt is empty: give the text to distil, e.g. --prompt \"A castle next to a river\"")
        defaults = {"save_dir": str(default_save_dir(config.loss_type, config.generator)),
                    "negative_prompt": method.negative_prompt, "guidance_scale": method.guidance_scale,
                    "step": method.steps, "weighting": config._default_weighting(), "t_schedule": method.t_schedule,
                    "t_range": method.t_range}
        for name, default in defaults.items():
            if getattr(config, name) is None:
                setattr(config, name, default)
        config.t_range = tuple(float(v) for v in config.t_range)
        config._fill_method_options()
        config._check_numbers()
        config._check_inputs()
        config._check_timesteps()
        config._check_environment()
        return config

    def _default_weighting(self) -> str:
        """Return the method's weighting, except that a world's own (toy3d's sigma_over_alpha) replaces the course's
        'uniform': a method whose paper gives its weighting keeps it everywhere."""
        from guidance.models import world

        weighting = self.method.weighting
        if weighting == "uniform":
            return getattr(world(self.model), "default_weighting", None) or weighting
        return weighting

    def _fill_method_options(self) -> None:
        """Set each method option to its value or the method's default; an option of another method is an error."""
        for dest in OPTION_FLAGS:
            value = getattr(self, dest)
            if dest in self.method.options:
                setattr(self, dest, self.method.options[dest] if value is None else value)
            elif value is not None:
                owners = [name for name, m in METHODS.items() if dest in m.options]
                raise UserError(f"--{dest} belongs to --loss_type {' / '.join(owners)}, not {self.loss_type}: drop it "
                                f"or choose that method")

    def _check_numbers(self) -> None:
        """Check that every number is finite and in its range."""
        checks = (("guidance_scale", self.guidance_scale, -math.inf, "a finite number, e.g. 7.5"),
                  ("lr", self.lr, 0.0, "a positive finite number, e.g. 0.1"),
                  ("lora_lr", self.lora_lr, 0.0, "a positive finite number, e.g. 1e-4"),
                  ("t_anneal_to", self.t_anneal_to, -math.inf, "a fraction of T in [0, 1], e.g. 0.5"))
        for flag, value, above, fix in checks:
            if value is not None and (not math.isfinite(float(value)) or float(value) <= above):
                raise UserError(f"--{flag} {value} must be {fix}")
        for dest in OPTION_FLAGS:
            value = getattr(self, dest)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{dest} {value} must be a finite number")
        if not 0 <= self.seed < SEED_LIMIT:
            raise UserError(f"--seed {self.seed} is outside [0, 2^63): give a seed such as 0, 1 or 12345")
        for flag, value, least in (("step", self.step, 1), ("num_particles", self.num_particles, 1),
                                   ("log_step", self.log_step, 0)):
            if value < least:
                fix = " (0 turns progress images off)" if flag == "log_step" else ""
                raise UserError(f"--{flag} {value} must be at least {least}{fix}")

    def _check_inputs(self) -> None:
        """Check what the method needs (an edit's prompt and source) and the flags only some methods take."""
        method = self.method
        if method.edits:
            label = self.loss_type.upper()
            if not self.edit_prompt or not self.edit_prompt.strip():
                raise UserError(f"{label} edits an image: give the target text with --edit_prompt "
                                "(and the source with --src_img_path)")
            if not self.src_img_path:
                raise UserError(f"{label} edits an image: give the source image with --src_img_path")
            if self.num_particles != 1:
                raise UserError(f"--num_particles {self.num_particles}: {label} edits one image; particles are for "
                                f"generation methods")
            load_image(self.src_img_path)  # a missing or unreadable image fails here, not after loading the model
        if self.lora_checkpointing and not method.lora:
            raise UserError(f"--lora_checkpointing is for the methods that train a LoRA "
                            f"({', '.join(n for n, m in METHODS.items() if m.lora)}), not {self.loss_type}: drop it")
        if method.sampler is not None and self.generator != "latent":
            raise UserError(f"--loss_type {self.loss_type} samples latents with the model itself: drop --generator "
                            f"{self.generator}")
        from guidance.generators import check_config

        check_config(self)

    def _check_timesteps(self, num_train_timesteps: int = 1000) -> None:
        """Check --t_range, --t_anneal_to and the methods' timestep options."""
        low, high = self.t_range
        if not (math.isfinite(low) and math.isfinite(high) and 0.0 <= low < high <= 1.0):
            raise UserError(f"--t_range {low:g} {high:g} is invalid: give MIN MAX with 0 <= MIN < MAX <= 1, "
                            f"e.g. 0.02 0.98")
        if not 0.0 <= self.t_anneal_to <= 1.0:
            raise UserError(f"--t_anneal_to {self.t_anneal_to:g} must be a fraction of T in [0, 1], e.g. 0.5")
        min_step = max(1, int(num_train_timesteps * low))
        if self.inversion_steps is not None:
            if self.inversion_steps < 1:
                raise UserError(f"--inversion_steps {self.inversion_steps} must be at least 1")
            if self.loss_type == "sdi" and self.inversion_steps > min_step:
                raise UserError(f"--inversion_steps {self.inversion_steps} is larger than the smallest t ({min_step}) "
                                f"it must invert to: use at most {min_step}, or raise the first value of --t_range")
        for flag, what in (("asd_ratio", "in [0, 1], e.g. 0.1"),
                           ("sdi_eta", "in [0, 1] (0: deterministic inversion, 1: SDS)"),
                           ("bridge_start", "a fraction of the steps in [0, 1], e.g. 0.5")):
            value = getattr(self, flag)
            if value is not None and not 0.0 <= value <= 1.0:
                raise UserError(f"--{flag} {value:g} must be {what}")
        for flag in ("ism_delta_t", "ism_delta_s", "ddim_steps"):
            if getattr(self, flag) is not None and getattr(self, flag) < 1:
                raise UserError(f"--{flag} {getattr(self, flag)} must be at least 1")
        if self.ddim_steps is not None and self.ddim_steps > num_train_timesteps:
            raise UserError(f"--ddim_steps {self.ddim_steps}: a sampler takes at most one step per training timestep "
                            f"({num_train_timesteps}); e.g. 50")

    def _check_environment(self) -> None:
        """Check the device, the speed settings, the model's options and the folders a run writes to."""
        from guidance.models import check_options, check_prompts
        from guidance.sd import resolve_channels_last, resolve_cuda_graphs

        device = resolve_device(self.device)
        resolve_cuda_graphs(self.cuda_graphs, device, self.compile)
        resolve_channels_last(self.channels_last, device)
        check_options(self.model, no_t5=self.no_t5, cpu_offload=self.cpu_offload,
                      lora_checkpointing=self.lora_checkpointing)
        check_prompts(self.model, [self.prompt] + ([self.edit_prompt] if self.method.edits else []))
        check_writable_dir(self.save_dir)
        if self.log_guidance and not self.log_step:
            raise UserError("--log_guidance saves its panels every --log_step steps: give --log_step N (N > 0)")
        if self.tensorboard:
            from guidance.diagnostics import require_tensorboard

            require_tensorboard()
            check_writable_dir(self.tensorboard, flag="--tensorboard")

    def model_options(self) -> dict:
        """Return the keyword arguments guidance.load_model takes for this run's model."""
        from guidance.common import resolve_precision

        options = dict(device=self.device, precision=resolve_precision(self.precision), t_range=self.t_range,
                       vsd_lora_timestep=self.vsd_lora_timestep, channels_last=self.channels_last,
                       compile=self.compile, cuda_graphs=self.cuda_graphs)
        if self.lora_lr is not None:
            options["lora_lr"] = self.lora_lr
        for flag in ("no_t5", "cpu_offload", "lora_checkpointing"):
            if getattr(self, flag):
                options[flag] = True
        return options

    @property
    def run_dir(self) -> Path:
        """Return the run's folder, <save_dir>/<name>/."""
        return Path(self.save_dir) / self.name

    def camera_ranges(self):
        """Return the cameras' ranges (guidance/cameras.py): the flags, else the model's world's own (a toy world's
        data covers only its), else DreamFusion's."""
        from guidance.cameras import CameraRanges
        from guidance.models import world

        base = getattr(world(self.model), "camera_ranges", None) or CameraRanges()
        given = {name: tuple(getattr(self, f"{name}_range")) for name in ("elevation", "azimuth", "distance", "fovy")
                 if getattr(self, f"{name}_range") is not None}
        return dataclasses.replace(base, **given)

    def check_replace(self) -> None:
        """Raise UserError if this run would replace a finished result made with other settings (see RunFolder);
        going on from this run's own checkpoint replaces what the run wrote so far, whatever it was."""
        from guidance.runfolder import RunFolder

        folder = RunFolder(self.save_dir, self.name)
        resuming_here = bool(self.resume) and Path(self.resume).resolve().parent == folder.dir.resolve()
        folder.check_replace(self.to_record(), self.result_fields(), self.overwrite or resuming_here)
