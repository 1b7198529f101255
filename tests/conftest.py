"""Shared fixtures: offline mode, the repo root on sys.path, and a tiny random-weight Stable Diffusion folder."""
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the subprocesses the tests start, too

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402
import torch  # noqa: E402

# The test models are tiny: a second CPU thread only spin-waits (and on a busy machine costs several times over).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """Return a folder holding a tiny random-weight SD (unet, vae, text_encoder, tokenizer, scheduler)."""
    from guidance.random_sd import build_random_sd

    return build_random_sd(tmp_path_factory.mktemp("tiny_sd") / "sd", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_dir):
    """Return a StableDiffusion loaded (fp32, CPU) from the tiny folder through the real loading path."""
    from guidance.sd import StableDiffusion

    return StableDiffusion(str(tiny_sd_dir), device="cpu")
