"""Random-weight Stable Diffusion folders built from configs: the test models and the benchmark's stand-ins.

`build_random_sd(folder, size)` writes a diffusers pipeline folder (model_index.json and one subfolder per part,
by the pipeline's own save_pretrained) that `StableDiffusion(model=folder)` loads through the very code path real
weights take. Sizes, per family:

- SD 1.x / 2.x: 'tiny' (tests), 'tiny-v' (the same, v-prediction: SD 2.x-768's kind), 'mid' (SD 2.1-base's UNet
  scaled to channels 64-128-256-256, ~36 M parameters), 'sd21' and 'sd15' (the real architectures);
- SDXL: 'tiny-sdxl' (tests), 'sdxl' (SDXL base's real architecture);
- SD 3: 'tiny-sd3' (tests; t5=False leaves T5 out), 'sd35m' (SD 3.5 medium's real transformer, CLIPs and VAE,
  always without its 4.7 B-parameter T5-XXL: 19 GB in float32 is more than a stand-in is worth; the model then
  runs with zeros in T5's place, as diffusers does).

Nothing is downloaded: the CLIP tokenizer's BPE comes from open_clip, the tiny T5 tokenizer is built in code.
"""
from __future__ import annotations

import gzip
import string
from pathlib import Path

SD_SIZES = ("tiny", "tiny-v", "mid", "sd21", "sd15")
SDXL_SIZES = ("tiny-sdxl", "sdxl")
SD3_SIZES = ("tiny-sd3", "sd35m")
SIZES = SD_SIZES + SDXL_SIZES + SD3_SIZES

_SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
_UNET = {
    "tiny": dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                 attention_head_dim=(2, 4), norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "mid": dict(sample_size=64, block_out_channels=(64, 128, 256, 256), layers_per_block=2, cross_attention_dim=512,
                attention_head_dim=(1, 2, 4, 4), use_linear_projection=True,
                down_block_types=_SD_DOWN, up_block_types=_SD_UP),
    "sd21": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                 down_block_types=_SD_DOWN, up_block_types=_SD_UP),
    "sd15": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8, down_block_types=_SD_DOWN, up_block_types=_SD_UP),
    # SDXL: the UNet also takes the pooled text embedding and 6 size ids (addition_embed_type "text_time"):
    # projection_class_embeddings_input_dim = 6 x addition_time_embed_dim + the second encoder's projection_dim.
    "tiny-sdxl": dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
                      attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                      addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + 32),
    "sdxl": dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                 attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
}
_UNET["tiny-v"] = _UNET["tiny"]
_TRANSFORMER = {
    # pooled_projection_dim = both CLIPs' projection_dim; joint_attention_dim = T5's d_model (the hidden width).
    "tiny-sd3": dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
                     num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16,
                     pooled_projection_dim=64, pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm"),
    "sd35m": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                  qk_norm="rms_norm"),
}
_VAE_TINY = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=16)
_VAE_REAL = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
_VAE = {
    "tiny": _VAE_TINY, "tiny-v": _VAE_TINY,
    "mid": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=32, sample_size=512),
    "sd21": dict(_VAE_REAL, sample_size=768), "sd15": dict(_VAE_REAL, sample_size=512),
    "tiny-sdxl": dict(_VAE_TINY, scaling_factor=0.13025, force_upcast=True),
    "sdxl": dict(_VAE_REAL, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    "tiny-sd3": dict(_VAE_TINY, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                     use_quant_conv=False, use_post_quant_conv=False),
    "sd35m": dict(_VAE_REAL, sample_size=1024, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                  use_quant_conv=False, use_post_quant_conv=False),
}
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               hidden_act="quick_gelu", projection_dim=768)
_CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  hidden_act="gelu", projection_dim=1280)
_CLIP_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
_TEXT = {  # one config per text encoder of the family
    "tiny": (dict(_CLIP_TINY, projection_dim=512),), "tiny-v": (dict(_CLIP_TINY, projection_dim=512),),
    "mid": (dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                 projection_dim=512),),
    "sd21": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu", projection_dim=512),),
    "sd15": (_CLIP_L,),
    "tiny-sdxl": (_CLIP_TINY, _CLIP_TINY), "sdxl": (_CLIP_L, _CLIP_BIGG),
    "tiny-sd3": (_CLIP_TINY, _CLIP_TINY), "sd35m": (_CLIP_L, _CLIP_BIGG),
}
_T5_TINY = dict(d_model=64, d_kv=8, d_ff=64, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu")


def build_clip_tokenizer():
    """Return CLIP's BPE tokenizer (49408 tokens, 77 max) built offline from the vocabulary open_clip ships."""
    import importlib.util

    from transformers import CLIPTokenizer

    # Locate open_clip's BPE file without importing the package (and its model zoo).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("building the CLIP tokenizer offline needs open_clip_torch: pip install open_clip_torch")
    bpe_path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    byte_chars = _bytes_to_unicode()
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_t5_tokenizer():
    """Return a small T5 (unigram) tokenizer built in code: characters and word-initial characters, ~120 pieces.

    Not T5's 32k vocabulary (that needs its sentencepiece file); it tokenizes any English prompt, which is all a
    random-weight T5 needs.
    """
    from transformers import T5TokenizerFast

    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + list(chars) + ["\u2581" + c for c in string.ascii_lowercase]
    vocab = [(piece, 0.0 if i < 3 else -float(len(piece))) for i, piece in enumerate(pieces)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def _bytes_to_unicode() -> list[str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return [chars[b] for b in printable] + [chars[b] for b in range(256) if b not in printable]


def _vae(size: str):
    from diffusers import AutoencoderKL

    config = dict(_VAE[size])
    n_blocks = len(config["block_out_channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=config.pop("latent_channels", 4),
                         down_block_types=("DownEncoderBlock2D",) * n_blocks,
                         up_block_types=("UpDecoderBlock2D",) * n_blocks, **config)


def _clip(config: dict, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **config)
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def build_random_sd(folder: str | Path, size: str = "tiny", seed: int = 0, t5: bool = True) -> Path:
    """Return folder after writing a random-weight pipeline of the given size into it (diffusers layout).

    t5: 'tiny-sd3' only, whether the folder has a T5 text encoder (text_encoder_3 / tokenizer_3).
    """
    if size not in SIZES:
        raise ValueError(f"unknown random SD size {size!r}: use one of {', '.join(SIZES)}")
    folder = Path(folder)
    import torch  # here, so that bench.py's argument checks read SIZES without importing torch

    torch.manual_seed(seed)
    if size in SD_SIZES:
        pipe = _sd_pipeline(size)
    elif size in SDXL_SIZES:
        pipe = _sdxl_pipeline(size)
    else:
        pipe = _sd3_pipeline(size, t5 and size != "sd35m")
    pipe.save_pretrained(folder)
    return folder


def _sd_pipeline(size: str):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **_UNET[size])
    vae = _vae(size)
    text_encoder = _clip(_TEXT[size][0], with_projection=False)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000,
                              prediction_type="v_prediction" if size == "tiny-v" else "epsilon")
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _sdxl_pipeline(size: str):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **_UNET[size])
    vae = _vae(size)
    text_encoder = _clip(_TEXT[size][0], with_projection=False)
    text_encoder_2 = _clip(_TEXT[size][1], with_projection=True)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=build_clip_tokenizer(), tokenizer_2=build_clip_tokenizer(), unet=unet,
                                     scheduler=scheduler)


def _sd3_pipeline(size: str, t5: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(**_TRANSFORMER[size])
    vae = _vae(size)
    text_encoder = _clip(_TEXT[size][0], with_projection=True)
    text_encoder_2 = _clip(_TEXT[size][1], with_projection=True)
    text_encoder_3 = tokenizer_3 = None
    if t5:
        from transformers import T5Config, T5EncoderModel

        tokenizer_3 = build_t5_tokenizer()
        text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), **_T5_TINY))
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(),
                                    text_encoder_2=text_encoder_2, tokenizer_2=build_clip_tokenizer(),
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
