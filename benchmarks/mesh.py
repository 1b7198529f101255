"""What the mesh generator (guidance/mesh.py, guidance/raster.py) costs, and which texture parameterisation paints best.

    python -m benchmarks.mesh                        # cost table: --sizes 512 1024 --faces 10000 100000 --threads 2
    python -m benchmarks.mesh --compare              # network vs direct texture under SDS in the exact toy world

`run` times, per (mesh size, render size), each configuration in a fresh child process (so that its peak RSS is its
own): rasterising a view (a camera seen for the first time: face ids, barycentrics, UVs, normals), fetching a cached
view, and sampling a 512 x 512 texture for the view plus the backward pass to the texture; and, per render size, the
network texture's forward + backward (independent of the mesh). The mesh is a UV sphere of radius MESH_RADIUS (a user's
mesh, normalised)
(4 random cameras from the training ranges; the median is reported).

`compare_parameterisations` runs SDS (main.py's loop: AdamW at --lr 0.1, 2000 x loss, guidance 25) in the toy world
(guidance/toy.py, an exact model) on a textured plane that fills the front camera's 64 x 64 frame, so the render is
the texture seen through the mesh renderer, and scores the final front view with the toy's exact metrics.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _sphere_for(faces: int):
    """Return a UV sphere of about `faces` faces (2 x segments x (rings - 1), segments = 2 rings) at MESH_RADIUS."""
    from guidance.mesh import MESH_RADIUS, sphere_mesh

    rings = max(3, round((faces / 4) ** 0.5))
    return sphere_mesh(MESH_RADIUS, segments=2 * rings, rings=rings)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _measure(device: str, size: int, faces: int, threads: int, texture_size: int, repeats: int) -> dict:
    """Return one row of timings (milliseconds) and memory (MB), measured in this process."""
    import torch

    from guidance.cameras import CameraSampler
    from guidance.raster import ViewCache, render_view

    torch.set_num_threads(threads)
    mesh = _sphere_for(faces)
    dev = torch.device(device)
    cache = ViewCache(mesh.vertices.to(dev), mesh.faces.to(dev), mesh.uv.to(dev), mesh.normals.to(dev))
    cameras = CameraSampler(views_per_step=repeats + 1, generator=torch.Generator().manual_seed(0))()
    texture = torch.rand(3, texture_size, texture_size, device=dev, requires_grad=True)
    base_rss = _rss_mb()

    def timed(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3, out

    cache(cameras[0], size, size)  # warm-up: first-call allocations
    raster, lookup, sample, covered = [], [], [], []
    for camera in cameras[1:]:
        ms, view = timed(lambda: cache(camera, size, size))
        raster.append(ms)
        lookup.append(timed(lambda: cache(camera, size, size))[0])
        covered.append(int(view.pixels.numel()))

        def sample_and_backward():
            texture.grad = None
            render_view(view, texture, torch.zeros(3, device=dev)).sum().backward()

        sample.append(timed(sample_and_backward)[0])
    return {"faces": int(mesh.faces.shape[0]), "size": size, "texture_size": texture_size,
            "raster_ms": statistics.median(raster), "cached_ms": statistics.median(lookup),
            "sample_backward_ms": statistics.median(sample), "covered_pixels": int(statistics.median(covered)),
            "base_rss_mb": base_rss, "peak_rss_mb": _rss_mb()}


def _measure_network(device: str, texture_size: int, threads: int, repeats: int) -> dict:
    """Return the network texture's forward + backward time (ms) and its parameter count."""
    import torch

    from guidance.mesh import TextureNetwork

    torch.set_num_threads(threads)
    net = TextureNetwork(texture_size, torch.Generator().manual_seed(0)).to(device)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        net().sum().backward()
        times.append((time.perf_counter() - start) * 1e3)
    return {"texture_size": texture_size, "network_ms": statistics.median(times[1:]),
            "parameters": sum(p.numel() for p in net.parameters())}


def _child(kind: str, **kwargs) -> dict:
    """Return a measurement made in a fresh Python process (its own peak RSS; no thread pool inherited)."""
    command = [sys.executable, "-m", "benchmarks.mesh", "--child", json.dumps({"kind": kind, **kwargs})]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark child {kwargs} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(device: str = "cpu", sizes=(512, 1024), faces=(10_000, 100_000), threads: int = 2,
        texture_size: int = 512, repeats: int = 4) -> dict:
    """Return the cost of the mesh renderer per (faces, render size) and of the network texture, measured now."""
    import torch

    rows = [_child("render", device=device, size=int(s), faces=int(f), threads=int(threads),
                   texture_size=int(texture_size), repeats=int(repeats)) for f in faces for s in sizes]
    network = _child("network", device=device, texture_size=int(texture_size), threads=int(threads),
                     repeats=int(repeats))
    return {"device": device, "threads": int(threads), "torch": torch.__version__, "cpus": os.cpu_count(),
            "load_average": os.getloadavg(), "repeats": int(repeats), "rows": rows, "network": network}


