"""Score a folder of generated images by CLIP similarity to their prompts; write FOLDER/eval.json.

    python eval.py --fdir1 outputs/sds

Same numbers as the course's eval script, computed with open_clip instead of OpenAI's `clip` package:
for every `*.png` directly in the folder (sub-folders hold progress images and are ignored), the prompt is
the file stem with '_' -> ' ' (or, for a name made safe from a hostile or long prompt, the prompt recorded in
<name>/run_config.json or the --prompts file), and the score is F.cosine_similarity of the *unnormalised* CLIP ViT-B/32
image and text features (OpenAI weights, float32). eval.json keeps the course's schema:
{"source_dir": FOLDER, "FOLDER/<name>.png": cos_sim, ..., "score": mean}.
"""
from __future__ import annotations

from utils import interrupt_quietly  # first: Ctrl-C while torch and the rest import exits 130 quietly

interrupt_quietly(__name__)

import argparse
import functools
import json
import os
import sys
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from guidance.runfolder import RunFolder
from utils import (UserError, file_write_problem, prompt_for_stem, prompt_to_filename, resolve_device, run_cli,
                   save_json_atomic)

CLIP_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
RANDOM_INIT_SEED = 0  # `--clip_pretrained none` builds the same random CLIP every time
BATCH_SIZE = 32
TASKS = ("gen", "edit")
EVAL_FILENAME = "eval.json"
# --metrics: clip is the course's score (eval.json's per-image values and "score"); the others are for edits and go
# under eval.json's "metrics" key, {metric: {<name>.png: value, ..., "mean": m}}.
METRICS = ("clip", "clip_direction", "lpips")
EXTRA_KEYS = ("source_dir", "score", "metrics")  # eval.json keys that are not per-image CLIP scores
LPIPS_BACKBONE = "alexnet-owt-7be5be79.pth"  # what lpips' AlexNet loads through torchvision
LPIPS_BACKBONE_URL = f"https://download.pytorch.org/models/{LPIPS_BACKBONE}"


# ---------------------------------------------------------------------------------------------------------
# Scorers: anything with .score(images, prompts) -> list[float]


class ClipScorer:
    """CLIP ViT-B/32 cosine similarity between each image and its prompt (open_clip, float32)."""

    def __init__(self, model, preprocess, tokenizer, device: torch.device, description: str):
        self.model = model.float().to(device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.description = description

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        """Return F.cosine_similarity(image_features, text_features) for each (image, prompt) pair.

        Images may be in any PIL mode: like CLIP's own preprocess, the transform resizes first and converts
        to RGB after, which matters for RGBA files (PIL resizes them with premultiplied alpha).
        """
        if len(images) != len(prompts):
            raise ValueError(f"score() got {len(images)} images but {len(prompts)} prompts")
        if not images:
            return []
        distinct = list(dict.fromkeys(prompts))  # each prompt is encoded once
        text_features = torch.cat([
            self.model.encode_text(self.tokenizer(distinct[i:i + BATCH_SIZE]).to(self.device))
            for i in range(0, len(distinct), BATCH_SIZE)
        ])
        row_of_prompt = {prompt: row for row, prompt in enumerate(distinct)}
        scores: list[float] = []
        for start in range(0, len(images), BATCH_SIZE):
            batch = torch.stack([self.preprocess(img) for img in images[start:start + BATCH_SIZE]])
            image_features = self.model.encode_image(batch.to(self.device))
            rows = [row_of_prompt[p] for p in prompts[start:start + BATCH_SIZE]]
            cos_sim = F.cosine_similarity(image_features, text_features[rows])
            scores.extend(float(value) for value in cos_sim.cpu())
        return scores

    @torch.no_grad()
    def direction(self, results: list[Image.Image], sources: list[Image.Image], src_prompts: list[str],
                  edit_prompts: list[str]) -> list[float]:
        """Return InstructPix2Pix's directional CLIP similarity of each edit: the cosine between the change of the
        (normalised) image features source -> result and that of the text features source prompt -> edit prompt."""
        def image_features(images):
            batch = torch.stack([self.preprocess(img) for img in images]).to(self.device)
            return F.normalize(self.model.encode_image(batch), dim=-1)

        def text_features(prompts):
            return F.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)), dim=-1)

        image_change = image_features(results) - image_features(sources)
        text_change = text_features(edit_prompts) - text_features(src_prompts)
        return [float(v) for v in F.cosine_similarity(image_change, text_change).cpu()]


