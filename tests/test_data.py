"""data/: the course's prompt json and data/download.py's checksum-verified fetch (local folder and URL)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path("/work/shared/assignment-data")


def _load_download_module():
    spec = importlib.util.spec_from_file_location("course_data_download", ROOT / "data" / "download.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


download = _load_download_module()


def _fake_images(folder: Path, count: int = 3) -> dict[str, str]:
    """Write `count` small files named like course images; return their checksums."""
    folder.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for i, name in enumerate(list(download.SHA256)[:count]):
        data = f"fake png {i}".encode() * (i + 1)
        (folder / name).write_bytes(data)
        checksums[name] = hashlib.sha256(data).hexdigest()
    return checksums


def test_prompt_json_has_the_ten_course_pairs_with_relative_paths():
    pairs = json.loads((ROOT / "data" / "prompt_img_pairs.json").read_text())
    assert len(pairs) == 10
    assert {f"{key}.png" for key in pairs} == set(download.SHA256)
    for key, entry in pairs.items():
        assert set(entry) == {"prompt", "edit_prompt", "img_path"}
        assert entry["img_path"] == f"data/imgs/{key}.png"
        assert entry["prompt"].replace(" ", "_") == key
        assert entry["edit_prompt"] != entry["prompt"]
    assert pairs["a_boat_in_a_river"]["edit_prompt"] == "a golden boat in a river"
    if (SHARED_DATA / "prompt_img_pairs.json").exists():
        original = json.loads((SHARED_DATA / "prompt_img_pairs.json").read_text())
        assert list(pairs) == list(original)  # same key order
        assert all(pairs[k]["img_path"] == original[k]["img_path"].replace("$HOME/", "") for k in pairs)
        assert all(pairs[k]["prompt"] == original[k]["prompt"] and pairs[k]["edit_prompt"] == original[k]["edit_prompt"]
                   for k in pairs)


def test_checksums_match_the_shared_sha256sums_file():
    if not (SHARED_DATA / "SHA256SUMS").exists():
        pytest.skip("no /work/shared/assignment-data here")
    listed = {}
    for line in (SHARED_DATA / "SHA256SUMS").read_text().split("\n"):
        if line.strip():
            digest, path = line.split()
            listed[Path(path).name] = digest
    assert listed == download.SHA256
    assert download.COMMIT in download.URL_BASE and download.URL_BASE.startswith("https://raw.githubusercontent.com/")
    assert (ROOT / "data" / "LICENSE-assignment-data").read_text().startswith("MIT License")


def test_copy_from_folder_verifies_and_skips_present_files(tmp_path, capsys):
    checksums = _fake_images(tmp_path / "src")
    dest = tmp_path / "imgs"
    status = download.fetch_all(dest, source_dir=tmp_path / "src", checksums=checksums)
    assert status == {name: "fetched" for name in checksums}
    umask = os.umask(0)
    os.umask(umask)
    for name, digest in checksums.items():
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == digest
        assert (dest / name).stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert sorted(os.listdir(dest)) == sorted(checksums)  # no temp files left

    (dest / list(checksums)[1]).write_bytes(b"corrupted")  # a bad copy on disk is replaced
    capsys.readouterr()
    status = download.fetch_all(dest, source_dir=tmp_path / "src", checksums=checksums)
    assert list(status.values()) == ["present", "fetched", "present"]
    assert hashlib.sha256((dest / list(checksums)[1]).read_bytes()).hexdigest() == checksums[list(checksums)[1]]
    assert "refetch" in capsys.readouterr().out


def test_tampered_source_is_an_error_and_is_not_saved(tmp_path, capsys):
    checksums = _fake_images(tmp_path / "src")
    bad_name = list(checksums)[2]
    (tmp_path / "src" / bad_name).write_bytes(b"tampered")
    dest = tmp_path / "imgs"
    with pytest.raises(download.DownloadError, match=rf"1 of 3 course images failed .*{bad_name}"):
        download.fetch_all(dest, source_dir=tmp_path / "src", checksums=checksums)
    err = capsys.readouterr().err
    assert f"{bad_name}: SHA-256 mismatch: expected {checksums[bad_name]}, " \
           f"got {hashlib.sha256(b'tampered').hexdigest()}" in err
    assert sorted(os.listdir(dest)) == sorted(list(checksums)[:2])  # the good ones saved, the bad one not


def test_download_from_a_file_url(tmp_path):
    checksums = _fake_images(tmp_path / "server")
    dest = tmp_path / "imgs"
    status = download.fetch_all(dest, url_base=(tmp_path / "server").as_uri(), checksums=checksums)
    assert status == {name: "fetched" for name in checksums}
    assert all((dest / name).read_bytes() == (tmp_path / "server" / name).read_bytes() for name in checksums)


def test_download_errors(tmp_path, capsys, monkeypatch):
    checksums = _fake_images(tmp_path / "server", count=2)
    (tmp_path / "server" / list(checksums)[0]).unlink()
    with pytest.raises(download.DownloadError, match=r"1 of 2 course images failed"):
        download.fetch_all(tmp_path / "imgs", url_base=(tmp_path / "server").as_uri(), checksums=checksums)
    missing = list(checksums)[0]
    assert f"{missing}: {tmp_path.as_uri()}/server/{missing} does not exist" in capsys.readouterr().err
    with pytest.raises(download.UnreachableError, match=r"cannot fetch http://127\.0\.0\.1:9/.*--from DIR"):
        download.fetch_all(tmp_path / "imgs2", url_base="http://127.0.0.1:9/imgs", timeout=5, checksums=checksums)
    with pytest.raises(download.DownloadError, match=r"--from .*nowhere: no such folder"):
        download.fetch_all(tmp_path / "imgs3", source_dir=tmp_path / "nowhere", checksums=checksums)

    def not_found(url, timeout):
        raise urllib.error.HTTPError(url, 404, "Not Found", None, None)

    monkeypatch.setattr(download.urllib.request, "urlopen", not_found)
    with pytest.raises(download.DownloadError, match=r"2 of 2 course images failed"):
        download.fetch_all(tmp_path / "imgs4", url_base="https://example.org/imgs", checksums=checksums)
    assert f"{list(checksums)[1]}: cannot fetch https://example.org/imgs/{list(checksums)[1]} (HTTP 404 Not Found)" \
        in capsys.readouterr().err


def _run_download(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "data/download.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_mismatch_exits_nonzero_without_traceback(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in download.SHA256:
        (src / name).write_bytes(b"not the course image")
    proc = _run_download("--from", str(src), "--dest", str(tmp_path / "imgs"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    first = next(iter(download.SHA256))
    assert f"{first}: SHA-256 mismatch: expected {download.SHA256[first]}, " \
           f"got {hashlib.sha256(b'not the course image').hexdigest()}" in proc.stderr
    assert "error: 10 of 10 course images failed" in proc.stderr
    assert os.listdir(tmp_path / "imgs") == []


@pytest.mark.skipif(not (SHARED_DATA / "imgs").is_dir(), reason="no local copy of the course images")
def test_cli_copies_the_real_course_images(tmp_path):
    proc = _run_download("--from", str(SHARED_DATA / "imgs"), "--dest", str(tmp_path / "imgs"))
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / "imgs")) == sorted(download.SHA256)
    again = _run_download("--from", str(SHARED_DATA / "imgs"), "--dest", str(tmp_path / "imgs"))
    assert again.returncode == 0 and "(0 new, 10 already there)" in again.stdout