def format(result: dict) -> str:  # noqa: A001 - the name the project's benchmarks use
    """Return the cost result as a markdown table with a line on the setting."""
    lines = [f"Device {result['device']}, {result['threads']} thread(s), torch {result['torch']}, "
             f"load average {result['load_average'][0]:.1f} on {result['cpus']} CPUs; medians over "
             f"{result['repeats']} random views. Texture {result['rows'][0]['texture_size']} px.", "",
             "| faces | render px | covered px | rasterise a new view (ms) | cached view (ms) | "
             "texture lookup + backward (ms) | peak RSS (MB) | RSS before (MB) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['faces']:,} | {row['size']} | {row['covered_pixels']:,} | {row['raster_ms']:.0f} | "
                     f"{row['cached_ms']:.3f} | {row['sample_backward_ms']:.0f} | {row['peak_rss_mb']:.0f} | "
                     f"{row['base_rss_mb']:.0f} |")
    net = result["network"]
    lines += ["", f"Network texture ({net['parameters']:,} parameters) at {net['texture_size']} px: forward + backward "
                  f"{net['network_ms']:.0f} ms per step (once per step, whatever the number of views)."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the comparison
def _plane():
    """Return a textured square in the plane x = 0 facing +x that exactly fills the front camera's frame."""
    import math

    import numpy as np
    import torch

    from guidance.cameras import Camera
    from guidance.mesh import TexturedMesh

    camera = Camera(0.0, 0.0, 1.75, 55.0)
    half = camera.distance * math.tan(math.radians(camera.fovy) / 2)
    corners = np.array([[0.0, -half, -half], [0.0, half, -half], [0.0, half, half], [0.0, -half, half]])
    mesh = TexturedMesh(torch.from_numpy(corners).float(), torch.tensor([[0, 1, 2], [0, 2, 3]]),
                        torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]),
                        torch.tensor([[1.0, 0.0, 0.0]]).expand(4, 3).contiguous(), corners, np.eye(3), 1.0,
                        np.zeros(3), "plane", "built-in")
    return mesh, camera


def sds_in_the_toy_world(texture_param: str, prompt: str, seed: int, steps: int = 500, lr: float = 0.1,
                         guidance_scale: float = 25.0) -> dict:
    """Return the toy metrics of the front view after SDS on the plane's texture (64 px), and the seconds it took."""
    import torch

    from guidance.mesh import MeshGenerator
    from guidance.toy import ToyDiffusion, image_metrics

    torch.manual_seed(seed)
    toy = ToyDiffusion()
    mesh, camera = _plane()
    gen = MeshGenerator(toy, mesh=mesh, texture_size=64, texture_param=texture_param, eval_camera=camera,
                        generator=torch.Generator().manual_seed(seed))
    embeddings = torch.cat([toy.get_text_embeds(""), toy.get_text_embeds(prompt)])
    optimizer = torch.optim.AdamW(gen.param_groups(lr), weight_decay=0)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = toy.get_sds_loss(gen.latents(toy, [camera]), embeddings, guidance_scale=guidance_scale)
        (2000 * loss).backward()
        optimizer.step()
    metrics = image_metrics(gen.image(toy)[0] * 2 - 1, prompt)
    return {**metrics, "seconds": time.perf_counter() - start}


def compare_parameterisations(prompts=("a red circle", "a blue square"), seeds=(0, 1, 2), steps: int = 500,
                              lrs=(0.03, 0.1, 0.3), texture_params=("network", "direct"), threads: int = 1) -> dict:
    """Return, per parameterisation and --lr, the toy metrics of SDS runs over prompts x seeds (see the docstring)."""
    import torch

    from guidance.mesh import LRS

    torch.set_num_threads(threads)
    runs = []
    for texture_param in texture_params:
        for lr in lrs:
            for prompt in prompts:
                for seed in seeds:
                    runs.append({"texture_param": texture_param, "lr": lr, "prompt": prompt, "seed": seed,
                                 "adam_lr": lr * LRS[texture_param] / 0.1,
                                 **sds_in_the_toy_world(texture_param, prompt, seed, steps, lr)})
    return {"steps": steps, "runs": runs}


def format_comparison(result: dict) -> str:
    """Return the comparison as a markdown table: per (parameterisation, --lr), in-class rate and template MSE."""
    lines = [f"SDS, {result['steps']} steps, guidance 25, toy world, a plane filling the 64 x 64 front view "
             f"(texture 64 px); mean over prompts x seeds. A sample of the world is at MSE ~0.0025.", "",
             "| texture | --lr | Adam rate | in class | template MSE (mean) | template MSE (worst) | s / run |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    keys = sorted({(r["texture_param"], r["lr"]) for r in result["runs"]})
    for texture_param, lr in keys:
        runs = [r for r in result["runs"] if (r["texture_param"], r["lr"]) == (texture_param, lr)]
        mse = [r["template_mse"] for r in runs]
        in_class = sum(r["in_class"] for r in runs)
        lines.append(f"| {texture_param} | {lr:g} | {runs[0]['adam_lr']:g} | {in_class}/{len(runs)} | "
                     f"{statistics.mean(mse):.4f} | {max(mse):.4f} | "
                     f"{statistics.mean(r['seconds'] for r in runs):.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--faces", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--texture_size", type=int, default=512)
    parser.add_argument("--compare", action="store_true", help="network vs direct texture under SDS in the toy world")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.03, 0.1, 0.3], help="--compare: main.py --lr values")
    parser.add_argument("--texture_params", nargs="+", default=["network", "direct"], help="--compare: which ones")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        kind = spec.pop("kind")
        out = _measure(**spec) if kind == "render" else _measure_network(**spec)
        print(json.dumps(out))
        return
    if args.compare:
        result = compare_parameterisations(steps=args.steps, lrs=args.lrs, texture_params=args.texture_params)
        text = format_comparison(result)
    else:
        result = run(args.device, args.sizes, args.faces, args.threads, args.texture_size)
        text = format(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