class LpipsMetric:
    """LPIPS distance (AlexNet, the lpips package) between each edit and its source: 0 for the same image."""

    def __init__(self, device: torch.device, weights: str = "pretrained"):
        try:
            import lpips
        except ModuleNotFoundError:
            raise UserError("--metrics lpips needs the lpips package: pip install lpips") from None
        self.device = device
        if weights == "none":  # random backbone and heads: tests only
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                self.model = lpips.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False)
            print("WARNING: --lpips_weights none: LPIPS has RANDOM weights (tests only)", file=sys.stderr)
        else:
            from guidance.models import PROBE_SECONDS, reachable

            backbone = lpips_backbone_path()
            if not backbone.is_file() and not reachable(LPIPS_BACKBONE_URL):  # fail now, not after a network timeout
                raise _no_alexnet(backbone, f"no connection to download.pytorch.org within {PROBE_SECONDS:g} s")
            try:
                self.model = lpips.LPIPS(net="alex", verbose=False)
            except (OSError, RuntimeError) as err:  # URLError is an OSError: offline, no cached AlexNet
                raise _no_alexnet(backbone, err.__class__.__name__) from None
        self.model = self.model.to(device).eval()

    @torch.no_grad()
    def distance(self, results: list[Image.Image], sources: list[Image.Image]) -> list[float]:
        """Return LPIPS(result, source) per pair (the result resized to its source's size, images in [-1, 1])."""
        import numpy as np

        def tensor(img, size):
            img = img.convert("RGB").resize(size, Image.BICUBIC) if img.size != size else img.convert("RGB")
            array = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
            return array.permute(2, 0, 1)[None].to(self.device)

        return [float(self.model(tensor(r, s.size), tensor(s, s.size))) for r, s in zip(results, sources)]


def _no_alexnet(backbone: Path, reason: str) -> UserError:
    return UserError(
        f"LPIPS needs torchvision's AlexNet weights {backbone}, which are not on this machine and could not be "
        f"downloaded ({reason}). Fix: copy {LPIPS_BACKBONE} there from a machine with internet (python -c 'import "
        f"torchvision; torchvision.models.alexnet(weights=\"DEFAULT\")'), or drop lpips from --metrics")


def scorer_choices() -> list[str]:
    """Return the scorers eval.py offers: clip, and each toy world's own (guidance/models.py's worlds)."""
    from guidance.models import worlds

    return ["clip", *worlds()]


def make_scorer(kind: str = "clip", device=None, clip_pretrained: str | None = DEFAULT_PRETRAINED):
    """Return a scorer with .score(images, prompts) -> list[float]: 'clip' (open_clip ViT-B/32) or a toy world's."""
    from guidance.models import world

    found = world(kind)
    if found is not None:
        return found.scorer()
    if kind != "clip":
        raise UserError(f"unknown scorer {kind!r}: use one of {', '.join(scorer_choices())}")
    return _make_clip_scorer(resolve_device(device), clip_pretrained)


def _is_random(clip_pretrained) -> bool:
    """Return True when clip_pretrained asks for random weights (None, '' or 'none')."""
    return clip_pretrained is None or str(clip_pretrained).strip().lower() in ("", "none")


