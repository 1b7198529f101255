"""View-dependent prompts, Perp-Neg and score clipping (guidance/views.py), against hand-computed numbers and an
independent per-row Perp-Neg reference.

What each test would catch: interpolation weights reversed or not summing to one (hand values at 0, 30, 45, 90,
135, 180 degrees); an overhead prompt where the camera ranges never reach it; Perp-Neg removing the whole negative
instead of its perpendicular part, weights of the wrong sign, rows mis-paired in the batched call (reference and
row-tagged fake UNet); the score clip's schedule or a one-sided clamp.
"""
import math

import pytest
import torch

from guidance.cameras import Camera, CameraRanges
from guidance.views import (ViewPrompts, clip_score, perp_neg, perp_neg_noise_preds, perp_neg_weights,
                            perpendicular, score_clip_value, view_weights)


def cam(azimuth, elevation=15.0):
    return Camera(elevation, azimuth, 1.75, 55.0)


@pytest.mark.parametrize("azimuth, expected", [
    (0, {"front": 1.0, "side": 0.0}), (30, {"front": 2 / 3, "side": 1 / 3}), (-45, {"front": 0.5, "side": 0.5}),
    (90, {"side": 1.0, "back": 0.0}), (135, {"side": 0.5, "back": 0.5}), (-180, {"side": 0.0, "back": 1.0}),
])
def test_view_weights_interpolate_neighbouring_views(azimuth, expected):
    # Mutant caught: r = |az| / 90 (weights reversed) gives front 0 at azimuth 0.
    weights = view_weights(cam(azimuth))
    assert set(weights) == set(expected)
    for view, w in expected.items():
        assert weights[view] == pytest.approx(w, abs=1e-12)
    assert view_weights(cam(30, elevation=70)) == {"overhead": 1.0}
    assert view_weights(cam(30), interpolate=False) == {"front": 1.0}
    assert view_weights(cam(50), interpolate=False) == {"side": 1.0}


class RowModel:
    """get_text_embeds returns a one-hot row per prompt, so an embedding shows which prompts it mixes."""

    def __init__(self, prompts):
        self.prompts = list(prompts)

    def get_text_embeds(self, prompt):
        row = torch.zeros(1, len(self.prompts), dtype=torch.float64)
        row[0, self.prompts.index(prompt)] = 1.0
        return row


