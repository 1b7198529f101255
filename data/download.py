"""Fetch the course's 10 source images into data/imgs/, checking each one's SHA-256 before it is saved.

    python data/download.py                                   # from GitHub, pinned to the course's commit
    python data/download.py --from /path/to/assignment/imgs   # copy from a local folder, same checks

Files already present with the right hash are skipped. A file whose hash is wrong is never written (it is
checked in memory, then saved via a temporary file and a rename). Standard library only, so that fetching
data does not need torch installed.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

COMMIT = "1f2451b668aa0f54a49f1ece21c5e7d8aa977da7"
URL_BASE = (f"https://raw.githubusercontent.com/KAIST-Visual-AI-Group/Diffusion-Assignment4-Distillation/"
            f"{COMMIT}/data/imgs")
DEST = Path(__file__).resolve().parent / "imgs"
TIMEOUT_S = 60.0
SHA256 = {
    "A_burger_on_the_table.png": "4bb61dee43b3c26cfccdae74b0de6998c0aed042270ff537d32f48146ef6e577",
    "A_cabin_surrounded_by_forests.png": "ecc6cc8f11e7c1cc8b533e2daf121a5a88d53ba17592d7c26da440d05343a24b",
    "A_car_on_the_road.png": "28acc72d162da548844a882b1817471c0f7b6a7ec0d5eec093b1a594d60c159e",
    "A_castle_next_to_a_river.png": "c74c63002975760217a7dc497c5936a05d28169ad0d80c4848ad36b528d6640a",
    "A_church_beside_a_lake.png": "713c2cd5d84fc01e6c9f9830ad35820882fb168c4e9d4f68c8f26a8e24383439",
    "A_dog_sitting_on_grass.png": "2a260d3b43064104d5435028c3466aa3fbc4b56205bc76290c4fdcc4cc5a8209",
    "A_red_bus_driving_on_a_desert_road.png": "b081ea4ffa09466347208be5a19f9785ffa5dd4614c9b116cb7e4c26d87000d6",
    "A_villa_close_to_the_pool.png": "387e4e93f29e484ff269c02b1b1b4a251d42332729e2a22ec37163dfe6a83ff8",
    "a_boat_in_a_river.png": "dbad1d8070ea2278cb47d8d9b7320b4ca452675decfe20cd39896f2f72b17716",
    "a_cat_sitting_on_a_table.png": "399e3310807b41b3b3d076453239a3fad7434d4daa8a7da795e5f2d08c3e50fd",
}


class DownloadError(Exception):
    """A fetch that cannot be completed: printed as 'error: ...', exit code 2, no traceback."""


class UnreachableError(DownloadError):
    """The server cannot be reached at all: no point trying the remaining files."""


def sha256_hex(data: bytes) -> str:
    """Return the SHA-256 of data as lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str | None:
    """Return the SHA-256 of the file at path, or None if there is no readable file there."""
    try:
        return sha256_hex(path.read_bytes())
    except OSError:
        return None


def fetch_bytes(name: str, source_dir: Path | None, url_base: str, timeout: float) -> tuple[bytes, str]:
    """Return (bytes of image `name`, where they came from), read from source_dir or fetched from url_base."""
    if source_dir is not None:
        path = source_dir / name
        try:
            return path.read_bytes(), str(path)
        except OSError as err:
            raise DownloadError(f"{name}: cannot read {path} ({err.strerror or err})") from None
    url = f"{url_base.rstrip('/')}/{name}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read(), url
    except urllib.error.HTTPError as err:  # the server answered: this file only
        raise DownloadError(f"{name}: cannot fetch {url} (HTTP {err.code} {err.reason}): check --url_base, or "
                            f"copy the images from a local folder with --from DIR") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        if isinstance(reason, FileNotFoundError):  # a file:// base without this one file
            raise DownloadError(f"{name}: {url} does not exist: check --url_base") from None
        raise UnreachableError(f"cannot fetch {url} ({reason}): check the connection, or copy the images from a "
                               f"local folder with --from DIR") from None


def write_atomic(path: Path, data: bytes) -> None:
    """Write data to path via a temporary file in the same folder and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions of a new file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fetch_all(dest: Path = DEST, source_dir: Path | None = None, url_base: str = URL_BASE,
              timeout: float = TIMEOUT_S, checksums: dict[str, str] | None = None) -> dict[str, str]:
    """Return {name: 'present' | 'fetched' | error message} after fetching every image in checksums into dest."""
    checksums = SHA256 if checksums is None else checksums
    dest, source_dir = Path(dest), (Path(source_dir) if source_dir is not None else None)
    if source_dir is not None and not source_dir.is_dir():
        raise DownloadError(f"--from {source_dir}: no such folder: give the folder that holds the course's "
                            f"*.png images (e.g. a checkout's data/imgs)")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"cannot create {dest} ({err.strerror or err}): choose another --dest") from None
    status: dict[str, str] = {}
    for name, expected in checksums.items():
        target = dest / name
        present = file_sha256(target)
        if present == expected:
            status[name] = "present"
            print(f"ok       {name} (already present)")
            continue
        if present is not None:
            print(f"refetch  {name}: the file in {dest} has SHA-256 {present}, expected {expected}")
        try:
            data, origin = fetch_bytes(name, source_dir, url_base, timeout)
            actual = sha256_hex(data)
            if actual != expected:
                raise DownloadError(f"{name}: SHA-256 mismatch: expected {expected}, got {actual} (from {origin}); "
                                    f"not saved")
            write_atomic(target, data)
        except UnreachableError:
            raise
        except DownloadError as err:
            status[name] = str(err)
            print(f"error: {err}", file=sys.stderr)
            continue
        except OSError as err:
            raise DownloadError(f"cannot write {target} ({err.strerror or err}): choose another --dest") from None
        status[name] = "fetched"
        print(f"fetched  {name}")
    failed = [name for name, state in status.items() if state not in ("present", "fetched")]
    if failed:
        raise DownloadError(f"{len(failed)} of {len(checksums)} course images failed (see above): "
                            f"{', '.join(failed)}")
    return status


def main(argv: list[str] | None = None) -> int:
    """Run the downloader on argv; return 0 (DownloadError propagates to the caller)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source_dir", default=None,
                        help="copy the images from this local folder instead of downloading them")
    parser.add_argument("--url_base", default=URL_BASE,
                        help="base URL the <name>.png files are fetched from (default: GitHub at commit "
                             f"{COMMIT[:10]}; file:// URLs work too)")
    parser.add_argument("--dest", default=str(DEST), help=f"folder to write the images to (default {DEST})")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds to wait for each download")
    args = parser.parse_args(argv)
    status = fetch_all(Path(args.dest), args.source_dir, args.url_base, args.timeout)
    fetched = sum(state == "fetched" for state in status.values())
    print(f"{len(status)} course images in {args.dest} ({fetched} new, {len(status) - fetched} already there)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
