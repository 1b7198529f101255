"""Checking what a request to the app (the page or an API client) sent, before anything runs: each field's type and
range, the source image from its header, and the messages the page and gradio_client show (app.py's Handlers and
Runner call these; RunConfig.resolved checks the rest, as for main.py)."""
from __future__ import annotations

import html
import re
import sys
import traceback
from pathlib import Path

MAX_SOURCE_PIXELS = 4096 * 4096  # a source image's size, read from its header before anything is decoded
MAX_PROMPT_CHARS = 1000  # CLIP reads 77 tokens; a longer text is a mistake or an attack


def user_error(message: str):
    """Return the UserError that carries a message about a request to the page."""
    from utils import UserError

    return UserError(message)


def blank(value) -> bool:
    """Return whether a request left a field empty (None or whitespace)."""
    return value is None or (isinstance(value, str) and not value.strip())


def as_text(value, name: str) -> str:
    """Return a text field's value ('' for None), or raise naming the field."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise user_error(f"the {name} must be text, not {type(value).__name__} {value!r:.60}")
    return value


def as_prompt(value, name: str) -> str:
    """Return a prompt field's text, at most MAX_PROMPT_CHARS long."""
    text = as_text(value, name)
    if len(text) > MAX_PROMPT_CHARS:
        raise user_error(f"the {name} is {len(text)} characters long; this server takes at most {MAX_PROMPT_CHARS} "
                          f"(CLIP reads about 77 words): shorten it")
    return text


def as_switch(value, name: str) -> bool:
    """Return a checkbox's value (True when not sent)."""
    if value is None:
        return True
    if not isinstance(value, bool):
        raise user_error(f"'{name}' must be true or false, not {value!r:.60}")
    return value


EXAMPLES = {"guidance": "7.5, or leave it blank for the method's default", "steps": "200", "seed": "0"}


def as_number(value, name: str) -> float:
    """Return a finite number from a number or its text, or raise naming the field and an example."""
    fix = f"give e.g. {EXAMPLES.get(name, '1')}"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise user_error(f"{name} {value!r:.60} is not a number: {fix}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise user_error(f"{name} {value!r:.60} is not a number: {fix}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise user_error(f"{name} {value!r} must be a finite number: {fix}")
    return number


def as_whole(value, name: str) -> int:
    """Return a whole number exactly (a seed above 2^53 too), or raise naming the field and an example."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # exactly (a float would round a seed above 2^53)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    number = as_number(value, name)
    if number != int(number):
        raise user_error(f"{name} {value} must be a whole number: give e.g. {EXAMPLES.get(name, '1')}")
    return int(number)


def source_image(source) -> str | None:
    """Return the local path of the source image a request sent (a path, or Gradio's file payload {"path": ...}),
    after checking from its header, before anything is decoded, that it is an image of at most MAX_SOURCE_PIXELS."""
    from PIL import Image

    if blank(source):
        return None
    path = source.get("path") if isinstance(source, dict) else source
    if not isinstance(path, str) or not path:
        raise user_error("the source image did not arrive as a file: upload a PNG or JPEG")
    name = Path(source.get("orig_name") or path).name if isinstance(source, dict) else Path(path).name
    limit = f"this server takes at most {MAX_SOURCE_PIXELS / 1e6:.1f} million pixels (e.g. 4096 x 4096)"
    try:
        with Image.open(path) as img:
            width, height = img.size
    except Image.DecompressionBombError:
        raise user_error(f"the source image {name} is far too large: {limit}; upload a smaller one") from None
    except FileNotFoundError:
        raise user_error(f"the source image {name} is not on the server: upload it again") from None
    except (OSError, SyntaxError, ValueError):  # PIL's UnidentifiedImageError is an OSError
        raise user_error(f"the source image {name} is not an image this app can read: upload a PNG or "
                          f"JPEG") from None
    if width * height > MAX_SOURCE_PIXELS:
        raise user_error(f"the source image {name} is {width} x {height} pixels; {limit}: upload a smaller one")
    return path


# The CLI's flags as the page names them (RunConfig's messages are written for main.py).
PAGE_NAMES = {"prompt": "the prompt", "edit_prompt": "the edit prompt", "src_img_path": "the source image",
              "loss_type": "the method", "guidance_scale": "the guidance scale", "step": "steps", "seed": "the seed",
              "generator": "the generator", "model": "model", "save_dir": "the app's output folder"}


def page_message(text: str) -> str:
    """Return a message written for main.py with its flags named as the page names them (--edit_prompt -> the edit
    prompt); a flag the page does not offer keeps its name."""
    return re.sub(r"--([a-z0-9_]+)\b", lambda m: PAGE_NAMES.get(m.group(1), m.group(0)), text)


def describe_error(err: BaseException) -> str:
    """Return the one line the page shows for an error: the CLI's message for user errors, a pointer for bugs."""
    from utils import UserError

    if isinstance(err, UserError):
        return f"error: {page_message(str(err))}"
    traceback.print_exception(err, file=sys.stderr)
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    return f"error: {err.__class__.__name__}: {first} (a bug: the traceback is in the app's log)"


def page_error(status: str):
    """Return the gr.Error that carries a status line's message to the page (a pop-up) and to API clients (gradio_client
    raises it as AppError); HTML-escaped, since the pop-up renders HTML and a message may quote a prompt."""
    import gradio as gr

    return gr.Error(html.escape(status.removeprefix("error: "), quote=False), title="Error", print_exception=False)
