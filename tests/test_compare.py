"""The comparison of methods: the toy world's exact metrics on hand-made images, the DDIM reference sampler, the
edit metrics of eval.py (clip_direction, lpips) and run_all's comparison.json against the eval.json it summarises."""
import json
import statistics
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

import eval as evaluation
import main
import run_all
from guidance.toy import TEMPLATES, Template, ToyDiffusion, image_metrics, patch_mean, render_source, render_template
from utils import UserError


# ----------------------------------------------------------------------------------------- toy metrics
def test_toy_metrics_of_a_template_plus_noise_of_known_std():
    torch.manual_seed(0)
    template = Template("red", "circle", 1, 1)
    for std in (0.0, 0.05, 0.2):
        image = render_template(template) + std * torch.randn(3, 64, 64, dtype=torch.float64)
        figures = image_metrics(image, "a red circle")
        assert figures["template"] == str(template) and figures["in_class"]
        assert figures["residual_std"] == pytest.approx(std, rel=0.02, abs=1e-12)
        assert figures["template_mse"] == pytest.approx(figures["residual_std"] ** 2)
    assert not image_metrics(render_template(template), "a blue square")["in_class"]


def test_patch_mean_tells_a_kept_patch_from_an_erased_one():
    source = render_source(Template("red", "circle", 1, 1), "top left")
    assert patch_mean(source, source) == 1.0
    assert patch_mean(render_template(Template("blue", "circle", 1, 1)), source) == -1.0
    with pytest.raises(ValueError, match="no white patch"):
        patch_mean(source, render_template(TEMPLATES[0]))


def test_ddim_samples_of_the_toy_are_samples_and_sds_results_are_modes(tmp_path):
    from guidance.toy import ToyDiffusion

    model = ToyDiffusion(device="cpu")
    residuals = {}
    for method, extra in (("ddim", []), ("sds", ["--guidance_scale", "7.5", "--step", "300"])):
        for seed in range(3):
            args = main.parse_args(["--model", "toy", "--prompt", "a red circle", "--loss_type", method, "--seed",
                                    str(seed), "--save_dir", str(tmp_path / method / f"seed_{seed}"), "--log_step",
                                    "0", *extra])
            result = main.run(model, args, progress=False)
            figures = image_metrics(result.latents[0], "a red circle")
            assert figures["in_class"]
            residuals.setdefault(method, []).append(figures["residual_std"])
            config = json.loads((result.run_dir / "run_config.json").read_text())
            assert config["unet_rows_per_step"] == 2 and config["max_abs"] == pytest.approx(
                float(result.latents.abs().max()))
            assert torch.equal(torch.load(result.run_dir / "latents.pt"), result.latents.cpu())
    print("residual std:", residuals)
    assert all(0.035 <= r <= 0.06 for r in residuals["ddim"])  # a sample: the data's std is 0.05
    assert all(r < 0.02 for r in residuals["sds"])  # the mode


# ----------------------------------------------------------------------------------------- edit metrics
def _edit_folder(tmp_path, result_pixels, source_pixels):
    """Write an edit as main.py does: <name>.png, <name>/source.png and <name>/run_config.json."""
    folder = tmp_path / "edits"
    (folder / "a_blue_circle").mkdir(parents=True)
    Image.fromarray(result_pixels).save(folder / "a_blue_circle.png")
    Image.fromarray(source_pixels).save(folder / "a_blue_circle" / "source.png")
    (folder / "a_blue_circle" / "run_config.json").write_text(json.dumps(
        {"prompt": "a red circle", "edit_prompt": "a blue circle", "status": "finished"}))
    return folder


class EmbeddingScorer:
    """A CLIP stand-in whose image embedding is the mean colour and whose text embedding is a fixed vector."""

    preprocess = None

    def score(self, images, prompts):
        return [0.5] * len(images)

    direction = evaluation.ClipScorer.direction


def test_lpips_is_zero_for_the_source_itself_and_grows_with_the_change(tmp_path):
    rng = np.random.default_rng(0)
    source = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    metric = evaluation.LpipsMetric(torch.device("cpu"), "none")
    same, small, large = metric.distance([Image.fromarray(source), Image.fromarray(np.clip(source + 20, 0, 255).astype(
        np.uint8)), Image.fromarray(255 - source)], [Image.fromarray(source)] * 3)
    assert same == pytest.approx(0.0, abs=1e-7)
    assert abs(large) > abs(small) > 0


