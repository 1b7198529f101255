"""Distillation guidance: the models (Stable Diffusion per family, the toy worlds), the losses, the noise-path math,
the generators and the loop. `guidance.load_model(name, device=..., precision=...)` is the one factory."""
from __future__ import annotations

from guidance.models import load_model  # noqa: F401 (the public factory)
