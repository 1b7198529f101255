"""eval.py: course schema, numbers equal a direct open_clip computation, file selection, --prompts, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import eval as evaluation  # noqa: E402  (eval.py at the repo root; the name shadows the builtin only here)
from utils import UserError, run_cli  # noqa: E402

PROMPTS = ["a cat sitting on a table", "A car on the road", "A red bus driving on a desert road"]


def _save_noise_png(path: Path, seed: int, size=(96, 64), mode="RGB") -> None:
    rng = np.random.default_rng(seed)
    channels = 4 if mode == "RGBA" else 3
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8), mode).save(path)


@pytest.fixture
def image_dir(tmp_path):
    """A folder with three prompt-named PNGs plus files eval.py must ignore."""
    fdir = tmp_path / "outputs"
    (fdir / "progress").mkdir(parents=True)
    for seed, prompt in enumerate(PROMPTS):
        _save_noise_png(fdir / f"{prompt.replace(' ', '_')}.png", seed, mode="RGBA" if seed == 2 else "RGB")
    _save_noise_png(fdir / "progress" / "step_0100.png", 10)       # progress image in a sub-folder
    (fdir / ".hidden.png").write_bytes(b"not an image")           # hidden file
    (fdir / ".A_car_on_the_road.png.x1y2.tmp").write_bytes(b"")   # temp file of an atomic write
    (fdir / "notes.txt").write_text("not a png")
    (fdir / "folder.png").mkdir()                                 # a folder is not an image
    return fdir


@pytest.fixture(scope="module")
def random_scorer():
    """eval.py's CLIP scorer with its deterministic random weights (no download)."""
    return evaluation.make_scorer("clip", device="cpu", clip_pretrained="none")


@pytest.fixture(scope="module")
def reference_clip(random_scorer):
    """The course's pipeline built without eval.py's code: (the same CLIP weights, preprocess, tokenizer).

    The preprocess is written out as the course's CLIP.load transform (Resize 224 bicubic, CenterCrop 224,
    RGB, ToTensor, Normalize with OpenAI's mean/std), so a drift in open_clip's transform would show up here.
    """
    import open_clip
    from torchvision import transforms

    preprocess = transforms.Compose([
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        lambda image: image.convert("RGB"),
        transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])
    return random_scorer.model, preprocess, open_clip.get_tokenizer("ViT-B-32")


def _direct_cos_sim(reference, path: Path, prompt: str) -> float:
    """The course's computation, one image at a time: cos(encode_image(preprocess(img)), encode_text(prompt))."""
    model, preprocess, tokenizer = reference
    with torch.no_grad():
        image_features = model.encode_image(preprocess(Image.open(path)).unsqueeze(0))
        text_features = model.encode_text(tokenizer([prompt]))
    return F.cosine_similarity(image_features, text_features).item()


class FakeScorer:
    """Scores by prompt length / 100, records its calls: stands in for CLIP or the toy scorer."""

    def __init__(self):
        self.calls = []

    def score(self, images, prompts):
        self.calls.append((list(images), list(prompts)))
        return [len(p) / 100 for p in prompts]


def test_eval_json_matches_direct_open_clip(image_dir, random_scorer, reference_clip, monkeypatch):
    encoded_texts, encoded_images = [], []
    model = random_scorer.model
    encode_text, encode_image = model.encode_text, model.encode_image
    monkeypatch.setattr(model, "encode_text", lambda tokens: encoded_texts.append(len(tokens)) or encode_text(tokens))
    monkeypatch.setattr(model, "encode_image", lambda batch: encoded_images.append(len(batch)) or encode_image(batch))
    monkeypatch.setattr(evaluation, "BATCH_SIZE", 2)
    result = evaluation.evaluate_dir(str(image_dir), scorer=random_scorer)
    assert encoded_images == [2, 1] and encoded_texts == [2, 1]  # batched, not one at a time
    monkeypatch.undo()

    paths = {os.path.join(str(image_dir), p.replace(" ", "_") + ".png"): p for p in PROMPTS}
    assert list(result) == ["source_dir", *sorted(paths), "score"]
    assert result["source_dir"] == str(image_dir)
    for path, prompt in paths.items():  # includes an RGBA file: resized before the RGB conversion, as CLIP does
        assert result[path] == pytest.approx(_direct_cos_sim(reference_clip, Path(path), prompt), abs=1e-5)
    values = [result[p] for p in paths]
    assert result["score"] == pytest.approx(sum(values) / 3, abs=1e-12)
    assert max(values) - min(values) > 1e-4  # different images/prompts give different numbers
    assert json.loads((image_dir / "eval.json").read_text()) == pytest.approx(result)
    assert not [f for f in os.listdir(image_dir) if f.startswith(".eval.json")]  # no temp file left


