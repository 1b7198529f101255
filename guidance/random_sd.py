"""Random-weight Stable Diffusion folders built from configs: the test model and the benchmark's stand-ins.

`build_random_sd(folder, size)` writes a diffusers folder (unet/, vae/, text_encoder/, tokenizer/,
scheduler/) that `StableDiffusion(model=folder)` loads through the very code path real weights take.
Sizes: 'tiny' (tests), 'mid' (SD 2.1-base's UNet scaled to channels 64-128-256-256, ~36 M parameters),
'sd21' (SD 2.1-base's real architecture). Nothing is downloaded: the tokenizer's BPE comes from open_clip.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import torch

SIZES = ("tiny", "mid", "sd21")

_UNET = {
    "tiny": dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                 attention_head_dim=(2, 4), norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "mid": dict(sample_size=64, block_out_channels=(64, 128, 256, 256), layers_per_block=2, cross_attention_dim=512,
                attention_head_dim=(1, 2, 4, 4), use_linear_projection=True,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "sd21": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
}
_VAE = {
    "tiny": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=16),
    "mid": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=32, sample_size=512),
    "sd21": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=768),
}
_TEXT = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    "mid": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8),
    "sd21": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 hidden_act="gelu"),
}


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


def build_random_sd(folder: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Return folder after writing a random-weight Stable Diffusion of the given size into it (diffusers layout)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if size not in SIZES:
        raise ValueError(f"unknown random SD size {size!r}: use one of {', '.join(SIZES)}")
    folder = Path(folder)
    torch.manual_seed(seed)
    UNet2DConditionModel(in_channels=4, out_channels=4, **_UNET[size]).save_pretrained(folder / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * len(_VAE[size]["block_out_channels"]),
                  up_block_types=("UpDecoderBlock2D",) * len(_VAE[size]["block_out_channels"]),
                  **_VAE[size]).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, projection_dim=512,
                                 **_TEXT[size])).save_pretrained(folder / "text_encoder")
    build_clip_tokenizer().save_pretrained(folder / "tokenizer")
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    return folder
