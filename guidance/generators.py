"""Generators x = g(theta; c): what the losses optimise, rendered to an image that the model's VAE encodes.

The course optimises the latent itself (g = identity). The same losses paint anything differentiable that
renders an image (DreamFusion's NeRF, VectorFusion's SVG): the loss's gradient w.r.t. the latents flows back
through the VAE encoder and the renderer into theta. Every generator here is plain PyTorch (CPU and GPU
alike) and offers the same small interface, so main.run never asks which one it holds:

    param_groups(lr)  AdamW parameter groups, each with its own learning rate (lr = main.py's --lr,
                      the latent's; the others scale their rates by lr / DEFAULT_LR)
    sample_view()     this step's view c: None, or with --augment a random crop and warp per image (3D
                      generators, needs_cameras = True, are shown cameras drawn by the loop instead)
    latents(model, view)  the latents the losses see, differentiable in theta
    regularization()  what the generator adds to the scaled loss (0 here; a NeRF's regularisers)
    render()          [B, 3, H, W] in [0, 1] at render_size (the model's resolution by default)
    image(model)      the final image in [0, 1] for saving
    save(dir, name)   extra artefacts (the vector generator's SVG), a list of paths
    fit(images)       theta fitted to images by MSE (PDS/DDS start from their source image this way)

latent     theta = the latents (today's behaviour exactly).
pixels     theta = RGB logits, image = sigmoid(theta), optionally at a lower resolution upsampled bilinearly.
           A sigmoid rather than a clamp: a clamped pixel pushed past 0 or 1 has zero gradient and
           cannot come back when the loss changes its mind; a sigmoid pixel always can.
gaussians  2D Gaussians (GaussianImage, Image-GS): tanh-bounded centres, a Cholesky factor with a floor on
           its diagonal, colour, opacity, composited front to back in index order over a learnable background.
vector     closed cubic Bezier paths and circles with fill colour and opacity (VectorFusion, SVGDreamer),
           soft-rasterised: coverage = sigmoid(-signed distance / tau); the inside/outside sign from a
           winding number (no gradient), the distance differentiable in the control points, so that
           shapes move, not only recolour. Saved also as an SVG that any SVG renderer shows as the PNG.

Gaussians and shapes are rasterised locally (`composite`): each shape only touches the pixels of its
bounding box (a Gaussian's 3-sigma box, a path's control-point box plus the soft edge), as a list of
(shape, pixel) fragments composited per pixel in depth order with a segmented prefix sum of log(1 - alpha).
Memory grows with the fragments, not with shapes x pixels; big renders are cut into chunks of shapes whose
forward is recomputed in backward (torch.utils.checkpoint), so that one chunk's fragments live at a time.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from guidance.common import UserError, atomic_write_bytes, save_torch_atomic

GENERATORS = ("latent", "pixels", "gaussians", "vector", "nerf", "mesh")  # nerf: guidance/nerf.py; mesh: guidance/mesh.py
IMAGE_GENERATORS = GENERATORS[:4]  # theta renders an image; nerf and mesh render 3D from the loop's cameras
DEFAULT_LR = 0.1  # main.py's --lr: the latent's rate, and the reference the other generators' rates scale with
DEFAULT_NUM_SHAPES = 256
FIT_STEPS = 300
ALPHA_MAX = 0.999  # log(1 - alpha) stays finite; an opaque shape lets 0.1% through
FRAGMENT_BUDGET = 1_000_000  # fragments per chunk of shapes: a few hundred MB of autograd state at a time
SEARCH_BLOCK = 65_536  # fragments per block of the vector generator's nearest-edge search (no grad)


# ----------------------------------------------------------------------------------------------- views
def random_views(batch: int, generator: torch.Generator, crop_area=(0.7, 0.9),
                 distortion: float = 0.5) -> list[torch.Tensor]:
    """Return one random view per image: the 3x3 homography of a square crop of 70-90% of the image's area,
    then a perspective warp (VectorFusion's RandomResizedCrop + RandomPerspective as one homography).

    The warped crop's corners move inward only, so the view never samples outside the image (no fill colour).
    """
    views = []
    for _ in range(batch):
        u = torch.rand(6, generator=generator, dtype=torch.float64)
        side = math.sqrt(crop_area[0] + (crop_area[1] - crop_area[0]) * float(u[0]))  # in units of the image side
        x0 = -1 + (2 - 2 * side) * float(u[1])
        y0 = -1 + (2 - 2 * side) * float(u[2])
        corners = torch.tensor([[x0, y0], [x0 + 2 * side, y0], [x0 + 2 * side, y0 + 2 * side], [x0, y0 + 2 * side]],
                               dtype=torch.float64)
        inward = torch.tensor([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=torch.float64)
        shift = torch.rand(4, 2, generator=generator, dtype=torch.float64) * distortion * side
        corners = corners + inward * shift
        views.append(_homography(torch.tensor([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=torch.float64), corners))
    return views


def apply_views(imgs: torch.Tensor, homographies: list[torch.Tensor]) -> torch.Tensor:
    """Return each image seen through its view (random_views), with grid_sample: differentiable in the image."""
    _, _, height, width = imgs.shape
    views = []
    for i, homography in enumerate(homographies):
        ys = (torch.arange(height, dtype=torch.float64) + 0.5) / height * 2 - 1
        xs = (torch.arange(width, dtype=torch.float64) + 0.5) / width * 2 - 1
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points = torch.stack([grid_x, grid_y, torch.ones_like(grid_x)], -1) @ homography.T
        grid = (points[..., :2] / points[..., 2:]).to(imgs.device, imgs.dtype)
        views.append(F.grid_sample(imgs[i:i + 1], grid[None], mode="bilinear", padding_mode="border",
                                   align_corners=False))
    return torch.cat(views)


def _homography(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Return the 3x3 homography H with H [src_k, 1] ~ [dst_k, 1] for four point pairs (float64)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src.tolist(), dst.tolist()):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    h = torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64))
    return torch.cat([h, h.new_ones(1)]).view(3, 3)


# ----------------------------------------------------------------------------------------------- rasteriser
def composite(height: int, width: int, boxes: torch.Tensor, alpha_fn, colours: torch.Tensor,
              background: torch.Tensor, fragment_budget: int = FRAGMENT_BUDGET) -> torch.Tensor:
    """Return the [3, H, W] image of shapes composited front to back (shape 0 in front) over a background.

    boxes: [N, 4] integer pixel boxes (x0, y0, x1, y1), end-exclusive, outside which shape k has alpha 0;
    alpha_fn(shape [F], y [F], x [F]) -> alpha [F] of those fragments, differentiable; colours [N, 3].
    Per pixel, C = sum_k c_k a_k prod_{j<k} (1 - a_j) + bg prod_j (1 - a_j). Shapes go in chunks of at most
    fragment_budget fragments (one shape at least); chunk images compose by 'over' (associative), and when
    there are several chunks each one's forward is recomputed in backward instead of kept.
    """
    counts = ((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)).tolist()
    chunks, start, total = [], 0, 0
    for k, count in enumerate(counts):
        if total and total + count > fragment_budget:
            chunks.append((start, k))
            start, total = k, 0
        total += count
    chunks.append((start, len(counts)))
    colour_sum = torch.zeros(3, height * width, device=colours.device, dtype=colours.dtype)
    log_transmittance = torch.zeros(height * width, device=colours.device, dtype=colours.dtype)
    recompute = len(chunks) > 1 and torch.is_grad_enabled()
    for first, last in chunks:
        if recompute:
            chunk_colour, chunk_log_t = checkpoint(_composite_chunk, first, last, width, boxes, alpha_fn, colours,
                                                   height * width, use_reentrant=False)
        else:
            chunk_colour, chunk_log_t = _composite_chunk(first, last, width, boxes, alpha_fn, colours, height * width)
        colour_sum = colour_sum + log_transmittance.exp() * chunk_colour
        log_transmittance = log_transmittance + chunk_log_t
    image = colour_sum + log_transmittance.exp() * background.view(3, 1)
    return image.view(3, height, width)


def _composite_chunk(first: int, last: int, width: int, boxes: torch.Tensor, alpha_fn, colours: torch.Tensor,
                     n_pixels: int):
    """Return ([3, H*W] premultiplied colour, [H*W] log transmittance) of shapes first..last-1 over nothing."""
    device = colours.device
    box = boxes[first:last]
    box_w = (box[:, 2] - box[:, 0]).clamp(min=0)
    counts = box_w * (box[:, 3] - box[:, 1]).clamp(min=0)
    local = torch.repeat_interleave(torch.arange(last - first, device=device), counts)
    offset = torch.arange(local.numel(), device=device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    xs = box[local, 0] + offset % box_w[local]
    ys = box[local, 1] + offset // box_w[local]
    shape = local + first
    # Fragments come shape by shape, front first: a stable sort by pixel keeps that depth order inside each pixel.
    pixel, order = torch.sort(ys * width + xs, stable=True)
    shape, ys, xs = shape[order], ys[order], xs[order]
    alpha = alpha_fn(shape, ys, xs).clamp(0, ALPHA_MAX)
    log_keep = torch.log1p(-alpha)
    # Transmittance in front of each fragment: an exclusive prefix sum of log(1 - alpha) within its pixel's run.
    exclusive = log_keep.double().cumsum(0) - log_keep.double()
    run_start = torch.ones_like(pixel, dtype=torch.bool)
    run_start[1:] = pixel[1:] != pixel[:-1]
    first_of_run = torch.cummax(torch.where(run_start, torch.arange(pixel.numel(), device=device), 0), 0).values
    in_front = (exclusive - exclusive[first_of_run]).to(alpha.dtype)
    weight = alpha * in_front.exp()
    chunk_colour = torch.zeros(3, n_pixels, device=device, dtype=colours.dtype)
    chunk_colour = chunk_colour.index_add(1, pixel, (weight[:, None] * colours.index_select(0, shape)).T)
    chunk_log_t = torch.zeros(n_pixels, device=device, dtype=colours.dtype).index_add(0, pixel, log_keep)
    return chunk_colour, chunk_log_t


def _pixel_centres(index: torch.Tensor, size: int) -> torch.Tensor:
    """Return the [-1, 1] coordinates of pixel centres along an axis of `size` pixels."""
    return (index.to(torch.float32) + 0.5) * (2.0 / size) - 1.0


def _boxes(lo: torch.Tensor, hi: torch.Tensor, size: int) -> torch.Tensor:
    """Return [N, 4] integer boxes (x0, y0, x1, y1) of the pixels whose centres lie in [lo, hi] ([N, 2], in [-1, 1])."""
    lo_px = torch.ceil((lo.detach() + 1) * (size / 2) - 0.5).clamp(0, size)
    hi_px = (torch.floor((hi.detach() + 1) * (size / 2) - 0.5) + 1).clamp(0, size)
    return torch.cat([lo_px, hi_px], 1).long()


# ----------------------------------------------------------------------------------------------- generators
class Generator:
    """The interface every generator offers (see the module docstring); subclasses set `groups` and `render`."""

    name = "generator"

    def __init__(self, model, batch: int, render_size: int | None, augment: bool, generator: torch.Generator,
                 output_size: tuple[int, int] | None = None):
        self.device = model.device
        self.batch = int(batch)
        self.render_size = int(render_size or model.resolution)
        # What the model sees and main.py saves: the square render resized to (H, W) (PDS: the source's size).
        self.output_size = tuple(output_size or (model.resolution, model.resolution))
        self.augment = bool(augment)
        self.rng = generator
        self.groups: list[dict] = []  # {"name", "params", "lr"}: the rates at --lr = DEFAULT_LR

    def parameters(self) -> list[torch.Tensor]:
        """Return every tensor theta is made of."""
        return [p for group in self.groups for p in group["params"]]

    def param_groups(self, lr: float = DEFAULT_LR) -> list[dict]:
        """Return AdamW parameter groups: each group's own rate, scaled by lr / DEFAULT_LR."""
        return [{"name": g["name"], "params": list(g["params"]), "lr": lr * (g["lr"] / DEFAULT_LR)}
                for g in self.groups]

    needs_cameras = False  # 3D generators render from cameras the loop draws (guidance/cameras.py)

    def render(self) -> torch.Tensor:
        raise NotImplementedError

    def sample_view(self) -> list[torch.Tensor] | None:
        """Return this step's view: with augment, a random crop and warp per image (random_views); else None."""
        return random_views(self.batch, self.rng) if self.augment else None

    def latents(self, model, view=None) -> torch.Tensor:
        """Return the latents the losses see: the VAE encoding of the render (seen through `view`, if any)."""
        imgs = self.render()
        if view is not None:
            imgs = apply_views(imgs, view)
        return model.encode_imgs(self._to_output_size(imgs), requires_grad=True)

    def regularization(self) -> float | torch.Tensor:
        """Return what this generator adds to the run's scaled loss (nothing for a 2D generator)."""
        return 0.0

    def final_view(self):
        """Return the view the run's final latents are taken at: none for an image (a 3D generator: its front)."""
        return None

    def _to_output_size(self, imgs: torch.Tensor) -> torch.Tensor:
        if tuple(imgs.shape[-2:]) == self.output_size:
            return imgs
        return F.interpolate(imgs, size=self.output_size, mode="bilinear", antialias=True, align_corners=False)

    @torch.no_grad()
    def image(self, model) -> torch.Tensor:
        """Return the final [B, 3, H, W] image in [0, 1]: the render itself (no view, no VAE round trip)."""
        return self._to_output_size(self.render()).clamp(0, 1)

    def save(self, save_dir, name: str) -> list[Path]:
        """Return the paths of the artefacts written besides main.py's PNG (none by default)."""
        return []

    def finite(self) -> bool:
        """Return whether every parameter is finite."""
        return all(bool(torch.isfinite(p).all()) for p in self.parameters())

    def state(self) -> list[torch.Tensor]:
        """Return a copy of theta (main.py keeps one to step back from a NaN)."""
        return [p.detach().clone() for p in self.parameters()]

    def load_state(self, state: list[torch.Tensor]) -> None:
        """Set theta to a copy returned by state()."""
        with torch.no_grad():
            for p, saved in zip(self.parameters(), state):
                p.copy_(saved)

    def fit(self, target_imgs: torch.Tensor, steps: int = FIT_STEPS, lr: float = DEFAULT_LR) -> float:
        """Return the final MSE after fitting theta to [B or 1, 3, H, W] images in [0, 1] by Adam on MSE."""
        target = target_imgs.to(self.device, torch.float32)
        if target.shape[-2:] != (self.render_size, self.render_size):
            target = F.interpolate(target, size=(self.render_size, self.render_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        target = target.expand(self.batch, -1, -1, -1)
        optimizer = torch.optim.Adam(self.param_groups(lr))
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = F.mse_loss(self.render(), target)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            return float(F.mse_loss(self.render(), target))


class LatentGenerator(Generator):
    """g = identity: theta is the latents themselves (the course's setting; main.py's behaviour unchanged)."""

    name = "latent"

    def __init__(self, model, batch, render_size=None, augment=False, generator=None, init_latents=None):
        super().__init__(model, batch, render_size, augment, generator)
        if init_latents is None:
            init_latents = torch.randn(model.latent_shape(batch), dtype=torch.float32).to(model.device)
        self.theta = init_latents.requires_grad_(True)
        self.groups = [{"name": "latents", "params": [self.theta], "lr": DEFAULT_LR}]

    def latents(self, model, view=None) -> torch.Tensor:
        """Return the latents: the parameter itself."""
        return self.theta

    def render(self) -> torch.Tensor:
        raise NotImplementedError("the latent generator renders through the model: use image(model)")

    @torch.no_grad()
    def image(self, model) -> torch.Tensor:
        """Return the decoded latents in [0, 1]."""
        return model.decode_latents(self.theta.detach())

    def fit(self, target_imgs, steps=FIT_STEPS, lr=DEFAULT_LR):
        raise NotImplementedError("the latent generator starts from the encoded image itself: pass init_latents")


class PixelGenerator(Generator):
    """theta = [B, 3, S, S] logits, image = sigmoid(theta), upsampled bilinearly to render_size when S is smaller."""

    name = "pixels"
    LR = 0.2  # in logits: at sigmoid's steepest, ~0.05 of the [0, 1] range per step, the latent's 0.1 in [-1, 1]

    def __init__(self, model, batch, render_size=None, augment=False, generator=None, output_size=None,
                 pixel_size=None):
        super().__init__(model, batch, render_size, augment, generator, output_size)
        self.pixel_size = int(pixel_size or self.render_size)
        shape = (self.batch, 3, self.pixel_size, self.pixel_size)
        self.logits = torch.randn(shape, generator=self.rng).mul_(0.5).to(self.device).requires_grad_(True)
        self.groups = [{"name": "pixels", "params": [self.logits], "lr": self.LR}]

    def render(self) -> torch.Tensor:
        imgs = torch.sigmoid(self.logits)
        if self.pixel_size != self.render_size:
            imgs = F.interpolate(imgs, size=(self.render_size, self.render_size), mode="bilinear", align_corners=False)
        return imgs


class GaussianGenerator(Generator):
    """num_shapes 2D Gaussians per image, composited front to back in index order over a learnable background.

    centre = tanh(raw) in [-1, 1]^2; covariance = L L^T with L = [[a, 0], [b, c]], a and c in
    [floor, max_sigma] (sigmoid-bounded: the floor, half a pixel, keeps a Gaussian from vanishing between
    pixel centres; the ceiling bounds a Gaussian's box), b = max_sigma tanh(raw); colour and opacity sigmoids.
    Lengths are in [-1, 1] image units, so theta does not depend on the render size.
    """

    name = "gaussians"
    # Per group, at --lr 0.1 (Adam steps in raw units; GaussianImage fits with 1e-3 over 50k steps, SDS has 500).
    LRS = {"centres": 0.02, "covariance": 0.03, "colours": 0.05, "opacities": 0.05, "background": 0.05}
    MAX_SIGMA = 0.5

    def __init__(self, model, batch, render_size=None, augment=False, generator=None, output_size=None,
                 num_shapes=DEFAULT_NUM_SHAPES):
        super().__init__(model, batch, render_size, augment, generator, output_size)
        n, b, rng = int(num_shapes), self.batch, self.rng
        self.floor = 1.0 / self.render_size  # half a pixel
        # n disks of radius 2 sigma0 cover the image ~3 times; at least a pixel wide on small renders.
        sigma0 = min(0.5 * self.MAX_SIGMA, max(1.0 / math.sqrt(n), 2 * self.floor))

        def param(t):
            return t.to(self.device).requires_grad_(True)

        self.centre_raw = param(torch.atanh((torch.rand(b, n, 2, generator=rng) * 2 - 1) * 0.9))
        start = self._logit((sigma0 - self.floor) / (self.MAX_SIGMA - self.floor))
        self.scale_raw = param(torch.full((b, n, 2), start))
        self.shear_raw = param(torch.zeros(b, n))
        self.colour_raw = param(torch.randn(b, n, 3, generator=rng))
        self.opacity_raw = param(torch.zeros(b, n))
        self.background_raw = param(torch.zeros(b, 3))
        self.groups = [
            {"name": "centres", "params": [self.centre_raw], "lr": self.LRS["centres"]},
            {"name": "covariance", "params": [self.scale_raw, self.shear_raw], "lr": self.LRS["covariance"]},
            {"name": "colours", "params": [self.colour_raw], "lr": self.LRS["colours"]},
            {"name": "opacities", "params": [self.opacity_raw], "lr": self.LRS["opacities"]},
            {"name": "background", "params": [self.background_raw], "lr": self.LRS["background"]},
        ]

    @staticmethod
    def _logit(p: float) -> float:
        return math.log(p / (1 - p))

    def constrained(self, i: int) -> dict:
        """Return image i's Gaussians in image units: centre [N, 2], Cholesky a, b, c [N], colour, opacity, bg."""
        a, c = (self.floor + (self.MAX_SIGMA - self.floor) * torch.sigmoid(self.scale_raw[i])).unbind(-1)
        return {"centre": torch.tanh(self.centre_raw[i]), "a": a, "b": self.MAX_SIGMA * torch.tanh(self.shear_raw[i]),
                "c": c, "colour": torch.sigmoid(self.colour_raw[i]), "opacity": torch.sigmoid(self.opacity_raw[i]),
                "background": torch.sigmoid(self.background_raw[i])}

    def render(self) -> torch.Tensor:
        return torch.stack([self._render_one(i) for i in range(self.batch)])

    def _render_one(self, i: int) -> torch.Tensor:
        g, size = self.constrained(i), self.render_size
        centre, a, b, c = g["centre"], g["a"], g["b"], g["c"]
        # The 3-sigma ellipse's bounding box: half-widths 3 sqrt(Sigma_xx), 3 sqrt(Sigma_yy).
        half = 3 * torch.stack([a, torch.sqrt(b**2 + c**2)], -1)
        boxes = _boxes(centre - half, centre + half, size)

        # One gather per fragment of everything a Gaussian's alpha needs (its backward: one index_add).
        packed = torch.stack([centre[:, 0], centre[:, 1], 1 / a, b, 1 / c, g["opacity"]], -1)

        def alpha_fn(k, ys, xs):
            cx, cy, inv_a, b_k, inv_c, opacity = packed.index_select(0, k).unbind(-1)
            u1 = (_pixel_centres(xs, size) - cx) * inv_a  # L^-1 d: then d^T Sigma^-1 d = |L^-1 d|^2
            u2 = (_pixel_centres(ys, size) - cy - b_k * u1) * inv_c
            return opacity * torch.exp(-0.5 * (u1**2 + u2**2))

        return composite(size, size, boxes, alpha_fn, g["colour"], g["background"])

    def save(self, save_dir, name: str) -> list[Path]:
        """Write <save_dir>/<name>.gaussians.pt: every image's Gaussians in image units; return its path."""
        with torch.no_grad():
            state = [{k: v.detach().cpu() for k, v in self.constrained(i).items()} for i in range(self.batch)]
        return [save_torch_atomic({"render_size": self.render_size, "images": state},
                                  Path(save_dir) / f"{name}.gaussians.pt")]


class VectorGenerator(Generator):
    """num_shapes filled shapes per image, painted in index order (the last on top, as SVG paints).

    The first 3/4 are closed cubic Bezier paths of SEGMENTS segments (control points free in [-1, 1] image
    units), the rest circles (centre, radius). Fill colour and opacity in [0, 1] (projected back into range
    before each render, as VectorFusion clamps after each step). Coverage of a pixel centre p is
    sigmoid(-s(p) / tau) with s the signed distance to the outline in pixels: |s| is the distance to the
    outline (each segment flattened to a few chords), differentiable in the control points; its sign comes
    from the nonzero winding number (SVG's default fill rule) and carries no gradient. A hard inside test
    alone would give the control points no gradient at all.
    """

    name = "vector"
    SEGMENTS = 4
    TAU = 0.5  # pixels: soft edges while optimising
    EXPORT_TAU = 0.25  # pixels: the final image; a sigmoid of slope 1 per pixel, as a box-filtered hard edge
    CIRCLE_FRACTION = 0.25
    # At --lr 0.1, in pixels of the render per step (points; VectorFusion: 1) and colour units (VectorFusion: 0.01).
    LRS_PX = {"points": 0.5}
    LRS = {"colours": 0.02, "background": 0.02}

    def __init__(self, model, batch, render_size=None, augment=False, generator=None, output_size=None,
                 num_shapes=DEFAULT_NUM_SHAPES):
        super().__init__(model, batch, render_size, augment, generator, output_size)
        n, b, rng = int(num_shapes), self.batch, self.rng
        self.num_circles = int(round(n * self.CIRCLE_FRACTION)) if n > 1 else 0
        self.num_paths = n - self.num_circles
        self.tau = self.TAU
        px = 2.0 / self.render_size  # one pixel in image units
        radius = torch.rand(b, n, generator=rng) * 0.1 + 0.05  # VectorFusion-like blobs, 2.5-7.5% of the side
        centre = (torch.rand(b, n, 2, generator=rng) * 2 - 1) * 0.9
        # Paths: points on a jittered circle, 3 per segment, so each starts as a blob.
        angles = torch.linspace(0, 2 * math.pi, 3 * self.SEGMENTS + 1)[:-1]
        circle = torch.stack([angles.cos(), angles.sin()], -1)
        jitter = 1 + 0.3 * (torch.rand(b, self.num_paths, 3 * self.SEGMENTS, 1, generator=rng) - 0.5)
        points = centre[:, :self.num_paths, None] + radius[:, :self.num_paths, None, None] * circle * jitter

        def param(t):
            return t.contiguous().to(self.device).requires_grad_(True)

        self.points = param(points)
        self.circle_centre = param(centre[:, self.num_paths:])
        self.circle_radius = param(radius[:, self.num_paths:])
        self.fill = param(torch.cat([torch.rand(b, n, 3, generator=rng), torch.full((b, n, 1), 0.7)], -1))
        self.background = param(torch.full((b, 3), 0.5))
        self.groups = [
            {"name": "points", "params": [self.points, self.circle_centre, self.circle_radius],
             "lr": self.LRS_PX["points"] * px},
            {"name": "colours", "params": [self.fill], "lr": self.LRS["colours"]},
            {"name": "background", "params": [self.background], "lr": self.LRS["background"]},
        ]
        # Chords per segment: a quarter circle of radius 0.075 x the side, flattened, is off by < 0.2 px.
        self.flatten = 4 if self.render_size <= 128 else 8
        t = torch.arange(self.flatten, dtype=torch.float32) / self.flatten
        self.bernstein = torch.stack([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3], -1).to(self.device)

    @torch.no_grad()
    def _project(self) -> None:
        self.fill.clamp_(0, 1)
        self.background.clamp_(0, 1)
        self.circle_radius.clamp_(min=1.0 / self.render_size)

    def outlines(self, i: int) -> torch.Tensor:
        """Return image i's paths flattened: [P, SEGMENTS * flatten, 2] polygon vertices in image units."""
        pts = self.points[i]  # [P, 3S, 2]
        seg = torch.stack([pts[:, 0::3], pts[:, 1::3], pts[:, 2::3], pts.roll(-3, 1)[:, 0::3]], 2)  # [P, S, 4, 2]
        return torch.einsum("kj,psjd->pskd", self.bernstein, seg).reshape(pts.shape[0], -1, 2)

    def render(self, tau: float | None = None) -> torch.Tensor:
        self._project()
        return torch.stack([self._render_one(i, self.tau if tau is None else tau) for i in range(self.batch)])

    @torch.no_grad()
    def image(self, model) -> torch.Tensor:
        """Return the final image, rendered with the export's sharp edges (what the SVG shows)."""
        return self._to_output_size(self.render(self.EXPORT_TAU)).clamp(0, 1)

    def _render_one(self, i: int, tau: float) -> torch.Tensor:
        size, n_paths = self.render_size, self.num_paths
        px = 2.0 / size
        margin = 6 * tau * px  # beyond 6 tau outside a shape its coverage is below sigmoid(-6) = 0.0025
        verts = self.outlines(i)
        centre, radius = self.circle_centre[i], self.circle_radius[i]
        lo = torch.cat([self.points[i].amin(1), centre - radius[:, None]]) - margin
        hi = torch.cat([self.points[i].amax(1), centre + radius[:, None]]) + margin
        # The compositor puts shape 0 in front; SVG paints the last shape on top: depth k is shape n - 1 - k.
        n = n_paths + centre.shape[0]
        depth_to_shape = torch.arange(n - 1, -1, -1, device=self.device)
        boxes = _boxes(lo, hi, size)[depth_to_shape]
        fill = self.fill[i][depth_to_shape]

        def alpha_fn(k, ys, xs):
            shape = depth_to_shape[k]
            p = torch.stack([_pixel_centres(xs, size), _pixel_centres(ys, size)], -1)
            signed = torch.empty(p.shape[0], device=p.device, dtype=p.dtype)
            is_path = shape < n_paths
            if is_path.any():
                signed[is_path] = _signed_distance_to_outline(p[is_path], verts, shape[is_path])
            if (~is_path).any():
                j = shape[~is_path] - n_paths
                signed[~is_path] = (p[~is_path] - centre[j]).norm(dim=-1) - radius[j]
            return torch.sigmoid(-signed / (tau * px)) * fill[k, 3]

        return composite(size, size, boxes, alpha_fn, fill[:, :3], self.background[i])

    def save(self, save_dir, name: str) -> list[Path]:
        """Write <save_dir>/<name>.svg (image 0; others to <name>/particles/particle_i.svg); return the paths."""
        paths = []
        for i in range(self.batch):
            path = Path(save_dir) / (f"{name}.svg" if i == 0 else f"{name}/particles/particle_{i}.svg")
            atomic_write_bytes(path, self.svg(i).encode())
            paths.append(path)
        return paths

    @torch.no_grad()
    def svg(self, i: int = 0) -> str:
        """Return image i as an SVG document: background, paths, circles in paint order, drawn on a render_size
        square and shown at output_size (stretched as the PNG is)."""
        self._project()
        size = self.render_size
        height, width = self.output_size

        def xy(v):  # image units -> SVG pixels
            return (v + 1) * (size / 2)

        def colour(k):
            r, g, b, a = self.fill[i, k].tolist()
            return f'fill="rgb({r * 255:.2f},{g * 255:.2f},{b * 255:.2f})" fill-opacity="{a:.4f}"'

        bg = ",".join(f"{v * 255:.2f}" for v in self.background[i].tolist())
        lines = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                 f'viewBox="0 0 {size} {size}" preserveAspectRatio="none">',
                 f'<rect x="0" y="0" width="{size}" height="{size}" fill="rgb({bg})"/>']
        for k in range(self.num_paths):
            pts = xy(self.points[i, k]).tolist()
            d = [f"M {pts[0][0]:.3f} {pts[0][1]:.3f}"]
            for s in range(self.SEGMENTS):
                c1, c2, end = pts[3 * s + 1], pts[3 * s + 2], pts[(3 * s + 3) % len(pts)]
                d.append(f"C {c1[0]:.3f} {c1[1]:.3f} {c2[0]:.3f} {c2[1]:.3f} {end[0]:.3f} {end[1]:.3f}")
            lines.append(f'<path d="{" ".join(d)} Z" {colour(k)}/>')
        for j in range(self.num_circles):
            cx, cy = xy(self.circle_centre[i, j]).tolist()
            r = float(self.circle_radius[i, j]) * size / 2
            lines.append(f'<circle cx="{cx:.3f}" cy="{cy:.3f}" r="{r:.3f}" {colour(self.num_paths + j)}/>')
        lines.append("</svg>")
        return "\n".join(lines) + "\n"


def _signed_distance_to_outline(p: torch.Tensor, verts: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Return the signed distance (negative inside, nonzero winding rule) of points p [F, 2] to polygons verts[shape].

    The nearest edge and the winding number are found without gradients, block by block (an [F, E] search);
    the distance to that edge is then recomputed with gradients, so autograd keeps O(F), not O(F x E).
    """
    n_edges = verts.shape[1]
    with torch.no_grad():
        start = verts.detach()
        edge = start.roll(-1, 1) - start
        # Per path and edge: start x, y, edge x, y, 1 / |edge|^2, gathered per fragment in one index_select.
        table = torch.stack([start[..., 0], start[..., 1], edge[..., 0], edge[..., 1],
                             1 / (edge**2).sum(-1).clamp(min=1e-12)], 1)  # [P, 5, E]
        nearest = torch.empty(p.shape[0], dtype=torch.long, device=p.device)
        inside = torch.empty(p.shape[0], dtype=torch.bool, device=p.device)
        for lo in range(0, p.shape[0], SEARCH_BLOCK):
            block = slice(lo, lo + SEARCH_BLOCK)
            ax, ay, ex, ey, inv_len2 = table.index_select(0, shape[block]).unbind(1)  # [f, E] each
            rx = p[block, 0:1] - ax
            ry = p[block, 1:2] - ay
            t = ((rx * ex + ry * ey) * inv_len2).clamp_(0, 1)
            nearest[block] = ((rx - t * ex) ** 2 + (ry - t * ey) ** 2).argmin(1)
            # Crossings of the ray from q towards +x, signed by the edge's direction (SVG's nonzero rule).
            cross = ex * ry - ey * rx
            up = (ry >= 0) & (ry < ey) & (cross > 0)
            down = (ry < 0) & (ry >= ey) & (cross < 0)
            inside[block] = up.sum(1) != down.sum(1)
    flat = verts.reshape(-1, 2)
    a = flat.index_select(0, shape * n_edges + nearest)
    b = flat.index_select(0, shape * n_edges + (nearest + 1) % n_edges)
    ab = b - a
    t = (((p - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp(min=1e-12)).clamp(0, 1)
    distance = ((p - a - t[:, None] * ab) ** 2).sum(-1).add(1e-12).sqrt()
    return torch.where(inside, -distance, distance)


def build_generator(name: str, model, batch: int = 1, render_size: int | None = None,
                    num_shapes: int = DEFAULT_NUM_SHAPES, seed: int = 0, generator: torch.Generator | None = None,
                    init_latents: torch.Tensor | None = None, fit_latents: torch.Tensor | None = None,
                    augment: bool = False, pixel_size: int | None = None, fit_steps: int = FIT_STEPS) -> Generator:
    """Return the generator `name` (one of GENERATORS) for `batch` images, initialised from `seed` (or `generator`).

    init_latents: the latent generator's starting latents (used as they are, not copied: main.py's tensor).
    fit_latents: the other generators start from a fit of theta to these latents' decoded image (PDS: the
    source), and show the model images of its size; without it they start from their random initialisation.
    """
    if name not in GENERATORS:
        raise ValueError(f"unknown generator {name!r}: use one of {', '.join(GENERATORS)}")
    rng = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    if name == "latent":
        return LatentGenerator(model, batch, render_size, augment, rng, init_latents=init_latents)
    output_size = None
    if fit_latents is not None:
        per_latent = model.resolution // model.latent_size  # pixels per latent (8 for SD's VAE, 1 in the toy)
        output_size = (fit_latents.shape[-2] * per_latent, fit_latents.shape[-1] * per_latent)
    common = dict(render_size=render_size, augment=augment, generator=rng, output_size=output_size)
    if name == "pixels":
        gen = PixelGenerator(model, batch, pixel_size=pixel_size, **common)
    elif name == "gaussians":
        gen = GaussianGenerator(model, batch, num_shapes=num_shapes, **common)
    else:
        gen = VectorGenerator(model, batch, num_shapes=num_shapes, **common)
    if fit_latents is not None:
        gen.fit(model.decode_latents(fit_latents.detach()), steps=fit_steps)
    return gen


# Which generators each generator flag is for: a flag given to another generator is an error.
FLAG_OWNERS = {
    "render_size": ("pixels", "gaussians", "vector", "nerf", "mesh"), "num_shapes": ("gaussians", "vector"),
    "pixel_size": ("pixels",), "augment": ("pixels", "gaussians", "vector"),
    **dict.fromkeys(("views_per_step", "elevation_range", "azimuth_range", "distance_range", "fovy_range",
                     "no_view_prompts", "view_interpolation", "perp_neg", "shading", "background", "resume"),
                    ("nerf", "mesh")),
    **dict.fromkeys(("latent_render", "lambda_orientation", "lambda_sparsity", "lambda_entropy"), ("nerf",)),
    **dict.fromkeys(("mesh", "texture_size", "texture_param", "mesh_up", "mesh_front"), ("mesh",)),
}
DEFAULTS_OF_FLAGS = {"views_per_step": 1, "lambda_orientation": 0.0, "lambda_sparsity": 0.0, "lambda_entropy": 0.0}


def check_config(config) -> None:
    """Check a run configuration's generator settings (before any model loads); a flag of another generator is an
    error, and so is a 3D generator with a method it cannot serve."""
    name = config.generator
    for flag, generators in FLAG_OWNERS.items():
        value = getattr(config, flag, None)
        if value not in (None, False, DEFAULTS_OF_FLAGS.get(flag)) and name not in generators:
            raise UserError(f"--{flag} is for --generator {' / '.join(generators)}, not {name}: drop it or choose "
                            f"one of those generators")
    for flag, low, high in (("render_size", 8, 4096), ("num_shapes", 1, 100_000), ("pixel_size", 1, 4096),
                            ("views_per_step", 1, 64), ("turntable_frames", 1, 3600)):
        value = getattr(config, flag, None)
        if value is not None and not low <= value <= high:
            raise UserError(f"--{flag} {value} must be between {low} and {high}")
    if config.checkpoint_every < 0:
        raise UserError(f"--checkpoint_every {config.checkpoint_every} must be >= 0 (0: no checkpoints)")
    if name in IMAGE_GENERATORS:
        return
    method = config.method
    if method.edits:
        raise UserError(f"--loss_type {config.loss_type} edits an image, and --generator {name} has no image to start "
                        f"from: edit with an image generator ({', '.join(IMAGE_GENERATORS)}), or generate with "
                        f"{name}")
    if config.perp_neg and (config.loss_type not in ("sds", "ism") or config.no_view_prompts):
        raise UserError("--perp_neg takes the other views as negative prompts: it needs view prompts and --loss_type "
                        "sds or ism (the other methods split the CFG rows themselves)")
    ranges = config.camera_ranges().check()
    from guidance.models import world

    covered = getattr(world(config.model), "camera_ranges", None)
    for part in ("elevation", "azimuth", "distance", "fovy") if covered is not None else ():
        (low, high), (world_low, world_high) = getattr(ranges, part), getattr(covered, part)
        if low < world_low or high > world_high:
            raise UserError(f"--{part}_range {low:g} {high:g}: the {config.model} world's data covers only "
                            f"{world_low:g}..{world_high:g}; keep the cameras within it")
    if config.resume and not Path(config.resume).is_file():
        raise UserError(f"--resume {config.resume}: no such checkpoint file (a run writes <run>/{name}.pt every "
                        f"--checkpoint_every steps)")
    if name == "mesh":
        if not config.mesh:
            raise UserError("--generator mesh paints a mesh: give --mesh PATH (.obj, .glb, .gltf, .ply, .stl) or "
                            "--mesh box / sphere")
        from guidance.mesh import DEFAULT_TEXTURE_SIZE, load_mesh

        # Read (and unwrap) it now, before any model loads: a bad mesh fails in seconds; the generator reuses it.
        load_mesh(config.mesh, config.mesh_up, config.mesh_front, texture_size=config.texture_size or DEFAULT_TEXTURE_SIZE)


def from_config(config, model, latents: torch.Tensor, fit_latents: torch.Tensor | None = None) -> Generator:
    """Return a run's generator: config.generator over the run's starting latents (see build_generator), or a 3D
    generator (guidance/nerf.py, guidance/mesh.py) with the run's options."""
    if config.generator not in IMAGE_GENERATORS:
        return _generator_3d(config, model)
    return build_generator(config.generator, model, latents.shape[0], render_size=config.render_size,
                           num_shapes=config.num_shapes or DEFAULT_NUM_SHAPES, seed=config.seed,
                           init_latents=latents, fit_latents=fit_latents, augment=config.augment,
                           pixel_size=config.pixel_size, fit_steps=FIT_STEPS)


def _generator_3d(config, model) -> Generator:
    """Return the run's NeRF or mesh generator, seeded by the run's seed."""
    rng = torch.Generator().manual_seed(int(config.seed))
    common = dict(render_size=config.render_size, generator=rng, shading=config.shading, background=config.background,
                  turntable_frames=config.turntable_frames)
    if config.generator == "nerf":
        from guidance.nerf import NerfGenerator

        regularizers = {"orientation": config.lambda_orientation, "sparsity": config.lambda_sparsity,
                        "entropy": config.lambda_entropy}
        return NerfGenerator(model, 1, latent_render=config.latent_render, regularizers=regularizers,
                             ranges=config.camera_ranges(), **common)
    from guidance.mesh import DEFAULT_TEXTURE_PARAM, DEFAULT_TEXTURE_SIZE, MeshGenerator

    return MeshGenerator(model, 1, mesh=config.mesh, texture_size=config.texture_size or DEFAULT_TEXTURE_SIZE,
                         texture_param=config.texture_param or DEFAULT_TEXTURE_PARAM, up=config.mesh_up,
                         front=config.mesh_front, eval_camera=config.camera_ranges().middle(), **common)