class RecordingModel:
    """Stands in for CLIP inside ClipScorer: features are fixed functions of the inputs; calls are recorded."""

    def __init__(self):
        self.text_batches, self.image_batches = [], []

    def float(self):
        return self

    def to(self, device):
        return self

    def eval(self):
        return self

    def encode_text(self, tokens):
        self.text_batches.append(tokens.clone())
        return tokens[:, :4].float()

    def encode_image(self, images):
        self.image_batches.append(len(images))
        return images.mean(dim=(2, 3)).repeat(1, 2)[:, :4]


def test_clip_scorer_encodes_each_distinct_prompt_once(monkeypatch):
    model = RecordingModel()
    tokenize = lambda prompts: torch.tensor([[len(p), p.count("a"), p.count("o") + 1, 1] for p in prompts])
    preprocess = lambda img: torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
    scorer = evaluation.ClipScorer(model, preprocess, tokenize, torch.device("cpu"), "recording model")
    monkeypatch.setattr(evaluation, "BATCH_SIZE", 2)
    colours = [(10, 20, 30), (200, 0, 50), (5, 5, 250)]
    images = [Image.new("RGB", (4, 4), c) for c in colours]
    prompts = ["a cat", "a dog", "a cat"]
    scores = scorer.score(images, prompts)

    assert [t.tolist() for t in model.text_batches] == [[[5, 2, 1, 1], [5, 1, 2, 1]]]  # "a cat" encoded once
    assert model.image_batches == [2, 1]
    expected = [F.cosine_similarity(torch.tensor([[*c, c[0]]], dtype=torch.float32),
                                    torch.tensor([tokenize([p])[0].tolist()], dtype=torch.float32)).item()
                for c, p in zip(colours, prompts)]
    assert scores == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        scorer.score(images, prompts[:2])


def test_local_checkpoint_file_loads_the_same_weights(tmp_path, random_scorer):
    # fp16 like OpenAI's ViT-B-32.pt (and half the disk); scoring with these weights is the test above
    state = {k: v.half() for k, v in random_scorer.model.state_dict().items()}
    checkpoint = tmp_path / "clip_vit_b32.pt"
    torch.save(state, checkpoint)
    loaded = evaluation.make_scorer("clip", device="cpu", clip_pretrained=str(checkpoint)).model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v.float()) for k, v in state.items())
    assert all(v.dtype == torch.float32 for v in loaded.values() if v.is_floating_point())


def test_torchscript_archive_is_read(tmp_path):
    archive = tmp_path / "scripted.pt"
    linear = torch.nn.Linear(3, 2)
    torch.jit.save(torch.jit.script(linear), archive)
    state = evaluation._read_state_dict(str(archive))
    assert set(state) == {"weight", "bias"}
    assert torch.equal(state["weight"], linear.weight.detach())


def test_bad_checkpoint_file_is_a_user_error(tmp_path):
    bad = tmp_path / "not_a_checkpoint.pt"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(UserError, match=r"cannot load CLIP ViT-B-32 weights from .*not_a_checkpoint\.pt"):
        evaluation.make_scorer("clip", device="cpu", clip_pretrained=str(bad))
    wrong_model = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), wrong_model)
    with pytest.raises(UserError, match=r"weights from .*linear\.pt \(RuntimeError: Error\(s\) in loading"):
        evaluation.make_scorer("clip", device="cpu", clip_pretrained=str(wrong_model))


def test_offline_without_weights_names_the_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(UserError) as info:
        evaluation.make_scorer("clip", device="cpu", clip_pretrained="openai")
    message = str(info.value)
    assert "offline" in message and "--clip_pretrained /path/to/" in message
    assert "vit_base_patch32_clip_224.openai" in message and "\n" not in message


def test_unknown_pretrained_scorer_and_device_fail_fast():
    with pytest.raises(UserError, match=r"'no_such_tag' is neither an open_clip ViT-B-32 tag"):
        evaluation.make_scorer("clip", device="cpu", clip_pretrained="no_such_tag")
    with pytest.raises(UserError, match=r"unknown scorer 'blip'"):
        evaluation.make_scorer("blip")
    with pytest.raises(UserError, match=r"unknown device 'tpu'"):
        evaluation.make_scorer("clip", device="tpu", clip_pretrained="none")


def test_injected_scorer_gets_only_prompt_named_pngs(image_dir):
    fake = FakeScorer()
    result = evaluation.evaluate_dir(image_dir, scorer=fake)
    (images, prompts), = fake.calls  # one batched call
    assert prompts == sorted(PROMPTS, key=lambda p: p.replace(" ", "_"))
    assert [img.mode for img in images] == ["RGB", "RGBA", "RGB"]  # as read from disk
    assert result["score"] == pytest.approx(sum(len(p) for p in PROMPTS) / 300)


def _write_prompts(path: Path, prompts: list[str]) -> Path:
    data = {p.replace(" ", "_"): {"prompt": p, "edit_prompt": f"{p} at night", "img_path": f"data/imgs/{p}.png"}
            for p in prompts}
    path.write_text(json.dumps(data))
    return path


