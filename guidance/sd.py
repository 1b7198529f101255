"""Stable Diffusion behind the distillation interface: loading (hub id, short name or local folder), text
embeddings, VAE, for every family: SD 1.x / 2.x here, SDXL and SD 3 / 3.5 in guidance/families.py.

`StableDiffusion(model)` reads the model's model_index.json (guidance/models.py: resolve_model) and returns the
family's class (the one registry of guidance/models.py, which `guidance.load_model` uses too): `StableDiffusion` itself for SD 1.x / 2.x (epsilon or v-prediction), `StableDiffusionXL`, or
`StableDiffusion3` (rectified flow). Each family only says how it loads its parts, encodes a prompt and calls its
denoiser; the losses (guidance/losses.py), their machinery (guidance/core.py) and the noise-path math
(guidance/schedule.py) are the same for all, and are re-exported here so that the course's
`from guidance.sd import StableDiffusion` and every `model.get_*_loss` keep working.
"""
from __future__ import annotations

import contextlib
import gc
import warnings

import torch

from guidance.common import ON_OFF_AUTO, UserError, resolve_device, resolve_precision  # noqa: F401 (re-exported)
from guidance.core import LORA_TARGET_MODULES, VSD_LORA_TIMESTEPS, grad_dtype, reparam_loss  # noqa: F401 (re-exported)
from guidance.losses import ScoreDistillation
from guidance.models import DEFAULT_MODEL, ModelSource, family_class, register_family, resolve_model
from guidance.schedule import WEIGHTINGS, NoiseSchedule  # noqa: F401 (re-exported)



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


def _settings(model) -> dict:
    """Return the constructor's settings read from a run configuration or the course skeleton's parsed arguments
    (any object with a `model` attribute: `StableDiffusion(args, t_range=...)`)."""
    names = ("device", "precision", "no_t5", "cpu_offload", "lora_checkpointing")
    return {"model": getattr(model, "model", DEFAULT_MODEL),
            **{name: getattr(model, name) for name in names if getattr(model, name, None) is not None}}