def _make_clip_scorer(device: torch.device, clip_pretrained) -> ClipScorer:
    """Return a ClipScorer with weights from an open_clip tag, a local checkpoint file, or random ('none')."""
    import open_clip

    # QuickGELU: OpenAI's CLIP uses it, but open_clip's plain 'ViT-B-32' config does not, so without this
    # the 'openai' weights would run through the wrong activation and drift from the course's numbers.
    if _is_random(clip_pretrained):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(
                CLIP_MODEL, pretrained=None, force_quick_gelu=True)
        print("WARNING: --clip_pretrained none: CLIP has RANDOM weights. The scores below are MEANINGLESS "
              "(fine for tests and demos, never for reporting).", file=sys.stderr)
        description = f"{CLIP_MODEL} with random weights (seed {RANDOM_INIT_SEED})"
    else:
        spec = str(clip_pretrained)
        tag_cfg = open_clip.get_pretrained_cfg(CLIP_MODEL, spec) if os.path.sep not in spec else {}
        if tag_cfg:
            checkpoint = _download_tag(open_clip, spec, tag_cfg)
            quick_gelu = bool(tag_cfg.get("quick_gelu", False))
            preprocess_kwargs = {f"image_{key}": tag_cfg[key] for key in ("mean", "std", "interpolation", "resize_mode")
                                 if key in tag_cfg}
            description = f"{CLIP_MODEL} pretrained={spec!r} ({checkpoint})"
        elif os.path.isfile(spec):
            checkpoint, quick_gelu, preprocess_kwargs = spec, True, {}
            description = f"{CLIP_MODEL} weights from {spec}"
        else:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(CLIP_MODEL))
            raise UserError(f"--clip_pretrained {spec!r} is neither an open_clip {CLIP_MODEL} tag nor an existing "
                            f"file: give a checkpoint path, 'none', or one of: {tags}")
        state_dict = _read_state_dict(checkpoint)  # a bad file fails before the model is built
        model, _, preprocess = open_clip.create_model_and_transforms(
            CLIP_MODEL, pretrained=None, force_quick_gelu=quick_gelu, **preprocess_kwargs)
        _load_weights(open_clip, model, state_dict, checkpoint)
    print(f"CLIP: {description} on {device}")
    return ClipScorer(model, preprocess, open_clip.get_tokenizer(CLIP_MODEL), device, description)


def _download_tag(open_clip, tag: str, tag_cfg: dict) -> str:
    """Return the local path of the open_clip checkpoint for a pretrained tag (downloaded or cached)."""
    from guidance.models import hub_offline

    hub_offline()  # one quick probe: without a network the cached checkpoint loads at once, or the error comes at once
    try:
        path = open_clip.download_pretrained(tag_cfg)
    except Exception as err:  # network down, HF_HUB_OFFLINE=1 with an empty cache, proxy, disk full...
        first_sentence = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else ""
        path, reason = "", f"{err.__class__.__name__}: {first_sentence}"
    else:
        reason = "the download returned no file"
    if path and os.path.isfile(path):
        return path
    hf_repo = tag_cfg.get("hf_hub", "").rstrip("/")
    where = (f"https://huggingface.co/{hf_repo}/resolve/main/open_clip_pytorch_model.bin" if hf_repo
             else tag_cfg.get("url", "the open_clip pretrained list"))
    raise UserError(
        f"cannot get the CLIP {CLIP_MODEL} weights for --clip_pretrained {tag!r} ({reason}). "
        f"This machine seems to be offline. Fix: on a machine with internet download {where}, copy it here "
        f"and pass it with `--clip_pretrained /path/to/open_clip_pytorch_model.bin` (OpenAI's ViT-B-32.pt works "
        f"too). `--clip_pretrained none` runs with random weights: a smoke test only, the scores are meaningless.")


