"""Stable Diffusion per family: how SDXL and SD 3 / 3.5 differ from SD 1.x / 2.x (guidance/sd.py).

Which family a model is comes from guidance/models.py (its model_index.json, never its name); each family class
registers itself there and only says how it loads its parts, encodes a prompt as its diffusers pipeline's
`encode_prompt` does, and calls its denoiser with that conditioning; everything else is guidance/sd.py's
`StableDiffusion` and the family-agnostic losses.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from guidance.common import UserError
from guidance.models import register_family
from guidance.schedule import RectifiedFlow
from guidance.sd import StableDiffusion


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
@register_family("sdxl")
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
@register_family("sd3")
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

    def camera_embedding_target(self):
        """Return (the transformer's timestep + pooled-text embedding, its width): where VSD's camera embedding goes."""
        config = self.unet.config
        return self.unet.time_text_embed, int(config.num_attention_heads * config.attention_head_dim)

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