def test_lpips_without_its_weights_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as err:
        evaluation.LpipsMetric(torch.device("cpu"), "pretrained")
    assert "alexnet-owt-7be5be79.pth" in str(err.value) and str(tmp_path) in str(err.value)


def test_clip_direction_is_the_cosine_of_image_and_text_changes(tmp_path):
    """With random CLIP weights: the metric equals the formula computed here from the model's own embeddings."""
    scorer = evaluation.make_scorer("clip", device="cpu", clip_pretrained="none")
    rng = np.random.default_rng(1)
    source, result = (rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(2))
    folder = _edit_folder(tmp_path, result, source)
    out = evaluation.evaluate_dir(folder, scorer=scorer, metrics=("clip", "clip_direction"))
    with torch.no_grad():
        def image(pixels):
            return torch.nn.functional.normalize(scorer.model.encode_image(scorer.preprocess(Image.fromarray(pixels))[None]), dim=-1)

        def text(prompt):
            return torch.nn.functional.normalize(scorer.model.encode_text(scorer.tokenizer([prompt])), dim=-1)

        expected = torch.nn.functional.cosine_similarity(image(result) - image(source),
                                                         text("a blue circle") - text("a red circle"))
    assert out["metrics"]["clip_direction"]["a_blue_circle.png"] == pytest.approx(float(expected), abs=1e-5)
    saved = json.loads((folder / "eval.json").read_text())
    assert saved["score"] == saved[str(folder / "a_blue_circle.png")]  # the course's schema is unchanged
    assert set(saved) == {"source_dir", str(folder / "a_blue_circle.png"), "score", "metrics"}


def test_edit_metrics_need_the_runs_source(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "a_blue_circle.png")
    with pytest.raises(UserError, match="has no source.png"):
        evaluation.evaluate_dir(folder, scorer="toy", metrics=("clip", "lpips"), lpips_weights="none")


# ----------------------------------------------------------------------------------------- comparison.json
def test_comparison_summarises_exactly_what_eval_json_says(tmp_path):
    out = tmp_path / "out"
    argv = ["--model", "toy", "--tasks", "ddim", "sds", "dds", "sds_edit", "--seeds", "0", "1", "--step", "40",
            "--log_step", "0", "--out", str(out), "--lpips_weights", "none", "--device", "cpu"]
    assert run_all.main(argv) == 0
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["task"] for r in rows] == ["ddim", "sds", "dds", "sds_edit"]
    prompts = json.loads((ToyDiffusion.prompts_file).read_text())
    for row in rows:
        values = []
        for seed in (0, 1):
            scores = json.loads((out / row["task"] / f"seed_{seed}" / "eval.json").read_text())
            values += [v for k, v in scores.items() if k not in evaluation.EXTRA_KEYS]
        assert row["images"] == row["scores"] == 2 * len(prompts)
        assert row["score_mean"] == pytest.approx(statistics.fmean(values), rel=1e-12)
        assert row["score_std"] == pytest.approx(statistics.pstdev(values), rel=1e-12)
        assert 0 <= row["class_accuracy"] <= 1 and 1 <= row["diversity"] <= 2
        assert row["unet_forwards_per_step"] == (4 if row["task"] == "dds" else 2)
        assert row["seconds_per_step"] > 0 and row["max_abs"] > 0
    by_task = {r["task"]: r for r in rows}
    assert "patch" in by_task["dds"] and "lpips" in by_task["dds"] and "patch" not in by_task["sds"]
    assert 0.035 <= by_task["ddim"]["residual_std"] <= 0.06
    # A rerun finds everything done and leaves comparison.json alone.
    stamp = (out / "comparison.json").stat().st_mtime_ns
    assert run_all.main(argv) == 0
    assert (out / "comparison.json").stat().st_mtime_ns == stamp
    # The report's second and third pages are the comparison table and the image grid, a column per task.
    import matplotlib

    matplotlib.use("Agg")
    import report

    figures = report.render(report.collect(out))
    texts = [[t.get_text() for t in fig.texts] for fig in figures[1:3]]
    assert "Comparison of methods" in texts[0] and all(r["task"].upper() in " ".join(texts[0]) for r in rows)
    assert texts[1][0].startswith("Comparison: the same prompt and seed") and "SDS_EDIT" in texts[1]
    import matplotlib.pyplot as plt

    plt.close("all")
