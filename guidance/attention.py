"""The UNet's attention on CPUs: PyTorch's SDPA, with the queries folded into the batch when gradients flow.

PyTorch's CPU flash-attention backward shares its work out over batch x heads only, so an attention with one
head at batch 1 runs its backward on one core: that is VSD's LoRA training step at the 64x64 level of `mid`
(4096 tokens, one head), where the attention backward is the largest single cost of the step. Cutting the
queries into s blocks and stacking them along the batch (keys and values expanded, not copied) gives
s x batch x heads independent pieces and the same result, since each query's softmax still runs over all keys.
The forward kernel already splits queries over cores, so calls without gradients take the stock path.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

MIN_QUERIES_PER_BLOCK = 256  # below this a block's kernel overhead outweighs the extra parallelism


def query_blocks(batch_heads: int, n_queries: int, threads: int) -> int:
    """Return how many query blocks s to fold into the batch so that s * batch_heads pieces share out evenly over
    threads (1: no folding)."""
    s = threads // math.gcd(batch_heads, threads)
    if s <= 1 or n_queries % s or n_queries // s < MIN_QUERIES_PER_BLOCK:
        return 1
    return s


class CpuAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA attention processor whose backward uses every CPU thread (see the module docstring)."""

    def __init__(self, threads: int | None = None):
        super().__init__()
        self.threads = threads  # None: torch.get_num_threads() at each call

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        """Return the attention block's output, as AttnProcessor2_0 computes it."""
        simple = (hidden_states.ndim == 3 and attention_mask is None and attn.spatial_norm is None
                  and attn.group_norm is None and attn.norm_q is None and attn.norm_k is None
                  and not attn.residual_connection and (encoder_hidden_states is None or not attn.norm_cross))
        if not (torch.is_grad_enabled() and simple):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        batch, n_queries, _ = hidden_states.shape
        heads = attn.heads
        s = query_blocks(batch * heads, n_queries, self.threads or torch.get_num_threads())
        if s == 1:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // heads
        block = n_queries // s
        # (batch, tokens, heads * d) -> (batch * s, heads, tokens / s, d); keys and values: the same for every block
        query = query.view(batch, s, block, heads, head_dim).permute(0, 1, 3, 2, 4).reshape(batch * s, heads, block, head_dim)

        def per_block(x: torch.Tensor) -> torch.Tensor:
            x = x.view(batch, 1, -1, heads, head_dim).transpose(2, 3)
            return x.expand(batch, s, heads, x.shape[3], head_dim).reshape(batch * s, heads, -1, head_dim)

        out = F.scaled_dot_product_attention(query, per_block(key), per_block(value))
        out = out.view(batch, s, heads, block, head_dim).permute(0, 1, 3, 2, 4).reshape(batch, n_queries, heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out.to(query.dtype)))
        return out / attn.rescale_output_factor


def use_cpu_attention(unet: torch.nn.Module, threads: int | None = None) -> int:
    """Give every attention of unet that runs diffusers' stock SDPA processor a CpuAttnProcessor; return how many."""
    processors = unet.attn_processors
    stock = {name for name, p in processors.items() if type(p) is AttnProcessor2_0}
    if stock:
        processor = CpuAttnProcessor(threads)
        unet.set_attn_processor({name: processor if name in stock else p for name, p in processors.items()})
    return len(stock)