def _read_state_dict(path: str) -> dict:
    """Return the state dict in a checkpoint file (TorchScript like OpenAI's ViT-B-32.pt, torch.save or safetensors)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
            if any(name == "constants.pkl" or name.endswith("/constants.pkl") for name in names):
                state_dict = torch.jit.load(path, map_location="cpu").state_dict()
                for key in ("input_resolution", "context_length", "vocab_size"):
                    state_dict.pop(key, None)
                return state_dict
        from open_clip.factory import load_state_dict

        return load_state_dict(path, device="cpu", weights_only=True)
    except Exception as err:
        raise _bad_checkpoint(path, err) from None


def _load_weights(open_clip, model, state_dict: dict, path: str) -> None:
    """Load state_dict (read from path) into model, strictly, or raise UserError naming the file."""
    try:
        state_dict = open_clip.factory.convert_state_dict(model, state_dict)
        if "logit_scale" in state_dict and state_dict["logit_scale"].ndim != model.logit_scale.ndim:
            state_dict["logit_scale"] = state_dict["logit_scale"].reshape(model.logit_scale.shape)
        model.load_state_dict(state_dict, strict=True)
    except Exception as err:
        raise _bad_checkpoint(path, err) from None


def _bad_checkpoint(path: str, err: Exception) -> UserError:
    """Return the UserError for a checkpoint file that cannot be read or does not fit CLIP ViT-B/32."""
    first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    return UserError(f"cannot load CLIP {CLIP_MODEL} weights from {path} ({err.__class__.__name__}: {first_line}): "
                     f"give OpenAI's ViT-B-32.pt or an open_clip {CLIP_MODEL} checkpoint")


# ---------------------------------------------------------------------------------------------------------
# Which files to score


def list_prompt_pngs(fdir: str | os.PathLike) -> list[str]:
    """Return the sorted names of the *.png files directly in fdir, leaving out hidden and temporary files."""
    return sorted(entry.name for entry in os.scandir(fdir)
                  if entry.name.endswith(".png") and not entry.name.startswith(".") and entry.is_file())


def load_prompts_file(path: str | os.PathLike) -> dict:
    """Return the course-schema prompts json ({key: {prompt, edit_prompt, img_path}}) after checking its shape."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file not found: {path}. Pass the course's data/prompt_img_pairs.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"prompts file {path} is not valid JSON ({err}): fix it or pass "
                        f"data/prompt_img_pairs.json") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"prompts file {path} must be a non-empty JSON object {{key: {{prompt, edit_prompt}}}}")
    for key, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise UserError(f"prompts file {path}: entry {key!r} has no 'prompt' string "
                            f"(expected {{prompt, edit_prompt, img_path}})")
    return data


def expected_names(prompts: dict, task: str) -> list[str]:
    """Return the PNG names the prompts file implies for a task: prompt names (gen) or edit_prompt names (edit)."""
    field = "prompt" if task == "gen" else "edit_prompt"
    names = []
    for key, entry in prompts.items():
        if not isinstance(entry.get(field), str):
            raise UserError(f"prompts entry {key!r} has no {field!r}: use --task "
                            f"{'gen' if task == 'edit' else 'edit'} or fix the prompts file")
        names.append(prompt_to_filename(entry[field]) + ".png")
    return list(dict.fromkeys(names))


def select_files(found: list[str], prompts: dict, task: str | None, allow_missing: bool,
                 fdir: str) -> tuple[list[str], str]:
    """Return (names to score, task) after checking found PNGs against the prompts file's expected names."""
    if task in (None, "", "auto"):
        tasks = [t for t in TASKS if all(isinstance(e.get("prompt" if t == "gen" else "edit_prompt"), str)
                                         for e in prompts.values())]
        task = max(tasks, key=lambda t: len(set(found) & set(expected_names(prompts, t))))
        print(f"task: {task} (auto: matches more of the files in {fdir})")
    elif task not in TASKS:
        raise UserError(f"unknown task {task!r}: use gen, edit or auto")
    expected = expected_names(prompts, task)
    present = set(found)
    missing = [name for name in expected if name not in present]
    extra = [name for name in found if name not in set(expected)]
    if extra:
        print(f"ignoring {len(extra)} PNG(s) not in the prompts file: {', '.join(extra)}")
    if missing:
        print(f"missing {len(missing)} of {len(expected)} expected images ({task}) in {fdir}:")
        for name in missing:
            print(f"  {name}")
        if not allow_missing:
            raise UserError(f"{len(missing)} of {len(expected)} expected {task} images are missing from {fdir} "
                            f"(listed above): generate them, or pass --allow_missing to score the rest")
    return [name for name in expected if name in present], task


