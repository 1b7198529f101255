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

from reference import ReferenceSchedule  # noqa: E402

# The test models are tiny: a second CPU thread only spin-waits (and on a busy machine costs several times over).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """Return a folder holding a tiny random-weight SD (unet, vae, text_encoder, tokenizer, scheduler)."""
    from benchmarks.random_sd import build_random_sd

    return build_random_sd(tmp_path_factory.mktemp("tiny_sd") / "sd", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_dir):
    """Return a StableDiffusion loaded (fp32, CPU) from the tiny folder through the real loading path."""
    from guidance.sd import StableDiffusion

    return StableDiffusion(str(tiny_sd_dir), device="cpu")


# The float64 pair the gradient tests compare (tests/test_sd.py, tests/test_zoo.py): the model under test, and an
# independently loaded plain UNet with the schedule recomputed from the scheduler's config (tests/reference.py).
@pytest.fixture(scope="module")
def reference(tiny_sd_dir):
    """Return (float64 schedule, plain float64 UNet) loaded independently of StableDiffusion."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    config = DDPMScheduler.from_pretrained(tiny_sd_dir, subfolder="scheduler").config
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet").double().eval().requires_grad_(False)
    return ReferenceSchedule(config), unet


@pytest.fixture(scope="module")
def sd64(tiny_sd_dir):
    """Return the tiny StableDiffusion in float64 (latents passed in float64 keep every step in float64)."""
    from guidance.sd import StableDiffusion

    return StableDiffusion(str(tiny_sd_dir), device="cpu", precision=torch.float64)


@pytest.fixture(scope="module")
def embeddings(sd64):
    """Return cat[uncond, cond] text embeddings (float64) for two prompts."""
    uncond = sd64.get_text_embeds("low quality")
    return (torch.cat([uncond, sd64.get_text_embeds("a castle next to a river")]),
            torch.cat([uncond, sd64.get_text_embeds("a golden castle next to a river")]))


@pytest.fixture(scope="module")
def loaded(folders):
    """Return get(family) -> (our float64 model, the diffusers pipeline in float64), each loaded once, from the
    test module's own `folders` fixture (tests/test_families.py, tests/test_fidelity.py)."""
    from diffusers import DiffusionPipeline

    from guidance.sd import StableDiffusion

    cache = {}

    def get(family):
        if family not in cache:
            ours = StableDiffusion(str(folders[family]), device="cpu", precision=torch.float64)
            pipe = DiffusionPipeline.from_pretrained(str(folders[family]), local_files_only=True).to(torch.float64)
            cache[family] = ours, pipe
        return cache[family]

    return get


@pytest.fixture
def cli(capsys):
    """Return main.py's command line run in-process: cli(argv) -> (exit code, stdout, stderr)."""
    import main
    from utils import run_cli

    def call(argv) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exc:
            run_cli(lambda: main.main(argv))
        out, err = capsys.readouterr()
        return exc.value.code, out, err

    return call