def test_prompts_file_lists_missing_images_and_ignores_others(tmp_path, image_dir, capsys):
    prompts_file = _write_prompts(tmp_path / "pairs.json", PROMPTS[:2] + ["A dog sitting on grass"])
    with pytest.raises(UserError, match=r"1 of 3 expected gen images are missing .*--allow_missing"):
        evaluation.evaluate_dir(image_dir, scorer=FakeScorer(), prompts_file=prompts_file)
    out = capsys.readouterr().out
    assert "A_dog_sitting_on_grass.png" in out and "task: gen" in out
    assert not (image_dir / "eval.json").exists()

    fake = FakeScorer()
    result = evaluation.evaluate_dir(image_dir, scorer=fake, prompts_file=prompts_file, allow_missing=True)
    assert fake.calls[0][1] == PROMPTS[:2]
    assert len(result) == 2 + 2 and result["score"] == pytest.approx((len(PROMPTS[0]) + len(PROMPTS[1])) / 200)
    out = capsys.readouterr().out
    assert "ignoring 1 PNG(s) not in the prompts file: A_red_bus_driving_on_a_desert_road.png" in out


def test_prompts_file_auto_detects_edit_task(tmp_path, capsys):
    fdir = tmp_path / "edits"
    fdir.mkdir()
    for seed, prompt in enumerate(PROMPTS):
        _save_noise_png(fdir / f"{prompt.replace(' ', '_')}_at_night.png", seed)
    prompts_file = _write_prompts(tmp_path / "pairs.json", PROMPTS)
    result = evaluation.evaluate_dir(fdir, scorer=FakeScorer(), prompts_file=prompts_file)
    assert "task: edit" in capsys.readouterr().out
    assert result["score"] == pytest.approx(sum(len(p) + 9 for p in PROMPTS) / 300)
    with pytest.raises(UserError, match=r"3 of 3 expected gen images are missing"):
        evaluation.evaluate_dir(fdir, scorer=FakeScorer(), prompts_file=prompts_file, task="gen")


def test_bad_prompts_file_is_a_user_error(tmp_path, image_dir):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match=r"broken\.json is not valid JSON"):
        evaluation.evaluate_dir(image_dir, scorer=FakeScorer(), prompts_file=tmp_path / "broken.json")
    with pytest.raises(UserError, match=r"prompts file not found: .*nope\.json"):
        evaluation.evaluate_dir(image_dir, scorer=FakeScorer(), prompts_file=tmp_path / "nope.json")


def test_cli_missing_images_exit_code(tmp_path, image_dir, capsys):
    prompts_file = _write_prompts(tmp_path / "pairs.json", ["A dog sitting on grass"])
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: evaluation.main(["--fdir1", str(image_dir), "--prompts", str(prompts_file),
                                         "--scorer", "clip", "--clip_pretrained", "none", "--device", "cpu"]))
    assert info.value.code == 2
    assert "error: 1 of 1 expected gen images are missing" in capsys.readouterr().err


def test_toy_scorer_through_the_cli(tmp_path, capsys):
    toy = pytest.importorskip("guidance.toy", reason="guidance/toy.py not written yet")
    fdir = tmp_path / "toy_run"
    fdir.mkdir()
    red_circle = toy.to_pil(toy.render_template(toy.Template("red", "circle", 1, 1)))
    red_circle.save(fdir / "a_red_circle.png")   # matches its prompt
    red_circle.save(fdir / "a_blue_square.png")  # does not
    assert evaluation.main(["--fdir1", str(fdir), "--scorer", "toy"]) == 0
    result = json.loads((fdir / "eval.json").read_text())
    expected = toy.ToyScorer().score([red_circle, red_circle], ["a blue square", "a red circle"])
    right = result[os.path.join(str(fdir), "a_red_circle.png")]
    wrong = result[os.path.join(str(fdir), "a_blue_square.png")]
    assert [wrong, right] == pytest.approx(expected, abs=1e-6)
    assert right > 0.5 > 0.1 > wrong
    assert result["score"] == pytest.approx((right + wrong) / 2)
    assert f"score {result['score']:.4f}" in capsys.readouterr().out


def _run_eval(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("case", ["missing_folder", "no_pngs", "corrupt_png"])
def test_cli_errors_exit_nonzero_without_traceback(tmp_path, case):
    fdir = tmp_path / "run"
    if case == "no_pngs":
        (fdir / "progress").mkdir(parents=True)
        _save_noise_png(fdir / "progress" / "step_0001.png", 0)
        (fdir / ".hidden.png").write_bytes(b"x")
        expected = f"no prompt-named PNGs in {fdir}"
    elif case == "corrupt_png":
        fdir.mkdir()
        _save_noise_png(fdir / "A_car_on_the_road.png", 0)
        (fdir / "a_cat_sitting_on_a_table.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        expected = f"cannot read image {fdir / 'a_cat_sitting_on_a_table.png'}"
    else:
        expected = f"folder not found: {fdir}"
    proc = _run_eval("--fdir1", str(fdir), "--clip_pretrained", "none", "--device", "cpu")
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "run" / "eval.json").exists()