def _read_png(path: str) -> Image.Image:
    """Return the image at path fully loaded in its file's mode, or raise UserError naming the file."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"cannot read image {path} ({err.__class__.__name__}): delete or regenerate it") from None


# ---------------------------------------------------------------------------------------------------------
# API and CLI


def lpips_backbone_path() -> Path:
    """Return where torchvision keeps (or would download) the AlexNet weights LPIPS needs."""
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE


@functools.lru_cache(maxsize=2)
def lpips_metric(device: str, weights: str = "pretrained") -> LpipsMetric:
    """Return the LPIPS metric for a device, built once per process."""
    return LpipsMetric(torch.device(device), weights)


def edit_sources(fdir: str, names: list[str]) -> tuple[list[Image.Image], list[str]]:
    """Return (source images, source prompts) of the edits <fdir>/<name>.png, from their run folders (main.py writes
    <name>/source.png, the source as the model saw it, and the prompts in <name>/run_config.json)."""
    images, prompts = [], []
    for name in names:
        run = RunFolder(fdir, Path(name).stem)
        run_dir, config = run.dir, run.read_config() or {}
        source = run.path("source.png")
        if not source.is_file() and config.get("src_img_path"):
            source = Path(config["src_img_path"])
        if not source.is_file() or not isinstance(config.get("prompt"), str):
            raise UserError(f"{name}: clip_direction and lpips compare an edit with its source, but {run_dir} has no "
                            f"source.png or run_config.json with the source prompt: score edits that main.py wrote, "
                            f"or use --metrics clip")
        images.append(_read_png(str(source)))
        prompts.append(config["prompt"])
    return images, prompts


def evaluate_dir(fdir, scorer=None, prompts_file=None, task=None, device=None,
                 clip_pretrained: str | None = DEFAULT_PRETRAINED, allow_missing: bool = False,
                 metrics=("clip",), lpips_weights: str = "pretrained") -> dict:
    """Return the course-schema eval dict for the prompt-named PNGs in fdir, also written to fdir/eval.json.

    metrics beyond 'clip' (clip_direction, lpips: edits only) go under the dict's "metrics" key.
    """
    fdir = str(fdir)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UserError(f"unknown --metrics {', '.join(unknown)}: use some of {', '.join(METRICS)}")
    if not os.path.exists(fdir):
        raise UserError(f"folder not found: {fdir}. Pass the folder holding the generated PNGs as --fdir1")
    if not os.path.isdir(fdir):
        raise UserError(f"--fdir1 {fdir} is a file, not a folder: pass the folder that holds the PNGs")
    found = list_prompt_pngs(fdir)
    prompts_data = load_prompts_file(prompts_file) if prompts_file is not None else None
    if prompts_data is not None:
        names, task = select_files(found, prompts_data, task, allow_missing, fdir)
    else:
        names = found
    if not names:
        raise UserError(f"no prompt-named PNGs in {fdir}: eval.py scores the *.png files directly in the folder, "
                        f"named after their prompt (e.g. A_cat_on_a_table.png)")
    check_eval_json_writable(fdir)  # before the images are read and the scorer built, not after the scoring
    paths = [os.path.join(fdir, name) for name in names]
    # Read every image before paying for a model load. Scorers get them in the file's mode (RGB for all this
    # project writes): CLIP's preprocess resizes before it converts to RGB, and the course's numbers depend on it.
    images = [_read_png(path) for path in paths]
    # A name is the prompt (the course's) unless prompt_to_filename had to make it safe or short: then the
    # run's run_config.json, or the prompts file, says which prompt it stands for.
    prompts = [prompt_for_stem(fdir, Path(name).stem, prompts_data) for name in names]
    if scorer is None or isinstance(scorer, str):
        scorer = make_scorer(scorer or "clip", device=device, clip_pretrained=clip_pretrained)
    scores = [float(s) for s in scorer.score(images, prompts)]
    if len(scores) != len(paths):
        raise RuntimeError(f"scorer returned {len(scores)} scores for {len(paths)} images")
    result: dict = {"source_dir": fdir}
    result.update(zip(paths, scores))
    result["score"] = sum(scores) / len(scores)
    extra = [m for m in dict.fromkeys(metrics) if m != "clip"]
    if extra:
        sources, src_prompts = edit_sources(fdir, names)
        result["metrics"] = {}
        for metric in extra:
            if metric == "clip_direction":
                if not hasattr(scorer, "direction"):
                    raise UserError("--metrics clip_direction needs CLIP (--scorer clip): the toy scorer has no "
                                    "image and text embeddings")
                values = scorer.direction(images, sources, src_prompts, prompts)
            else:
                values = lpips_metric(str(resolve_device(device)), lpips_weights).distance(images, sources)
            result["metrics"][metric] = dict(zip(names, values), mean=sum(values) / len(values))
    try:
        save_json_atomic(result, os.path.join(fdir, EVAL_FILENAME))
    except OSError as err:  # the folder changed since the check (or the disk filled up)
        raise _unwritable(fdir, err.strerror or str(err)) from None
    return result


def check_eval_json_writable(fdir: str) -> None:
    """Raise UserError (one line) if FOLDER/eval.json cannot be written."""
    problem = file_write_problem(os.path.join(fdir, EVAL_FILENAME))
    if problem:
        raise _unwritable(fdir, problem)


def _unwritable(fdir: str, problem: str) -> UserError:
    path = os.path.join(fdir, EVAL_FILENAME)
    fix = "remove or rename that folder" if problem == "it is a folder" else \
        "make the folder writable, or score a writable copy of it"
    return UserError(f"cannot write {path} ({problem}): eval.py writes the scores beside the images; {fix}")


def build_parser() -> argparse.ArgumentParser:
    """Return the eval.py argument parser."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fdir1", required=True, help="folder whose *.png files (named after prompts) are scored")
    parser.add_argument("--scorer", default="clip", choices=scorer_choices(),
                        help="clip (default): CLIP ViT-B/32 similarity; a toy world's name: that world's exact "
                             "scorer")
    parser.add_argument("--clip_pretrained", default=DEFAULT_PRETRAINED,
                        help="open_clip ViT-B-32 tag (default openai), a local checkpoint file (for offline use, "
                             "e.g. OpenAI's ViT-B-32.pt, assumed QuickGELU like OpenAI's), or 'none' for random "
                             "weights (meaningless scores; tests only)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N, an integer GPU index, or mps "
                                                       "(default: best available)")
    parser.add_argument("--prompts", default=None,
                        help="course prompts json (data/prompt_img_pairs.json): check that every expected image "
                             "exists and score only those")
    parser.add_argument("--task", default="auto", choices=["auto", *TASKS],
                        help="with --prompts: gen expects <prompt>.png, edit expects <edit_prompt>.png "
                             "(default auto: whichever matches more files)")
    parser.add_argument("--metrics", nargs="+", default=["clip"], choices=METRICS,
                        help="clip: the course's CLIP score (always computed, eval.json's schema); for edits also "
                             "clip_direction (InstructPix2Pix's directional similarity, same CLIP) and lpips (to the "
                             "source, AlexNet), under eval.json's 'metrics' key")
    parser.add_argument("--lpips_weights", default="pretrained", choices=["pretrained", "none"],
                        help="lpips: torchvision's AlexNet (pretrained, default) or random weights (none: tests only)")
    parser.add_argument("--allow_missing", action="store_true",
                        help="with --prompts: score what exists even if expected images are missing")
    return parser


def main(argv=None) -> int:
    """Run eval.py on argv; return the exit code (UserError propagates for run_cli)."""
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)  # a device this machine lacks is an error, as in main.py
    result = evaluate_dir(args.fdir1, scorer=args.scorer, prompts_file=args.prompts, task=args.task,
                          device=device, clip_pretrained=args.clip_pretrained, allow_missing=args.allow_missing,
                          metrics=args.metrics, lpips_weights=args.lpips_weights)
    entries = {key: value for key, value in result.items() if key not in EXTRA_KEYS}
    for path, value in entries.items():
        print(f"{value:.4f}  {os.path.basename(path)}")
    for metric, values in result.get("metrics", {}).items():
        print(f"{metric}: mean {values['mean']:.4f} over {len(values) - 1} edits")
    print(f"score {result['score']:.4f} (mean of {len(entries)} images); "
          f"wrote {os.path.join(args.fdir1, EVAL_FILENAME)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
