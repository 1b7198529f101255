"""The model-agnostic machinery every distillation loss stands on: timesteps, the batched UNet calls with CFG,
DDIM inversion and sampling, the reparameterised loss, and VSD's LoRA.

`DistillationCore` is mixed into every model (Stable Diffusion, the toy world); the losses themselves are in
guidance/losses.py. A model sets: `unet` (called as unet(x, t, encoder_hidden_states=..., return_dict=False)[0]),
`schedule` (a guidance.schedule.NoiseSchedule), `device`, `dtype`, `prediction_type`, `latent_channels`,
`latent_size`, `resolution`, `size_multiple`, and implements `get_text_embeds`, `encode_imgs` and `decode_latents`.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from guidance.common import UserError
from guidance.views import PerpNegEmbeddings, perp_neg_noise_preds

LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
VSD_LORA_TIMESTEPS = ("fresh", "shared")
T_SCHEDULES = ("random", "linear", "anneal")


def grad_dtype(x: torch.Tensor) -> torch.dtype:
    """Return the dtype gradients are formed in: float32, or float64 when x is float64 (exact tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def reparam_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Return 0.5 * sum((x - target)^2) / batch with target = (x - grad).detach(): its gradient is grad / batch."""
    dtype = grad_dtype(x)
    target = (x.to(dtype) - grad.to(dtype)).detach()
    return 0.5 * F.mse_loss(x.to(dtype), target, reduction="sum") / x.shape[0]


class TimestepSchedule:
    """The t of each optimisation step: 'random' (uniform in [min_step, max_step], drawn by the loss),
    'linear' (deterministic, max_step down to min_step over the run) or 'anneal' (uniform in [min_step, max_k],
    max_k falling linearly from max_step to anneal_to * T)."""

    def __init__(self, kind: str, min_step: int, max_step: int, total_steps: int, anneal_to: int):
        if kind not in T_SCHEDULES:
            raise UserError(f"unknown t schedule {kind!r}: use one of {', '.join(T_SCHEDULES)}")
        self.kind, self.min_step, self.max_step = kind, int(min_step), int(max_step)
        self.total_steps, self.anneal_to = int(total_steps), max(int(min_step), min(int(anneal_to), int(max_step)))

    def _fraction(self, step: int) -> float:
        return step / max(1, self.total_steps - 1)

    def __call__(self, step: int) -> int:
        """Return the timestep of optimisation step `step` (0-based)."""
        if self.kind == "linear":
            return round(self.max_step - (self.max_step - self.min_step) * self._fraction(step))
        high = self.max_step
        if self.kind == "anneal":
            high = round(self.max_step - (self.max_step - self.anneal_to) * self._fraction(step))
        return int(torch.randint(self.min_step, high + 1, (1,)).item())


class DistillationCore:
    """Timesteps, UNet calls (batched CFG), DDIM and the VSD LoRA, shared by every model and loss."""

    lora_target_modules = LORA_TARGET_MODULES
    prediction_type = "epsilon"

    def _setup_distillation(self, t_range=(0.02, 0.98), lora_rank=4, lora_lr=1e-4, vsd_lora_timestep="fresh") -> None:
        """Validate and store the settings the losses share (called by subclasses before loading weights)."""
        t_range = tuple(float(v) for v in t_range)
        if len(t_range) != 2 or not 0.0 <= t_range[0] < t_range[1] <= 1.0:
            raise UserError(f"t_range {t_range} is invalid: give (min, max) with 0 <= min < max <= 1, e.g. (0.02, 0.98)")
        if vsd_lora_timestep not in VSD_LORA_TIMESTEPS:
            raise UserError(f"unknown vsd_lora_timestep {vsd_lora_timestep!r}: use one of {', '.join(VSD_LORA_TIMESTEPS)}")
        if int(lora_rank) < 1:
            raise UserError(f"lora_rank {lora_rank} must be a positive integer, e.g. 4")
        self.t_range = t_range
        self.lora_rank = int(lora_rank)
        self.lora_lr = float(lora_lr)
        self.vsd_lora_timestep = vsd_lora_timestep
        self.lora_optimizer = None
        self.lora_parameters, self.lora_layers = [], []
        self.lora_camera, self._lora_camera_rows = None, None  # VSD's camera embedding (lora_cameras), when 3D
        self.last_lora_loss = None
        # What the last loss call aimed at, for diagnostics: {"t", "x_t", "eps" (the guided prediction), "grad"}.
        self.last_guidance = None
        self.graphs = None  # a guidance.cuda_graphs.CudaGraphs when UNet (and VAE decoder) calls replay CUDA graphs
        self._lora_off = 0  # depth of lora_disabled() contexts
        self._eps_table = None  # [T, 2] coefficients of eps from the UNet's output, on the device (_eps_coefficients)
        # Recompute the denoiser's activations block by block in the LoRA's backward instead of keeping them (SD only).
        self.lora_checkpointing = False

    # ----------------------------------------------------------------------------------------- timesteps
    @property
    def min_step(self) -> int:
        """Return the smallest timestep the losses sample: int(T * t_range[0]), at least 1 (PDS needs t - 1)."""
        return max(1, int(self.schedule.num_train_timesteps * self.t_range[0]))

    @property
    def max_step(self) -> int:
        """Return the largest timestep the losses sample: int(T * t_range[1]), at most T - 1."""
        return min(self.schedule.num_train_timesteps - 1, int(self.schedule.num_train_timesteps * self.t_range[1]))

    def sample_timestep(self, t: int | None = None) -> int:
        """Return t if given, else an integer drawn uniformly from [min_step, max_step]."""
        if t is None:
            return int(torch.randint(self.min_step, self.max_step + 1, (1,)).item())
        t = int(t)
        if not 1 <= t < self.schedule.num_train_timesteps:
            raise ValueError(f"timestep t={t} is outside [1, {self.schedule.num_train_timesteps - 1}]")
        return t

    def _noise_like(self, latents: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Return noise in grad_dtype on the latents' device, or fresh N(0, I) noise shaped like latents."""
        if noise is None:
            return torch.randn(latents.shape, device=latents.device, dtype=grad_dtype(latents))
        if noise.shape != latents.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but latents have {tuple(latents.shape)}")
        return noise.to(device=latents.device, dtype=grad_dtype(latents))

    def latent_shape(self, batch: int = 1) -> tuple[int, ...]:
        """Return the shape of a batch of generation latents at the model's native size."""
        return (batch, self.latent_channels, self.latent_size, self.latent_size)

    def source_size(self, height: int, width: int) -> tuple[int, int]:
        """Return (H, W) for a source image: short side = resolution, both sides multiples of size_multiple."""
        scale = self.resolution / min(height, width)
        m = self.size_multiple
        return (max(m, round(height * scale / m) * m), max(m, round(width * scale / m) * m))

    def null_embedding(self) -> torch.Tensor:
        """Return the text embedding of the empty prompt "" (eps_null's condition in NFSD, ISM and SDI)."""
        return self.get_text_embeds("")

    def negative_embedding(self, negative_prompt: str) -> torch.Tensor:
        """Return the uncond CFG row for a run's negative prompt: its embedding, or for "" (no negative prompt) the
        null embedding, which on SDXL is the zeros its pipeline uses without a negative prompt."""
        return self.null_embedding() if negative_prompt == "" else self.get_text_embeds(negative_prompt)

    # ----------------------------------------------------------------------------------------- UNet calls
    def predict_eps(self, x_t: torch.Tensor, t, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Return the model's noise prediction eps(x_t, t, c) in x_t's grad_dtype (one UNet call, batch = len(x_t)).

        t is one integer for every row, or a sequence / 1-D tensor of one integer timestep per row.
        """
        timesteps = self._timesteps(t, x_t)
        out = self._denoise(x_t, timesteps, encoder_hidden_states)
        if self.prediction_type != "epsilon":
            a, b = self._eps_coefficients(timesteps, out).unbind(-1)
            shape = (-1,) + (1,) * (out.dim() - 1)
            out = a.view(shape) * out + b.view(shape) * x_t.to(out.dtype)
        return out

    def predict_output(self, x_t: torch.Tensor, t, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Return the denoiser's native output (eps, v or the flow velocity: prediction_type) in x_t's grad_dtype.

        As predict_eps, and t may also be a float (one for every row): a sampler's real timestep on the
        rectified-flow path (SD 3), passed to the denoiser as float32, as diffusers' pipeline passes it.
        """
        return self._denoise(x_t, self._timesteps(t, x_t), encoder_hidden_states)

    def _timesteps(self, t, x_t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, (int, float)):
            dtype = torch.long if isinstance(t, int) else torch.float32
            return torch.full((x_t.shape[0],), t, device=x_t.device, dtype=dtype)
        return torch.as_tensor(t, dtype=torch.long).to(x_t.device)

    def _denoise(self, x_t: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Return the denoiser's output in x_t's grad_dtype (replayed from a CUDA graph under no_grad when graphed)."""
        x, c = x_t.to(self.dtype), encoder_hidden_states.to(self.dtype)
        if self.graphs is not None and not torch.is_grad_enabled():
            out = self.graphs.call(("unet", self._adapters_on), self._unet_output, x, timesteps, c)
        else:
            out = self._unet_output(x, timesteps, c)
        return out.to(grad_dtype(x_t))

    def _unet_output(self, x: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(x, timesteps, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    def _eps_coefficients(self, t, like: torch.Tensor) -> torch.Tensor:
        """Return [a, b] (or [B, 2] for per-row t) on like's device with eps = a * unet_output + b * x_t."""
        table = self._eps_table
        if table is None or table.device != like.device or table.dtype != like.dtype:
            # Kept on the device and indexed there: building [a, b] per step would copy from the host and sync.
            table = self.schedule.eps_coefficients(self.prediction_type).to(device=like.device, dtype=like.dtype)
            self._eps_table = table
        return table[t]

    def predict_uncond_cond(self, x_t: torch.Tensor, t, text_embeddings: torch.Tensor,
                            output: str = "eps") -> tuple[torch.Tensor, torch.Tensor]:
        """Return (eps_uncond, eps_cond) for every row of x_t from ONE batched UNet call on [x_t; x_t].

        text_embeddings = cat[uncond, cond], each with n rows; n must divide the latents' batch B, and row i
        of the latents is paired with row i // (B / n) (so PDS and DDS pass cat[src_u, tgt_u, src_c, tgt_c]).
        output="native" returns the denoiser's own outputs instead (predict_output: v, velocity).
        """
        batch = x_t.shape[0]
        uncond, cond = text_embeddings.chunk(2)
        if batch % uncond.shape[0]:
            raise ValueError(f"{uncond.shape[0]} prompt rows cannot be spread over a batch of {batch} latents")
        repeat = batch // uncond.shape[0]
        if repeat > 1:
            uncond, cond = uncond.repeat_interleave(repeat, 0), cond.repeat_interleave(repeat, 0)
        if not isinstance(t, (int, float)):
            t = torch.cat([torch.as_tensor(t), torch.as_tensor(t)])
        predict = self.predict_eps if output == "eps" else self.predict_output
        return predict(torch.cat([x_t, x_t]), t, torch.cat([uncond, cond])).chunk(2)

    def get_noise_preds(self, latents_noisy: torch.Tensor, t: int, text_embeddings: torch.Tensor,
                        guidance_scale: float) -> torch.Tensor:
        """Return the CFG prediction eps_cfg_s = eps_uncond + s * (eps_cond - eps_uncond), from ONE batched UNet call
        (or, for guidance.views.PerpNegEmbeddings, the Perp-Neg prediction from one call of all its rows)."""
        if isinstance(text_embeddings, PerpNegEmbeddings):
            return perp_neg_noise_preds(self, latents_noisy, t, text_embeddings.rows, text_embeddings.weights,
                                        guidance_scale)
        eps_uncond, eps_cond = self.predict_uncond_cond(latents_noisy, t, text_embeddings)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    def _expand_rows(self, embedding: torch.Tensor, batch: int) -> torch.Tensor:
        """Return a prompt embedding with one row per latent (a single prompt is repeated)."""
        return embedding if embedding.shape[0] == batch else embedding.repeat_interleave(batch // embedding.shape[0], 0)

    # ----------------------------------------------------------------------------------------- DDIM
    @torch.no_grad()
    def ddim_invert(self, latents: torch.Tensor, embedding: torch.Tensor, t: int, n_steps: int,
                    guidance_scale: float | None = None, eta: float = 0.0, noises=None) -> torch.Tensor:
        """Return x_t from DDIM inversion of the latents, taken as x at timestep 0, to t.

        n equal steps t_k = round(k t / n): e = eps(x_{t_k}, t_k), x0 = (x_{t_k} - sigma_{t_k} e) / alpha_{t_k},
        x_{t_{k+1}} = alpha_{t_{k+1}} x0 + sigma_{t_{k+1}} e (+ eta std_k z_k). `embedding` is one prompt's
        (guidance_scale None: e = eps(x; embedding), n UNet calls of B rows) or cat[uncond, cond] with CFG at
        guidance_scale (n calls of 2B rows). eta > 0 adds noise after each step, as threestudio's SDI does:
        std_k = posterior_std(t_{k+1}, t_k), the spread of q(x_{t_k} | x_{t_{k+1}}, x0) (0 where t_k is clean
        data), z_k = noises[k] if given, else N(0, I). eta 0 is deterministic.
        """
        t, n_steps = int(t), int(n_steps)
        if n_steps < 1 or n_steps > t:
            raise ValueError(f"DDIM inversion to t={t} in {n_steps} steps needs 1 <= steps <= t")
        x = latents.detach().to(grad_dtype(latents))
        cond = self._expand_rows(embedding, x.shape[0]) if guidance_scale is None else None
        timesteps = [round(k * t / n_steps) for k in range(n_steps + 1)]
        for k, (t_k, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
            if guidance_scale is None:
                eps = self.predict_eps(x, t_k, cond)
            else:
                eps = self.get_noise_preds(x, t_k, embedding, guidance_scale)
            x = self.schedule.ddim_step(x, eps, t_k, t_next)
            if eta > 0 and self.schedule.sigma(t_k) > 0:
                z = self._noise_like(x, None if noises is None else noises[k])
                x = x + eta * self.schedule.posterior_std(t_next, t_k) * z
        return x

    @torch.no_grad()
    def ddim_sample(self, x_t: torch.Tensor, steps: list[tuple], text_embeddings: torch.Tensor,
                    guidance_scale: float | None = None) -> torch.Tensor:
        """Return the end of a deterministic DDIM (eta 0) trajectory from x_t through the moves `steps`.

        steps: (t, t_next) pairs, descending (schedule.sampler_steps(n): the model's own sampler); t_next = -1 ends at
        x0_hat (clean data). text_embeddings is one prompt's embedding (guidance_scale None) or cat[uncond, cond]
        with CFG at guidance_scale, on the denoiser's native output (as diffusers' pipelines; the same as CFG on eps,
        an affine map of it). x0_hat and eps come from that output as the scheduler computes them (SD 3 starts at
        sigma = 1, where eps alone cannot give x0_hat), x0_hat clamped as the model's DDIM config says
        (clip_sample). One UNet call per step (batch 2B with CFG).
        """
        x = x_t.detach().to(grad_dtype(x_t))
        for t, t_next in steps:
            if guidance_scale is None:
                out = self.predict_output(x, t, self._expand_rows(text_embeddings, x.shape[0]))
            else:
                out_uncond, out_cond = self.predict_uncond_cond(x, t, text_embeddings, output="native")
                out = out_uncond + guidance_scale * (out_cond - out_uncond)
            x0_hat, eps = self.schedule.x0_and_eps(self.prediction_type, out, x, t)
            x = self.schedule.ddim_update(x0_hat, eps, t_next, x0_clip=self.schedule.x0_clip)
        return x

    # ----------------------------------------------------------------------------------------- LoRA (VSD)
    def enable_lora(self) -> None:
        """Add the VSD LoRA (peft, rank lora_rank, on lora_target_modules) to the UNet once, with its AdamW."""
        if self.lora_optimizer is not None:
            return
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=self.lora_rank, lora_alpha=self.lora_rank, init_lora_weights=True,
                            target_modules=list(self.lora_target_modules))
        self.unet.requires_grad_(False)
        inject_adapter_in_model(config, self.unet, adapter_name="vsd")
        params = [p for name, p in self.unet.named_parameters() if "lora_" in name]
        if not params:
            raise RuntimeError(f"no LoRA layers were added: no module matches {self.lora_target_modules}")
        for p in params:
            # Adapters train in float32 even when the UNet runs in half precision.
            p.data = p.data.to(grad_dtype(p))
            p.requires_grad_(True)
        self.lora_parameters = params
        self.lora_layers = self._lora_layers()
        if self.lora_checkpointing:
            # Only where autograd runs (the LoRA's training step): the no_grad passes are untouched.
            self.unet.enable_gradient_checkpointing()
        # capturable: its step can be recorded in a CUDA graph (the step count lives on the GPU). fused on CPUs: one
        # kernel over the LoRA's 256 tensors ('mid': 3 ms a step instead of 13).
        on_cpu = self.device.type == "cpu"
        self.lora_optimizer = torch.optim.AdamW(params, lr=self.lora_lr, fused=True if on_cpu else None,
                                                capturable=self.graphs is not None and not on_cpu)
        if self.graphs is not None:
            self.graphs.clear()  # the UNet's modules changed

    # ProlificDreamer's LoRA sees the camera: its 4x4 camera-to-world matrix, flattened, through a small MLP (the
    # UNet's class embedding in their code) added to the denoiser's timestep embedding, only while the adapters run.
    CAMERA_FEATURES = 16

    def camera_embedding_target(self) -> tuple[torch.nn.Module, int] | None:
        """Return (the module whose [B, D] output is the denoiser's timestep embedding, D), where the LoRA's camera
        embedding is added; None for a denoiser without one."""
        module = getattr(self.unet, "time_embedding", None)
        width = getattr(getattr(module, "linear_2", module), "out_features", None)  # a diffusers UNet's, or the toys'
        return (module, int(width)) if width is not None else None

    @contextlib.contextmanager
    def lora_cameras(self, cameras: torch.Tensor | None):
        """Context in which the LoRA's passes are conditioned on cameras ([B, 16] flattened camera-to-world matrices,
        one per latent row), as ProlificDreamer's eps_phi(x_t, t, y, c); without cameras, a no-op."""
        if cameras is None:
            yield
            return
        self._enable_lora_camera()
        self._lora_camera_rows = cameras.to(self.device, torch.float32).reshape(cameras.shape[0], -1)
        try:
            yield
        finally:
            self._lora_camera_rows = None

    def _enable_lora_camera(self) -> None:
        """Add the camera embedding (zero output at first: the LoRA starts as it would without it) to the LoRA."""
        if self.lora_camera is not None:
            return
        target = self.camera_embedding_target()
        if target is None:
            raise UserError(f"{self.model_name}'s denoiser has no timestep embedding to condition VSD's LoRA on the "
                            f"camera")
        module, width = target
        self.lora_camera = torch.nn.Sequential(torch.nn.Linear(self.CAMERA_FEATURES, width), torch.nn.SiLU(),
                                               torch.nn.Linear(width, width)).to(self.device)
        torch.nn.init.zeros_(self.lora_camera[2].weight)
        torch.nn.init.zeros_(self.lora_camera[2].bias)
        self._lora_camera_hook = module.register_forward_hook(self._add_camera_embedding)
        self.lora_optimizer.add_param_group({"params": list(self.lora_camera.parameters())})
        self.lora_parameters = self.lora_parameters + list(self.lora_camera.parameters())
        if self.graphs is not None:
            self.graphs.clear()

    def _add_camera_embedding(self, module, inputs, output):
        rows = self._lora_camera_rows
        if rows is None or not self._adapters_on:
            return output
        if rows.shape[0] != output.shape[0]:
            raise RuntimeError(f"{rows.shape[0]} cameras for a denoiser batch of {output.shape[0]}")
        return output + self.lora_camera(rows).to(output.dtype)

    def _lora_layers(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]

    @property
    def _adapters_on(self) -> bool:
        return bool(self.lora_layers) and self._lora_off == 0

    @contextlib.contextmanager
    def lora_disabled(self):
        """Context in which the UNet runs without its LoRA (the pretrained model, no adapter compute at all)."""
        layers = self.lora_layers
        for layer in layers:
            layer.enable_adapters(False)
        self._lora_off += 1
        try:
            yield
        finally:
            self._lora_off -= 1
            if self._lora_off == 0:
                for layer in layers:
                    layer.enable_adapters(True)

    def lora_state(self) -> dict | None:
        """Return VSD's LoRA as a checkpoint keeps it (its weights, camera embedding and optimiser), None without one."""
        if self.lora_optimizer is None:
            return None
        return {"parameters": [p.detach().clone() for p in self.lora_parameters],
                "camera": self.lora_camera is not None, "optimizer": self.lora_optimizer.state_dict()}

    def load_lora_state(self, state: dict | None) -> None:
        """Make VSD's LoRA what lora_state() returned (None: no LoRA yet, as in a new process)."""
        self.reset_lora()
        if state is None:
            return
        self.enable_lora()
        if state["camera"]:
            self._enable_lora_camera()
        if len(state["parameters"]) != len(self.lora_parameters):
            raise UserError(f"--resume: the checkpoint's LoRA has {len(state['parameters'])} tensors, this model's "
                            f"{len(self.lora_parameters)}: resume with the model and --lora_rank it was made with")
        with torch.no_grad():
            for p, saved in zip(self.lora_parameters, state["parameters"]):
                p.copy_(saved)
        self.lora_optimizer.load_state_dict(state["optimizer"])

    def reset_lora(self) -> None:
        """Remove the VSD LoRA and its optimizer: the next VSD loss adds a fresh one, as in a new process."""
        if self.lora_optimizer is None:
            return
        for layer in self._lora_layers():
            layer.delete_adapter("vsd")
        if getattr(self.unet, "peft_config", None) is not None:
            del self.unet.peft_config  # else peft warns about a second adapter when the next one is added
        if self.lora_checkpointing:
            self.unet.disable_gradient_checkpointing()
        if self.lora_camera is not None:
            self._lora_camera_hook.remove()
            self.lora_camera = None
        self.lora_parameters, self.lora_layers, self.lora_optimizer, self.last_lora_loss = [], [], None, None
        if self.graphs is not None:
            self.graphs.clear()

    def lora_loss(self, x0: torch.Tensor, t: int, noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Return the loss the LoRA's training step minimises at t: mean ||out_phi(x_t, t, y) - target||^2.

        x_t = alpha_t x0 + sigma_t noise; out_phi is the denoiser's native output (with its LoRA) and target what the
        model was trained to output (schedule.training_target): noise (epsilon), alpha_t noise - sigma_t x0
        (v-prediction), noise - x0 (flow). An eps-MSE would be alpha_t^2 times the v-loss (0.006 at t = 980 on SD's
        path) and (1 - sigma_t)^2 times the velocity loss, so high-noise steps would barely train. cond: the
        prompt's conditional embedding, one row or one per latent.
        """
        x_t, timesteps, cond, target, _ = self._lora_inputs(x0, t, noise, cond)
        return self._lora_objective(x_t, timesteps, cond, target)[1]

    def _lora_inputs(self, x0: torch.Tensor, t: int, noise: torch.Tensor, cond: torch.Tensor) -> tuple:
        """Return (x_t, timesteps, cond, target, eps coefficients): the tensors one LoRA training step reads."""
        x_t = self.schedule.add_noise(x0, noise, t)
        timesteps = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
        target = self.schedule.training_target(self.prediction_type, x0, noise, t)
        cond = self._expand_rows(cond, x0.shape[0]).to(self.dtype)
        return x_t, timesteps, cond, target, self._eps_coefficients(t, noise)

    def _lora_objective(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor,
                        target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (the denoiser's native output with the LoRA, its MSE to target), with autograd when enabled."""
        out = self._unet_output(x_t.to(self.dtype), timesteps, cond).to(target.dtype)
        return out, F.mse_loss(out, target)

    def _lora_step(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor, target: torch.Tensor,
                   eps_coefficients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (eps_phi(x_t) detached, the loss detached) after one AdamW step of the LoRA on _lora_objective.

        The one LoRA training step: run eagerly, or captured and replayed by a CUDA graph (every input a tensor,
        so that a replay reads new values; eps_coefficients = [a, b] with eps = a * output + b * x_t).
        """
        self.lora_optimizer.zero_grad(set_to_none=True)
        out, loss = self._lora_objective(x_t, timesteps, cond, target)
        loss.backward()
        self.lora_optimizer.step()
        return (eps_coefficients[0] * out + eps_coefficients[1] * x_t).detach(), loss.detach()

    def lora_training_step(self, x0: torch.Tensor, t: int, cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Return eps_phi(x_t, t, y), detached, after one AdamW step of the LoRA on lora_loss(x0, t, noise, cond)."""
        inputs = self._lora_inputs(x0, t, noise, cond)
        # A recomputing backward, and a camera-conditioned LoRA (its cameras are not graph inputs), run eagerly.
        if self.graphs is None or self.lora_checkpointing or self._lora_camera_rows is not None:
            eps_lora, self.last_lora_loss = self._lora_step(*inputs)
        else:
            eps_lora, self.last_lora_loss = self.graphs.train_step(("lora",), self._lora_step, inputs,
                                                                   self.lora_optimizer, self.lora_parameters)
        return eps_lora

    def train_lora(self, latents: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Take one AdamW step of the LoRA's denoising loss (lora_loss) at a fresh t ~ U[0, T) and fresh noise; return
        the loss."""
        self.enable_lora()
        t = int(torch.randint(0, self.schedule.num_train_timesteps, (1,)).item())
        noise = torch.randn(latents.shape, device=latents.device, dtype=grad_dtype(latents))
        self.lora_training_step(latents, t, cond, noise)
        return self.last_lora_loss
