"""View-dependent prompts and the Janus tools: Perp-Neg and score clipping.

A 2D model asked for "a corgi" from every side draws the corgi's face on every side (the Janus problem). Three
remedies, each usable alone:

- View prompts (DreamFusion): "<prompt>, front view" / "side view" / "back view" / "overhead view" by the camera
  (Camera.view(): threestudio's thresholds), with the embeddings of neighbouring views interpolated linearly by
  azimuth as stable-dreamfusion does: for |az| < 90, r = 1 - |az| / 90 and e = r e_front + (1 - r) e_side; else
  r = 2 - |az| / 90 and e = r e_side + (1 - r) e_back; e_overhead above 60 degrees elevation. `interpolate=False`
  uses the view's own embedding; `enabled=False` the bare prompt.
- Perp-Neg (Armandpour et al. 2023, eq. 8): the other views as negative prompts, only their components
  perpendicular to the positive prompt's direction removed, so that they cannot cancel the prompt itself:
      eps = eps_u + s (d_pos - sum_k w_k perp(d_k, d_pos)),   d = eps_x - eps_u,   perp(a, b) = a - (a.b / b.b) b,
  per view, with threestudio's weights w_k(r) = a exp(-b r) + c (shifted exponentials, PERP_NEG_WEIGHTS).
- Score clipping (Debiasing Scores, Hong et al., NeurIPS 2023): the gradient clamped elementwise to +-c(step),
  c rising linearly from 0.5 to 2.0 over the first 5000 steps (threestudio's dreamfusion-sd grad_clip).
"""
from __future__ import annotations

import math

import torch

from guidance.cameras import OVERHEAD_ELEVATION, VIEWS, Camera, CameraRanges, wrap_azimuth  # noqa: F401 (VIEWS)

INTERPOLATED_VIEWS = ("front", "side", "back")
# threestudio's Perp-Neg weights f(r) = a exp(-b r) + c: (a, b, c) for each negative prompt, by region.
PERP_NEG_WEIGHTS = {
    "front_side": {"front": (4.0, 0.5, -2.426), "side": (4.0, 0.5, -2.426)},  # f_fs(r), f_sf(1 - r)
    "side_back": {"side": (1.0, 0.5, -0.606), "front": (1.0, 0.5, 0.967)},  # f_sb(r), f_fsb(r)
}
NEGATIVES_PER_VIEW = 2
SCORE_CLIP = (0, 0.5, 2.0, 5000)  # (first step, c there, c at the last step, last step): threestudio's order


def view_prompt(prompt: str, view: str) -> str:
    """Return "<prompt>, <view> view"."""
    return f"{prompt}, {view} view"


def view_weights(camera: Camera, interpolate: bool = True) -> dict[str, float]:
    """Return {view: weight} (weights sum to 1) of the view embeddings that make this camera's embedding."""
    if camera.elevation > OVERHEAD_ELEVATION:
        return {"overhead": 1.0}
    if not interpolate:
        return {camera.view(): 1.0}
    azimuth = abs(wrap_azimuth(camera.azimuth))
    if azimuth < 90.0:
        r = 1.0 - azimuth / 90.0
        return {"front": r, "side": 1.0 - r}
    r = 2.0 - azimuth / 90.0
    return {"side": r, "back": 1.0 - r}


def _shifted_exp(abc: tuple, r: float) -> float:
    a, b, c = abc
    return a * math.exp(-b * r) + c


def perp_neg_weights(camera: Camera) -> list[tuple[str, float]]:
    """Return the camera's NEGATIVES_PER_VIEW (view, weight) negative prompts (weights >= 0; 0 above 60 degrees)."""
    if camera.elevation > OVERHEAD_ELEVATION:
        return [("side", 0.0), ("front", 0.0)]
    azimuth = abs(wrap_azimuth(camera.azimuth))
    if azimuth < 90.0:  # r = 1: the front, r = 0: the side
        r, f = 1.0 - azimuth / 90.0, PERP_NEG_WEIGHTS["front_side"]
        return [("front", _shifted_exp(f["front"], r)), ("side", _shifted_exp(f["side"], 1.0 - r))]
    r, f = 2.0 - azimuth / 90.0, PERP_NEG_WEIGHTS["side_back"]  # r = 1: the side, r = 0: the back
    return [("side", _shifted_exp(f["side"], r)), ("front", _shifted_exp(f["front"], r))]


