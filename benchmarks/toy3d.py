"""Text-to-3D in the exact toy 3D world: a minimal SDS loop over the NeRF generator, the scores of its turntable
against the true object, and the Janus table (view prompts, their interpolation, Perp-Neg, score clipping).

    python -m benchmarks.toy3d                      # the Janus table: 7 runs, 3-6 minutes on one CPU thread
    python -m benchmarks.toy3d --gif docs/3d/toy_cube.gif

distil() is the loop the lead's main.py runs, reduced to what the NeRF needs: per step, cameras from the sampler,
latents = generator.latents(model, cameras), the loss with one cond row per view (or Perp-Neg's rows), total =
LOSS_SCALE x loss + generator.regularization(), AdamW at --lr 0.1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from guidance.cameras import Camera, CameraSampler, turntable
from guidance.core import reparam_loss
from guidance.nerf import NerfGenerator
from guidance.views import ViewPrompts, clip_score, perp_neg_noise_preds

LOSS_SCALE = 2000.0  # main.py's
CUBE = "a red cube with a yellow front"


def distil(model, prompt: str, steps: int, view_prompts: bool = True, interpolate: bool = False,
           perp_neg: bool = False, score_clip: tuple | None = None, seed: int = 0, guidance_scale: float = 7.5,
           weighting: str = "sigma_over_alpha", views_per_step: int = 1, render_camera=None) -> NerfGenerator:
    """Return a NeRF distilled by SDS in `steps` steps; render_camera(camera) -> the camera rendered (mutants)."""
    torch.manual_seed(seed)
    gen = NerfGenerator(model, generator=torch.Generator().manual_seed(seed))
    sampler = CameraSampler(model.camera_ranges, views_per_step, torch.Generator().manual_seed(seed + 1))
    prompts = ViewPrompts(prompt, enabled=view_prompts, interpolate=interpolate)
    uncond = model.get_text_embeds(model.default_negative_prompt)
    optimizer = torch.optim.AdamW(gen.param_groups(0.1), lr=0.1, weight_decay=0)
    for step in range(steps):
        cameras = sampler(step)
        optimizer.zero_grad(set_to_none=True)
        latents = gen.latents(model, [render_camera(c) for c in cameras] if render_camera else cameras)
        if perp_neg:  # SDS written out, with Perp-Neg in place of CFG
            t = model.sample_timestep()
            noise = torch.randn_like(latents)
            rows, weights = prompts.perp_neg_rows(model, cameras, uncond)
            with torch.no_grad():
                eps = perp_neg_noise_preds(model, model.schedule.add_noise(latents.detach(), noise, t), t, rows,
                                           weights, guidance_scale)
            model.last_guidance = {"grad": model.schedule.weight(t, weighting) * (eps - noise)}
            loss = reparam_loss(latents, model.last_guidance["grad"])
        else:
            embeddings = torch.cat([uncond.expand(len(cameras), -1), prompts.embeddings(model, cameras)])
            loss = model.get_sds_loss(latents, embeddings, guidance_scale=guidance_scale, weighting=weighting)
        if score_clip is not None:
            loss = reparam_loss(latents, clip_score(model.last_guidance["grad"], step, score_clip))
        (LOSS_SCALE * loss + gen.regularization()).backward()
        optimizer.step()
    return gen


def yellow_fraction(rgba: torch.Tensor) -> float:
    """Return the fraction of covered pixels (alpha > 0.5) that are yellow: green above 0.6 x red (red's is 0.2)."""
    covered = rgba[3] > 0.5
    r, g = rgba[0][covered], rgba[1][covered]
    return float(((g > 0.6 * r) & (r > 0.1)).float().mean()) if covered.any() else 0.0


def turntable_scores(model, gen, prompt: str, frames: int = 12, shown_azimuth=lambda azimuth: azimuth) -> list:
    """Return per turntable frame (IoU of alpha > 0.5 with the true object's, mean |RGB error| over their union,
    yellow fraction of the NeRF's frame); shown_azimuth: the azimuth the NeRF is rendered at (mutants)."""
    obj = model.true_object(prompt)
    scores = []
    for camera in turntable(frames, distance=1.75, fovy=55.0):
        shown = Camera(camera.elevation, shown_azimuth(camera.azimuth), camera.distance, camera.fovy)
        ours, truth = gen.render_rgba(shown, 32), model.render(obj, camera, 32)
        a, b = ours[3] > 0.5, truth[3] > 0.5
        union = a | b
        error = float((ours[:3] - truth[:3]).abs().sum(0)[union].mean() / 3)
        scores.append((float((a & b).sum() / union.sum()), error, yellow_fraction(ours)))
    return scores


VARIANTS = {  # name -> distil options, for CUBE
    "view prompts (Camera.view())": {},
    "view prompts, weighting uniform": {"weighting": "uniform"},
    "view prompts interpolated (stable-dreamfusion)": {"interpolate": True},
    "no view prompts": {"view_prompts": False},
    "Perp-Neg (interpolated positives)": {"perp_neg": True, "interpolate": True},
    "Perp-Neg (Camera.view() positives)": {"perp_neg": True},
    "view prompts + score clipping 0.5 -> 2 over the run": {"score_clip": (0, 0.5, 2.0, 300)},
}


class TrueObject:
    """The true object behind the generator's render_rgba (the table's reference row)."""

    def __init__(self, model, prompt: str):
        self.model, self.obj = model, model.true_object(prompt)

    def render_rgba(self, camera: Camera, size: int) -> torch.Tensor:
        return self.model.render(self.obj, camera, size)


def _row(name: str, seed, seconds: float, scores: list) -> dict:
    yellow = [s[2] for s in scores]  # azimuths 0, 30, ..., 330
    return {"variant": name, "seed": seed, "seconds": round(seconds, 1),
            "iou": round(sum(s[0] for s in scores) / len(scores), 3),
            "colour_error": round(sum(s[1] for s in scores) / len(scores), 3),
            "yellow_front": round((yellow[0] + yellow[1] + yellow[11]) / 3, 3),
            "yellow_back": round((yellow[5] + yellow[6] + yellow[7]) / 3, 3)}


def janus_table(model, steps: int = 300, seeds=(0,), variants=VARIANTS) -> list[dict]:
    """Return the true object's row, then one row per (variant, seed): seconds, mean IoU, colour error, yellow
    fraction seen in front (azimuths 0, +-30) and from behind (150, 180, 210)."""
    rows = [_row("the true object", "-", 0.0, turntable_scores(model, TrueObject(model, CUBE), CUBE))]
    for name, options in variants.items():
        for seed in seeds:
            started = time.perf_counter()
            gen = distil(model, CUBE, steps, seed=seed, **options)
            rows.append(_row(name, seed, time.perf_counter() - started, turntable_scores(model, gen, CUBE)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def format(rows: list[dict], steps: int) -> str:
    """Return the Janus table in markdown."""
    lines = [f"\"{CUBE}\", NeRF + SDS (CFG 7.5), {steps} steps, one view per step; turntable at elevation 15, "
             f"12 frames, 32 px; yellow: fraction of covered pixels, in front (azimuths 0, +-30) and behind (150-210)",
             "", "| variant | seed | s | IoU | colour error | yellow front | yellow back |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['seconds']:.0f} | {r['iou']:.3f} | "
                     f"{r['colour_error']:.3f} | {r['yellow_front']:.3f} | {r['yellow_back']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="*", default=None, help="names of VARIANTS (default: all)")
    parser.add_argument("--gif", default=None, help="write the cube's turntable GIF (60 frames, 128 px) here instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from guidance.toy3d import Toy3DDiffusion

    model = Toy3DDiffusion()
    if args.gif:
        import tempfile
        from pathlib import Path

        from guidance.export import write_turntable

        gen = distil(model, CUBE, args.steps)
        with tempfile.TemporaryDirectory() as frames:
            write_turntable(lambda c: gen.render_rgba(c, 128), turntable(60, distance=1.75, fovy=55.0), frames,
                            Path(args.gif))
        print(f"wrote {args.gif}")
        return 0
    variants = VARIANTS if args.variants is None else {name: VARIANTS[name] for name in args.variants}
    print(format(janus_table(model, args.steps, args.seeds, variants), args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
