"""The same seed gives the same files across refactors: a seeded run of every method in the toy world (and SDS, PDS,
VSD on the tiny SD) writes the PNG and loss.csv recorded in tests/data/pinned/ before the structure change.

A method whose result changes on purpose (the fidelity issue: PDS's official variant is an option, SDI's default
inversion) is re-pinned in its own commit with `python tests/test_pinned.py --record NAME ...`, which rewrites only
the runs named.
"""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PINNED = REPO / "tests" / "data" / "pinned"
TOY_SOURCE = str(REPO / "data" / "toy_imgs" / "a_red_circle.png")
TOY_EDIT = ["--edit_prompt", "a blue circle", "--src_img_path", TOY_SOURCE]
TOY = ["--model", "toy", "--prompt", "a red circle", "--seed", "3", "--log_step", "0"]
# name -> (main.py flags, whether the run needs the tiny SD folder)
RUNS = {
    **{f"toy_{m}": (TOY + ["--loss_type", m, "--step", "40"] + (TOY_EDIT if m in ("pds", "dds", "sds_edit") else []),
                    False)
       for m in ("sds", "pds", "vsd", "nfsd", "csd", "dds", "bridge", "asd", "ism", "sdi", "sds_edit")},
    "toy_ddim": (TOY + ["--loss_type", "ddim", "--ddim_steps", "10"], False),
    "toy_vsd_2": (TOY + ["--loss_type", "vsd", "--step", "30", "--num_particles", "2"], False),
    "toy_pixels_sds": (TOY + ["--loss_type", "sds", "--step", "30", "--generator", "pixels"], False),
    **{f"tiny_{m}": (["--prompt", "A castle next to a river", "--seed", "5", "--log_step", "0", "--loss_type", m,
                      "--step", "4", "--device", "cpu"]
                     + (["--edit_prompt", "A rainbow castle next to a river", "--src_img_path", TOY_SOURCE]
                        if m == "pds" else []), True)
       for m in ("sds", "pds", "vsd")},
}
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-9
PIXEL_TOLERANCE = 1  # uint8 levels: float rounding may flip a value across a quantisation step


def produce(name: str, out_dir: Path, tiny_sd_dir: Path | None) -> tuple[np.ndarray, list[float]]:
    """Return (the run's PNG as a uint8 array, its losses) after running it through main.py's CLI."""
    import main

    argv, needs_sd = RUNS[name]
    argv = argv + ["--save_dir", str(out_dir)] + (["--model", str(tiny_sd_dir)] if needs_sd else [])
    assert main.main(argv) == 0
    pngs = sorted(out_dir.glob("*.png"))
    assert len(pngs) == 1, f"{name}: expected one result image, found {[p.name for p in pngs]}"
    with open(out_dir / pngs[0].stem / "loss.csv", newline="") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    return np.asarray(Image.open(pngs[0]).convert("RGB")), losses


@pytest.mark.parametrize("name", list(RUNS))
def test_same_seed_gives_the_recorded_files(name, tmp_path, request):
    tiny = request.getfixturevalue("tiny_sd_dir") if RUNS[name][1] else None
    image, losses = produce(name, tmp_path / name, tiny)
    expected_image = np.asarray(Image.open(PINNED / f"{name}.png").convert("RGB"))
    expected_losses = json.loads((PINNED / "losses.json").read_text())[name]
    assert image.shape == expected_image.shape
    worst = int(np.abs(image.astype(int) - expected_image.astype(int)).max())
    assert worst <= PIXEL_TOLERANCE, f"{name}: the image differs from the recorded one by up to {worst} levels"
    assert len(losses) == len(expected_losses)
    np.testing.assert_allclose(losses, expected_losses, rtol=LOSS_RTOL, atol=LOSS_ATOL, err_msg=name)


def record(names: list[str]) -> None:
    """Run the named runs (all without names) and store their PNG and losses as the pinned values."""
    import tempfile

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    import conftest  # noqa: F401 (offline mode, one thread)
    from benchmarks.random_sd import build_random_sd

    PINNED.mkdir(parents=True, exist_ok=True)
    path = PINNED / "losses.json"
    stored = json.loads(path.read_text()) if path.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_random_sd(Path(tmp) / "sd", "tiny", seed=0)
        for name in names or list(RUNS):
            image, losses = produce(name, Path(tmp) / name, tiny)
            Image.fromarray(image).save(PINNED / f"{name}.png")
            stored[name] = losses
            print(f"recorded {name}: {len(losses)} losses")
    path.write_text(json.dumps(stored, indent=0, sort_keys=True) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] != ["--record"]:
        sys.exit("usage: python tests/test_pinned.py --record [NAME ...]")
    record(sys.argv[2:])