@register_family("sd")
class StableDiffusion(ScoreDistillation):
    """Stable Diffusion (2.1-base by default) loaded from a hub id, a short name or a local diffusers folder.

    Constructing it returns the class of the model's family (see the module docstring). `model` may also be
    a run configuration or the course skeleton's parsed arguments (`StableDiffusion(args)`: its model, device,
    precision and memory options are read from it), or a resolved guidance.models.ModelSource; `precision` takes a torch dtype or 'fp32' | 'fp16' |
    'bf16'. no_t5: SD 3 only, leave its T5 encoder unloaded. cpu_offload: keep the text encoders and the VAE in
    CPU memory and move each to the device only while it runs (the denoiser stays on the device).
    lora_checkpointing: VSD's LoRA training step recomputes the denoiser's activations in its backward (gradient
    checkpointing: same gradients, much less memory, one more forward's time; that step then runs without CUDA
    graphs).
    """

    family = "sd"  # "sd" (1.x / 2.x), "sdxl" or "sd3"
    text_encoder_names = ("text_encoder",)  # the attributes free_text_encoders() releases

    def __new__(cls, model=DEFAULT_MODEL, *args, **kwargs):
        # The course's constructor returns the class of the weights' family, from guidance/models.py's registry (the
        # one factory, guidance.load_model, does the same); the source is resolved once, here, for __init__.
        if isinstance(model, ModelSource):
            source = model
        else:
            source = resolve_model(str(model if isinstance(model, str) or hasattr(model, "__fspath__")
                                       else _settings(model)["model"]))
        if cls is StableDiffusion:
            cls = family_class(source.family)
        instance = super().__new__(cls)
        instance.source = source
        return instance

    def __init__(self, model: str = DEFAULT_MODEL, device=None, precision=torch.float32, t_range=(0.02, 0.98),
                 lora_rank: int = 4, lora_lr: float = 1e-4,
                 vsd_lora_timestep: str = "fresh", channels_last="auto", compile: bool = False,
                 cuda_graphs="auto", no_t5: bool = False, cpu_offload: bool = False,
                 lora_checkpointing: bool = False):
        if not isinstance(model, (str, ModelSource)) and not hasattr(model, "__fspath__"):
            settings = _settings(model)  # the course skeleton's StableDiffusion(args, t_range=...)
            model, device = settings["model"], settings.get("device", device)
            precision = settings.get("precision", precision)
            no_t5, cpu_offload = settings.get("no_t5", no_t5), settings.get("cpu_offload", cpu_offload)
            lora_checkpointing = settings.get("lora_checkpointing", lora_checkpointing)
        if isinstance(model, ModelSource):
            model = model.name
        self._setup_distillation(t_range, lora_rank, lora_lr, vsd_lora_timestep)
        self.lora_checkpointing = bool(lora_checkpointing)
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision)
        use_graphs = resolve_cuda_graphs(cuda_graphs, self.device, compile)
        self.channels_last = resolve_channels_last(channels_last, self.device)
        if cpu_offload and self.device.type == "cpu":
            raise UserError("--cpu_offload moves the text encoders and the VAE to the device only while they run: it "
                            "needs a GPU device (--device cuda); on a CPU everything is in CPU memory already")
        self.cpu_offload = bool(cpu_offload)
        self.model_name = str(model)
        self._text_cache: dict[str, torch.Tensor] = {}
        self._text_encoders_freed = False
        source = self.source  # resolved by __new__
        if source.family != self.family:
            raise UserError(f"{model!r} is a {source.family} model, not {self.family}: load it with "
                            f"StableDiffusion({str(model)!r})")
        if no_t5 and self.family != "sd3":
            raise UserError(f"--no_t5 leaves SD 3's T5 text encoder unloaded, but {model!r} is {self.family} (no T5): "
                            f"drop --no_t5")
        self.no_t5 = bool(no_t5)
        try:
            self._load_components(source.path, {"local_files_only": True} if source.local else {})
        except (OSError, ValueError, EnvironmentError) as err:
            raise source.load_error(err) from None
        self._place_components()
        self._finish_setup()
        if self.device.type == "cpu":
            # Feed-forwards take one sample at a time: same arithmetic, but their GEGLU activation, the largest
            # of the forward, shrinks by the batch size (PDS's batch-4 forward peaks ~40% lower) at no cost in
            # time on a CPU (BENCHMARKS.md); on a GPU the extra kernel launches would cost time.
            for module in self.unet.modules():
                if hasattr(module, "set_chunk_feed_forward"):
                    module.set_chunk_feed_forward(1, 0)
            # VSD's LoRA backward at batch 1 would run one-head attentions on one core (guidance/attention.py).
            # (SD 3's joint attentions run their own processor and are left as they are.)
            from guidance.attention import use_cpu_attention

            use_cpu_attention(self.unet)
        if self.channels_last and self.unet_is_convolutional:
            self.unet.to(memory_format=torch.channels_last)
        if compile:
            self.unet = torch.compile(self.unet)
        if use_graphs:
            from guidance.cuda_graphs import CudaGraphs

            self.graphs = CudaGraphs()

    unet_is_convolutional = True  # channels_last only means something for a UNet (SD 3's transformer: no)

    # ----------------------------------------------------------------------------------------- loading
    def _load_components(self, source: str, kwargs: dict) -> None:
        """Load the family's parts from a folder or hub id: SD 1.x / 2.x (one CLIP text encoder, a UNet, DDPM)."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
        self.text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=self.dtype, **kwargs)
        self.unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=self.dtype, **kwargs)
        self.vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=self._vae_dtype(source, kwargs),
                                                 **kwargs)
        scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
        self.schedule = NoiseSchedule.from_scheduler(scheduler)
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")

    def _vae_dtype(self, source: str, kwargs: dict) -> torch.dtype:
        """Return the dtype the VAE runs in: the model's (SDXL overrides it: its fp16 VAE overflows)."""
        return self.dtype

    def _place_components(self) -> None:
        """Move every part to its device (the text encoders and the VAE stay on the CPU under cpu_offload)."""
        self.unet.to(self.device).eval().requires_grad_(False)
        offload_device = torch.device("cpu") if self.cpu_offload else self.device
        for module in self._text_encoders() + [self.vae]:
            module.to(offload_device).eval().requires_grad_(False)
        if self.device.type == "cpu":
            # The VAE's convolutions run at up to 512x512 with few channels, where channels_last is faster on a
            # CPU: a 'mid' decode takes 1.28 s instead of 1.65 on this project's 2-core box. On an H100 (fp16, CUDA
            # graphs) main.py's loop with progress images was no faster with it (BENCHMARKS.md).
            self.vae.to(memory_format=torch.channels_last)

    def _finish_setup(self) -> None:
        """Set the latent geometry and the VAE's factors from the configs."""
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = self.unet.config.in_channels
        self.latent_size = self.unet.config.sample_size
        self.resolution = self.latent_size * self.vae_scale_factor
        self.size_multiple = self.vae_scale_factor * self._denoiser_downsampling()
        self.vae_dtype = self.vae.dtype
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    def _denoiser_downsampling(self) -> int:
        """Return how much smaller than the latents the denoiser's coarsest grid is (a UNet: 2 per down block)."""
        return 2 ** (len(self.unet.config.down_block_types) - 1)

    def _text_encoders(self) -> list:
        return [getattr(self, name) for name in self.text_encoder_names if getattr(self, name, None) is not None]

    @contextlib.contextmanager
    def _on_device(self, module: torch.nn.Module):
        """Context in which module is on the model's device (under cpu_offload it goes back to the CPU after)."""
        if not self.cpu_offload:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")

    # ----------------------------------------------------------------------------------------- text
    @torch.no_grad()
    def get_text_embeds(self, prompt: str) -> torch.Tensor:
        """Return one prompt's conditioning as a [1, L, D] tensor, exactly as diffusers' pipeline of the family
        computes it (cached per prompt).

        SD 1.x / 2.x: the CLIP text encoder's [1, 77, D] hidden states. SDXL and SD 3 carry their pooled vector as
        one more row, zero-padded to D ([1, L + 1, D]), that _unet_output splits off again: so that cat[uncond,
        cond] and every loss's row arithmetic work the same for every family.
        """
        if prompt in self._text_cache:
            return self._text_cache[prompt]
        if self._text_encoders_freed:
            raise RuntimeError(f"the text encoders were freed (free_text_encoders()) before the prompt {prompt!r} was "
                               f"encoded: encode every prompt of the run first")
        max_length = self.tokenizer.model_max_length
        n_tokens = len(self.tokenizer(prompt).input_ids)
        if n_tokens > max_length:
            warnings.warn(f"prompt {prompt[:40]!r}... is {n_tokens} tokens; the text encoder reads only the first "
                          f"{max_length}, so it is truncated", stacklevel=2)
        embeddings = self._encode_prompt(prompt)
        self._text_cache[prompt] = embeddings
        return embeddings

    def _clip_tokens(self, tokenizer, prompt: str) -> torch.Tensor:
        return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        """Return StableDiffusionPipeline.encode_prompt's prompt_embeds: the CLIP encoder's last hidden states."""
        with self._on_device(self.text_encoder) as encoder:
            return encoder(self._clip_tokens(self.tokenizer, prompt).to(encoder.device))[0].to(self.device)

    def encode_prompts(self, prompts) -> None:
        """Encode every prompt into the cache (a run's prompts, before free_text_encoders())."""
        for prompt in dict.fromkeys(prompts):
            self.get_text_embeds(prompt)

    def free_text_encoders(self) -> None:
        """Release the text encoders (the cache keeps every embedding made so far): SDXL's two take 1.6 GB in
        fp16, SD 3's T5 9.5 GB. A prompt not encoded before this is an error afterwards."""
        for name in self.text_encoder_names:
            setattr(self, name, None)
        self._text_encoders_freed = True
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ----------------------------------------------------------------------------------------- denoiser
    def _unet_output(self, x: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(x, timesteps, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    # ----------------------------------------------------------------------------------------- VAE
    def encode_imgs(self, imgs: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
        """Return float32 latents ((VAE posterior mean - shift factor) x scaling factor) of [B, 3, H, W] images in [0, 1].

        requires_grad=True keeps the graph back to imgs (a generator's render); else it runs under no_grad.
        """
        with torch.set_grad_enabled(requires_grad and torch.is_grad_enabled()), self._on_device(self.vae) as vae:
            posterior = vae.encode((2 * imgs - 1).to(vae.device, self.vae_dtype)).latent_dist
            return ((posterior.mean.float() - self.shift_factor) * self.scaling_factor).to(self.device)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Return float32 images in [0, 1] decoded by the VAE from latents."""
        z = (latents / self.scaling_factor + self.shift_factor).to(self.vae_dtype)
        if self.cpu_offload:  # no graph: the VAE's weights move between calls
            with self._on_device(self.vae):
                imgs = self._decode(z.to(self.device))
        elif self.graphs is not None:
            imgs = self.graphs.call(("vae_decode",), self._decode, z)
        else:
            imgs = self._decode(z)
        return (imgs.float() / 2 + 0.5).clamp(0, 1)
