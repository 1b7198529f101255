"""Guidance diagnostics: the panels (x, x_t, x0_hat, |grad|) hold what they claim, TensorBoard's event files hold the
run's numbers and panels, and report.py shows the panels."""
from __future__ import annotations

import io
import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import main  # noqa: E402
import report  # noqa: E402
from guidance.diagnostics import PANEL_TITLES, guidance_panel, split_panel  # noqa: E402
from guidance.toy import ToyDiffusion, from_pil, nearest_template  # noqa: E402
from utils import run_cli  # noqa: E402


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def _small(tile: np.ndarray, size: int = 64) -> np.ndarray:
    """Return a panel tile at the image's own size (tiles of 64x64 images are upscaled by an integer factor)."""
    factor = tile.shape[0] // size
    return tile[::factor, ::factor]


def test_panel_equals_an_independent_computation():
    model = ToyDiffusion()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((1, 3, 64, 64), generator=generator)
    noise = torch.randn((1, 3, 64, 64), generator=generator)
    embeddings = torch.cat([model.get_text_embeds("low quality"), model.get_text_embeds("a red circle")])
    t, scale = 600, 25.0
    model.get_sds_loss(latents, embeddings, guidance_scale=scale, t=t, noise=noise)
    panel, numbers = guidance_panel(model, latents)
    tiles = {k: _small(v) for k, v in split_panel(panel).items()}
    assert list(tiles) == list(PANEL_TITLES) and all(v.shape == (64, 64, 3) for v in tiles.values())

    abar = float(model.schedule.alphas_cumprod[t])
    x_t = math.sqrt(abar) * latents + math.sqrt(1 - abar) * noise
    eps_u, eps_c = (model.unet(x_t, torch.tensor([t]), encoder_hidden_states=e, return_dict=False)[0]
                    for e in embeddings.split(1))
    eps = eps_u + scale * (eps_c - eps_u)
    x0_hat = (x_t - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    grad = eps - noise

    def pixels(z):
        return ((z[0] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy() * 255

    for title, expected in (("x", latents), ("x_t", x_t), ("x0_hat", x0_hat)):
        difference = np.abs(tiles[title].astype(float) - pixels(expected))
        assert difference.max() <= 1.0, title  # uint8 rounding only
    # x is noise; x0_hat, the image the guidance aims at, is the prompt's mode (without CFG's extrapolation,
    # which at this t pushes the red circle's green channel past 1: the toy's over-saturation).
    model.get_sds_loss(latents, embeddings, guidance_scale=1.0, t=t, noise=noise)
    aimed = _small(split_panel(guidance_panel(model, latents)[0])["x0_hat"])
    template, error = nearest_template(from_pil(Image.fromarray(aimed)))
    assert (template.colour, template.shape) == ("red", "circle") and error < 0.01
    assert nearest_template(from_pil(Image.fromarray(tiles["x"])))[1] > 0.5  # x itself is far from every template
    magnitude = grad[0].abs().mean(0)
    assert numbers == {"t": t, "grad_abs_mean": pytest.approx(float(grad.abs().mean()), rel=1e-5),
                       "grad_abs_max": pytest.approx(float(magnitude.max()), rel=1e-5)}
    brightness = tiles["|grad|"].astype(float).sum(2)  # inferno grows brighter with the value
    assert np.unravel_index(brightness.argmax(), brightness.shape) == \
        np.unravel_index(int(magnitude.argmax()), magnitude.shape)
    assert guidance_panel(ToyDiffusion(), latents) is None  # nothing recorded yet: no panel, no crash


def test_cli_panels_and_tensorboard_hold_the_run(tmp_path, capsys):
    save_dir, tb_dir = tmp_path / "out", tmp_path / "tb"
    argv = ["--model", "toy", "--prompt", "a red circle", "--step", "4", "--log_step", "1", "--log_guidance",
            "--tensorboard", str(tb_dir), "--save_dir", str(save_dir)]
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: main.main(argv))
    assert exc.value.code == 0, capsys.readouterr().err
    run_dir = save_dir / "a_red_circle"
    panels = sorted((run_dir / "guidance").glob("step_*.png"))
    assert [p.name for p in panels] == [f"step_{s:05d}.png" for s in range(4)]
    for step in range(1, 4):  # x is the current image: what the previous step's update made
        x = _small(split_panel(np.asarray(Image.open(panels[step])))["x"])
        progress = np.asarray(Image.open(run_dir / "progress" / f"step_{step - 1:05d}.png"))
        assert np.abs(x.astype(int) - progress.astype(int)).max() <= 1

    events = _events(tb_dir / "sds" / "a_red_circle" / "seed_0")
    assert {"loss", "grad_abs_mean", "t", "lr"} <= set(events.Tags()["scalars"])
    with open(run_dir / "loss.csv") as handle:
        losses = [float(line.split(",")[1]) for line in handle.read().splitlines()[1:]]
    assert [e.step for e in events.Scalars("loss")] == list(range(4))
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(losses, rel=1e-6)
    # The course's schedule: linear warm-up over 100 steps from lr 0 to --lr 0.1.
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([0.1 * s / 100 for s in range(4)], abs=1e-9)
    ts = [e.value for e in events.Scalars("t")]
    assert all(v == int(v) and 20 <= v <= 980 for v in ts) and len(set(ts)) > 1
    assert all(e.value > 0 for e in events.Scalars("grad_abs_mean"))
    images = events.Images("guidance")
    assert [e.step for e in images] == list(range(4))
    for event, panel in zip(images, panels):
        logged = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        assert np.array_equal(logged, np.asarray(Image.open(panel).convert("RGB")))


def test_vsd_logs_its_lora_loss(tmp_path, capsys):
    argv = ["--model", "toy", "--prompt", "a blue square", "--loss_type", "vsd", "--step", "3", "--log_step", "0",
            "--tensorboard", str(tmp_path / "tb"), "--save_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: main.main(argv))
    assert exc.value.code == 0, capsys.readouterr().err
    events = _events(tmp_path / "tb" / "vsd" / "a_blue_square" / "seed_0")
    lora = [e.value for e in events.Scalars("lora_loss")]
    assert len(lora) == 3 and all(v > 0 and math.isfinite(v) for v in lora)
    assert events.Tags()["images"] == []  # --log_step 0: no panels
    assert not (tmp_path / "out" / "a_blue_square" / "guidance").exists()


def test_log_guidance_needs_progress_steps(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: main.main(["--model", "toy", "--prompt", "a red circle", "--log_guidance", "--log_step", "0",
                                   "--save_dir", str(tmp_path)]))
    _, err = capsys.readouterr()
    assert exc.value.code == 2 and "--log_guidance" in err and "--log_step" in err and "Traceback" not in err


def test_callback_and_should_stop_drive_one_run(tmp_path):
    args = main.parse_args(["--model", "toy", "--prompt", "a green circle", "--step", "50", "--log_step", "0",
                            "--save_dir", str(tmp_path)])
    seen = []

    def callback(info):
        image = info.image() if info.step == 10 else None
        seen.append((info.step, info.total, info.loss, info.t, info.lr, None if image is None else image.shape))

    result = main.run(main.build_model(args), args, progress=False, callback=callback,
                      should_stop=lambda: len(seen) >= 10)
    assert result.status == "interrupted" and result.steps_done == 10 and len(result.losses) == 10
    assert [s[0] for s in seen] == list(range(1, 11)) and all(s[1] == 50 for s in seen)
    assert [s[2] for s in seen] == result.losses  # every step's loss on a CPU
    assert all(20 <= s[3] <= 980 for s in seen) and seen[9][5] == (1, 3, 64, 64)
    assert result.image_path == tmp_path / "a_green_circle" / "interrupted.png" and result.image_path.is_file()
    assert json.loads((tmp_path / "a_green_circle" / "run_config.json").read_text())["status"] == "interrupted"


def test_report_shows_the_guidance_panels(tmp_path, capsys):
    from test_report import all_text, assert_no_overlaps

    argv = ["--model", "toy", "--prompt", "a yellow square", "--step", "6", "--log_step", "2", "--log_guidance",
            "--save_dir", str(tmp_path / "sds")]
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: main.main(argv))
    assert exc.value.code == 0, capsys.readouterr().err
    figures = report.render(report.collect(tmp_path))
    try:
        pages = [f for f in figures if "what the guidance sees" in all_text([f])]
        assert len(pages) == 1
        words = all_text(pages)
        assert "a yellow square" in words and "step 2" in words and "step 4" in words
        shown = [im.get_array() for ax in pages[0].axes for im in ax.get_images()]
        last = np.asarray(Image.open(tmp_path / "sds" / "a_yellow_square" / "guidance" / "step_00004.png"))
        assert any(np.array_equal(np.asarray(a), last) for a in shown)
        assert_no_overlaps(pages[0])
    finally:
        for fig in figures:
            plt.close(fig)


def test_diagnostics_do_not_change_the_result(tmp_path):
    images = []
    for flags in ([], ["--log_guidance", "--log_step", "1", "--tensorboard", str(tmp_path / "tb")]):
        args = main.parse_args(["--model", "toy", "--prompt", "a red square", "--step", "8", "--seed", "5",
                                "--save_dir", str(tmp_path / str(len(flags))), *flags])
        result = main.run(main.build_model(args), args, progress=False)
        images.append(np.asarray(Image.open(result.image_path)))
    assert np.array_equal(images[0], images[1])


def test_losses_read_in_windows_are_all_logged(tmp_path, monkeypatch):
    # As on a GPU, where the loss is read every LOSS_READ_EVERY steps: the loss of every step still reaches
    # TensorBoard (when read), the other scalars at the read steps only, and the callback sees None in between.
    monkeypatch.setitem(main.LOSS_READ_EVERY, "cpu", 4)
    args = main.parse_args(["--model", "toy", "--prompt", "a red square", "--step", "10", "--log_step", "0",
                            "--tensorboard", str(tmp_path / "tb"), "--save_dir", str(tmp_path / "out")])
    seen = []
    result = main.run(main.build_model(args), args, progress=False, callback=lambda info: seen.append(info.loss))
    events = _events(tmp_path / "tb" / "sds" / "a_red_square" / "seed_0")
    assert [e.step for e in events.Scalars("loss")] == list(range(10))
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(result.losses, rel=1e-6)
    assert [e.step for e in events.Scalars("t")] == [3, 7, 9]
    assert [v is not None for v in seen] == [s in (3, 7, 9) for s in range(10)]