class ViewPrompts:
    """A prompt's per-camera text embeddings: view-dependent (interpolated) or the bare prompt.

    prompts() lists every string to encode up front (the overhead view only where the elevation range reaches
    above 60 degrees); embeddings(model, cameras) gives one cond row per camera; perp_neg_rows(...) the rows of a
    Perp-Neg call.
    """

    def __init__(self, prompt: str, enabled: bool = True, interpolate: bool = True,
                 ranges: CameraRanges = CameraRanges()):
        self.prompt, self.enabled, self.interpolate = prompt, bool(enabled), bool(interpolate)
        views = list(INTERPOLATED_VIEWS)
        if float(ranges.elevation[1]) > OVERHEAD_ELEVATION:
            views.append("overhead")
        self.views = tuple(views)

    def prompts(self) -> list[str]:
        """Return every prompt string the embeddings use."""
        if not self.enabled:
            return [self.prompt]
        return [view_prompt(self.prompt, view) for view in self.views]

    def _view_embedding(self, model, view: str) -> torch.Tensor:
        return model.get_text_embeds(view_prompt(self.prompt, view) if self.enabled else self.prompt)

    def embeddings(self, model, cameras: list[Camera]) -> torch.Tensor:
        """Return the cond rows [N = len(cameras), ...] (row i for camera i), each sum_v w_v(c_i) e_v."""
        if not self.enabled:
            embedding = model.get_text_embeds(self.prompt)
            return embedding.expand(len(cameras), *embedding.shape[1:])
        rows = []
        for camera in cameras:
            weights = view_weights(camera, self.interpolate)
            rows.append(sum(w * self._view_embedding(model, view) for view, w in weights.items() if w != 0.0))
        return torch.cat(rows)

    def perp_neg_rows(self, model, cameras: list[Camera], uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (embeddings [(2 + K) N, ...] = cat[uncond x N, positive rows, negatives k-major], weights [N, K]).

        Row layout of one Perp-Neg UNet call over latents [x_t] * (2 + K): rows 0..N-1 the negative prompt
        (uncond), N..2N-1 embeddings(model, cameras), then for k = 0..K-1 the N cameras' k-th negative view.
        """
        if not self.enabled:
            raise ValueError("Perp-Neg needs view prompts: build ViewPrompts(prompt, enabled=True)")
        n = len(cameras)
        negatives = [perp_neg_weights(camera) for camera in cameras]
        neg_rows = [self._view_embedding(model, negatives[i][k][0])
                    for k in range(NEGATIVES_PER_VIEW) for i in range(n)]
        rows = torch.cat([uncond.expand(n, *uncond.shape[1:]), self.embeddings(model, cameras), torch.cat(neg_rows)])
        weights = torch.tensor([[w for _, w in negs] for negs in negatives], dtype=torch.float32)
        return rows, weights


class PerpNegEmbeddings:
    """The text embeddings of a Perp-Neg step: the rows of ViewPrompts.perp_neg_rows and their negatives' weights.

    Passed where a loss takes cat[uncond, cond]; guidance/core.py's get_noise_preds combines the rows by Perp-Neg
    (perp_neg_noise_preds) in place of classifier-free guidance.
    """

    def __init__(self, rows: torch.Tensor, weights: torch.Tensor):
        self.rows, self.weights = rows, weights


def perpendicular(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return a - (a . b / b . b) b per row (the component of each a [B, ...] perpendicular to its b)."""
    dims = tuple(range(1, a.dim()))
    coeff = (a * b).sum(dims, keepdim=True) / (b * b).sum(dims, keepdim=True).clamp(min=1e-12)
    return a - coeff * b


def perp_neg(eps_uncond: torch.Tensor, eps_pos: torch.Tensor, eps_negs: torch.Tensor, weights: torch.Tensor,
             guidance_scale: float) -> torch.Tensor:
    """Return eps_u + s (d_pos - sum_k w_k perp(d_k, d_pos)) with d = eps - eps_u (Perp-Neg, eq. 8).

    eps_uncond, eps_pos [B, ...]; eps_negs [K, B, ...] (negative k of every row); weights [B, K] (>= 0).
    """
    d_pos = eps_pos - eps_uncond
    removed = torch.zeros_like(d_pos)
    shape = (-1,) + (1,) * (d_pos.dim() - 1)
    for k in range(eps_negs.shape[0]):
        removed = removed + weights[:, k].to(d_pos).view(shape) * perpendicular(eps_negs[k] - eps_uncond, d_pos)
    return eps_uncond + guidance_scale * (d_pos - removed)


def perp_neg_noise_preds(model, latents_noisy: torch.Tensor, t, rows: torch.Tensor, weights: torch.Tensor,
                         guidance_scale: float) -> torch.Tensor:
    """Return the Perp-Neg prediction for latents_noisy [N, ...] from ONE UNet call of (2 + K) N rows.

    rows, weights: ViewPrompts.perp_neg_rows(...). This is what get_noise_preds returns in place of CFG when a
    run uses Perp-Neg.
    """
    n = latents_noisy.shape[0]
    k = weights.shape[1]
    eps = model.predict_eps(torch.cat([latents_noisy] * (2 + k)), t, rows)
    eps_uncond, eps_pos = eps[:n], eps[n:2 * n]
    eps_negs = eps[2 * n:].view(k, n, *eps.shape[1:])
    return perp_neg(eps_uncond, eps_pos, eps_negs, weights.to(eps.device), guidance_scale)


def score_clip_value(step: int, schedule: tuple = SCORE_CLIP) -> float:
    """Return c(step): schedule = (first step, c there, c at the last step, last step), linear between, constant
    outside (threestudio's [start step, start value, end value, end step])."""
    first, start, end, last = schedule
    fraction = min(max((step - first) / max(last - first, 1), 0.0), 1.0)
    return start + (end - start) * fraction


def clip_score(grad: torch.Tensor, step: int, schedule: tuple = SCORE_CLIP) -> torch.Tensor:
    """Return the gradient clamped elementwise to [-c(step), c(step)] (Debiasing Scores' score clipping).

    A loss's gradient is model.last_guidance['grad']; the loop re-forms the loss as
    guidance.core.reparam_loss(latents, clip_score(grad, step)).
    """
    c = score_clip_value(step, schedule)
    return grad.clamp(-c, c)
