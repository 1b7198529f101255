"""Distillation guidance: the Stable Diffusion wrapper (sd.py), its schedule math (schedule.py), the toy world."""
from __future__ import annotations


def load_model(model: str, **kwargs):
    """Return the guidance model for a name: 'toy' gives the exact toy world, anything else Stable Diffusion."""
    if model == "toy":
        from guidance.toy import ToyDiffusion

        return ToyDiffusion(**kwargs)
    from guidance.sd import StableDiffusion

    return StableDiffusion(model, **kwargs)