def test_view_prompts_list_and_mix_the_view_embeddings():
    vp = ViewPrompts("a corgi")
    assert vp.prompts() == ["a corgi, front view", "a corgi, side view", "a corgi, back view"]
    tall = ViewPrompts("a corgi", ranges=CameraRanges(elevation=(-10.0, 80.0)))
    assert tall.prompts()[-1] == "a corgi, overhead view"
    assert ViewPrompts("a corgi", enabled=False).prompts() == ["a corgi"]
    model = RowModel(tall.prompts() + ["a corgi"])
    rows = tall.embeddings(model, [cam(30), cam(150), cam(0, elevation=75)])
    expected = torch.tensor([[2 / 3, 1 / 3, 0, 0, 0], [0, 1 / 3, 2 / 3, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.float64)
    torch.testing.assert_close(rows, expected)
    off = ViewPrompts("a corgi", enabled=False).embeddings(model, [cam(30), cam(150)])
    torch.testing.assert_close(off, torch.tensor([[0, 0, 0, 0, 1.0]] * 2, dtype=torch.float64))


def test_perp_neg_weights_are_threestudios_shifted_exponentials():
    # f(r) = a exp(-b r) + c by hand: f_fs(0) = 4 - 2.426, f_fs(1) = 4 e^-0.5 - 2.426 ~ 0, f_sb(0) = 1 - 0.606,
    # f_fsb(0) = 1 + 0.967, f_fsb(1) = e^-0.5 + 0.967.
    front = dict(perp_neg_weights(cam(0)))
    assert front["front"] == pytest.approx(4 * math.exp(-0.5) - 2.426, abs=1e-12)
    assert front["side"] == pytest.approx(1.574, abs=1e-12)
    back = dict(perp_neg_weights(cam(180)))
    assert back["side"] == pytest.approx(0.394, abs=1e-12) and back["front"] == pytest.approx(1.967, abs=1e-12)
    side = dict(perp_neg_weights(cam(-90)))
    assert side["front"] == pytest.approx(math.exp(-0.5) + 0.967, abs=1e-12)
    assert all(w == 0.0 for _, w in perp_neg_weights(cam(0, elevation=70)))
    # Mutant caught: threestudio's negative weights used with this module's subtracting sign (all would be < 0).
    assert all(w >= 0 for az in range(-180, 180, 15) for _, w in perp_neg_weights(cam(az)))


def test_perp_neg_removes_only_the_perpendicular_part_of_each_negative():
    gen = torch.Generator().manual_seed(0)
    eps_u, eps_p, eps_n = (torch.randn(*shape, generator=gen, dtype=torch.float64)
                           for shape in ((3, 4, 5, 5), (3, 4, 5, 5), (2, 3, 4, 5, 5)))
    weights = torch.tensor([[0.5, 1.0], [0.0, 2.0], [1.5, 0.0]], dtype=torch.float64)
    out = perp_neg(eps_u, eps_p, eps_n, weights, 7.5)
    for i in range(3):  # the paper's equation, row by row, with flattened vectors
        d_pos = (eps_p[i] - eps_u[i]).flatten()
        total = d_pos.clone()
        for k in range(2):
            d = (eps_n[k, i] - eps_u[i]).flatten()
            total -= weights[i, k] * (d - d.dot(d_pos) / d_pos.dot(d_pos) * d_pos)
        torch.testing.assert_close(out[i].flatten(), eps_u[i].flatten() + 7.5 * total)
    # A negative along the positive direction changes nothing; weights 0 give plain CFG.
    parallel = (eps_u + 3 * (eps_p - eps_u)).expand(2, -1, -1, -1, -1)
    torch.testing.assert_close(perp_neg(eps_u, eps_p, parallel, weights, 7.5), eps_u + 7.5 * (eps_p - eps_u))
    torch.testing.assert_close(perp_neg(eps_u, eps_p, eps_n, torch.zeros(3, 2), 7.5), eps_u + 7.5 * (eps_p - eps_u))
    assert (perpendicular(eps_n[0], eps_p) * eps_p).sum((1, 2, 3)).abs().max() < 1e-10


class TaggedUNet:
    """predict_eps(x, t, rows) = rows' first column times x: each output row says which prompt row it came from."""

    def __init__(self):
        self.calls = []

    def predict_eps(self, x, t, rows):
        self.calls.append(x.shape[0])
        return rows[:, :1, None, None] * x


def test_perp_neg_call_is_one_unet_batch_with_documented_rows():
    n, vp = 3, ViewPrompts("a corgi")
    values = {"a corgi, front view": 2.0, "a corgi, side view": 3.0, "a corgi, back view": 5.0, "neg": 7.0}

    class Model(TaggedUNet):
        def get_text_embeds(self, prompt):
            return torch.full((1, 2), values[prompt], dtype=torch.float64)

    model = Model()
    cameras = [cam(0), cam(90), cam(180)]
    rows, weights = vp.perp_neg_rows(model, cameras, model.get_text_embeds("neg"))
    assert rows.shape == ((2 + 2) * n, 2) and weights.shape == (n, 2)
    # uncond x3, interpolated positives (front, side, back), then negative 0 of each view, then negative 1.
    torch.testing.assert_close(rows[:, 0], torch.tensor([7, 7, 7, 2, 3, 5, 2, 3, 3, 3, 2, 2.0], dtype=torch.float64))
    x = torch.ones(n, 1, 2, 2, dtype=torch.float64)
    out = perp_neg_noise_preds(model, x, 500, rows, weights, 7.5)
    assert model.calls == [4 * n]
    eps = rows[:, 0].view(4, n, 1, 1, 1) * x
    torch.testing.assert_close(out, perp_neg(eps[0], eps[1], eps[2:], weights, 7.5))


def test_score_clip_rises_linearly_and_clamps_both_signs():
    assert score_clip_value(0) == 0.5 and score_clip_value(2500) == pytest.approx(1.25)
    assert score_clip_value(5000) == 2.0 and score_clip_value(20000) == 2.0
    grad = torch.tensor([-3.0, -1.0, 0.2, 1.0, 3.0])
    torch.testing.assert_close(clip_score(grad, 0), torch.tensor([-0.5, -0.5, 0.2, 0.5, 0.5]))
    torch.testing.assert_close(clip_score(grad, 2500), torch.tensor([-1.25, -1.0, 0.2, 1.0, 1.25]))
