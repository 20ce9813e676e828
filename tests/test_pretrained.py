"""Published models by name: download, resume, convert, cache, offline, mirrors; no internet.

The "published" file is a reference-format checkpoint of convnext_dcls_audio_tiny with random
weights (tests/test_convert_reference.py builds it in the reference's exact container), served
under its Zenodo name by a loopback HTTP server (tests/weights_server.py) that can drop a
connection mid-body, ignore Range, or serve garbage. AUDIOSET_DCLS_WEIGHTS_URL points the
library at it, exactly as a user points it at a mirror.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import audioset_dcls
from audioset_dcls.hub.checkpoint import read_checkpoint_info
from audioset_dcls.labels import audioset_label_set
from audioset_dcls.hub.pretrained import (
    PUBLISHED_MODELS,
    DownloadError,
    PretrainedError,
    cached_path,
    download_file,
    fetch_pretrained,
)
from audioset_dcls.hub.pretrained import main as pretrained_main
from audioset_dcls.tagging.tagger import Tagger
from helpers_tagging import write_audio
from test_convert_reference import random_reference_state_dict, save_reference_checkpoint
from weights_server import WeightsServer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import infer  # noqa: E402  (the thin script at the repository root)

NAME = "convnext_tiny_dcls"
FILE = PUBLISHED_MODELS[NAME].file
PATH = "/" + FILE


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[bytes, dict[str, torch.Tensor]]:
    """(file bytes, reference state_dict) of a stand-in for convnext_dcls_audio_tiny.pth."""
    sd = random_reference_state_dict("convnext_dcls_audio_tiny", seed=11)
    path = save_reference_checkpoint(tmp_path_factory.mktemp("published") / FILE, sd, "convnext_dcls_audio_tiny")
    return path.read_bytes(), sd


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache of this test's own; downloads on; Zenodo unless a test sets a mirror."""
    monkeypatch.setenv("AUDIOSET_DCLS_CACHE", str(tmp_path / "cache"))
    for var in ("AUDIOSET_DCLS_OFFLINE", "AUDIOSET_DCLS_WEIGHTS_URL"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> Path:
    return write_audio(tmp_path_factory.mktemp("audio") / "dog.wav", 4.0, sr=44100)


def run_infer(capsys, *argv) -> tuple[int, str, str]:
    code = infer.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def leftovers(cache: Path) -> list[str]:
    """Files in the cache other than lock files: what a failed fetch must not leave behind."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() and p.suffix != ".lock")


# ----------------------------------------------------------------------------- the journey


def test_first_use_downloads_resumes_converts_caches_and_tags_then_works_offline(published, cache, wav, capsys,
                                                                                 monkeypatch):
    data, sd = published
    with WeightsServer({PATH: data}) as server:
        server.drop_after[PATH] = len(data) // 3  # the first response is cut a third of the way in
        monkeypatch.setenv("AUDIOSET_DCLS_WEIGHTS_URL", server.url + "/")
        code, out, err = run_infer(capsys, wav, "--format", "jsonl", "--top-k", 5)  # no --checkpoint
        assert code == 0, err
        # one cut response, then one resumed from where it stopped
        assert server.requests == [(PATH, None, 200), (PATH, f"bytes={len(data) // 3}-", 206)]
    first = json.loads(out)
    names = set(audioset_label_set().names)
    assert len(first["tags"]) == 5 and all(t["name"] in names for t in first["tags"])

    target = cached_path(NAME)
    assert target == cache / "convnext_dcls_audio_tiny.safetensors" and leftovers(cache) == [target.name]
    info = read_checkpoint_info(target)
    source = info.extra["converted_from"]
    assert source["url"] == f"{server.url}/{FILE}" and source["file"] == FILE
    assert source["sha256"] == hashlib.sha256(data).hexdigest() and source["published_map"] == "45.52 ± 0.05"
    assert info.labels[0] == {"index": 0, "mid": "/m/09x0r", "name": "Speech"} and len(info.labels) == 527

    # server gone: the cache alone serves the library entry points, with the same scores
    tags = Tagger.from_pretrained(NAME, offline=True).tag(wav).top(5)
    assert [(t.name, round(t.score, 6)) for t in tags] == [(t["name"], t["score"]) for t in first["tags"]]
    model, info = audioset_dcls.load_pretrained(NAME, bake=False)
    assert info.model_name == NAME and torch.equal(model.state_dict()["head.fc.weight"], sd["head.weight"])
    code, out, _ = run_infer(capsys, "--list-models")
    assert code == 0 and any(line.startswith(NAME) and " yes " in line for line in out.splitlines())
    assert str(cache) in out


# --------------------------------------------------------------------------- the download


def payload(n: int = 3 << 20) -> bytes:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n)).numpy().tobytes()


def test_a_server_that_ignores_range_sends_the_whole_file_again(tmp_path):
    data = payload()
    with WeightsServer({"/f.bin": data}, honour_range=False) as server:
        server.drop_after["/f.bin"] = 1 << 20
        dest = download_file(f"{server.url}/f.bin", tmp_path / "f.bin", retry_wait=0, progress=False)
    assert dest.read_bytes() == data
    assert [(rng is not None, status) for _, rng, status in server.requests] == [(False, 200), (True, 200)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


@pytest.mark.parametrize("changed", [False, True], ids=["same-file", "file-changed-meanwhile"])
def test_a_partial_download_resumes_on_the_next_call(tmp_path, changed):
    """A call that gives up leaves ``.part`` (never the file itself); the next call resumes it,
    unless the server's file changed meanwhile (If-Range), when it starts again."""
    data = payload()
    url_path = "/f.bin"
    dest = tmp_path / "f.bin"
    with WeightsServer({url_path: data}) as server:
        server.drop_after[url_path] = 1 << 20
        with pytest.raises(DownloadError, match=f"closed after {1 << 20} of {len(data)} bytes"):
            download_file(server.url + url_path, dest, retries=0, progress=False)
        assert not dest.exists() and (tmp_path / "f.bin.part").stat().st_size == 1 << 20
        if changed:
            data = payload(len(data) + 7)
            server.files[url_path] = data
        download_file(server.url + url_path, dest, retries=0, progress=False)
    assert dest.read_bytes() == data
    assert server.requests[1][1:] == (f"bytes={1 << 20}-", 200 if changed else 206)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_http_errors_give_one_line_naming_model_url_and_what_to_do(cache, monkeypatch):
    with WeightsServer({}) as server:
        monkeypatch.setenv("AUDIOSET_DCLS_WEIGHTS_URL", server.url)
        with pytest.raises(PretrainedError) as info:
            fetch_pretrained(NAME, retry_wait=0, progress=False)
        assert server.count(PATH) == 1  # a 404 is not retried
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{NAME}: could not download {server.url}/{FILE}")
    assert "HTTP 404" in msg and f"python -m audioset_dcls convert {FILE} {cache}" in msg and PUBLISHED_MODELS[NAME].url in msg
    # nothing listening at all: retried, then the same kind of line
    with pytest.raises(PretrainedError, match=rf"^{NAME}: could not download .*\(2 attempts\).*audioset_dcls convert"):
        fetch_pretrained(NAME, retries=1, retry_wait=0, progress=False)
    assert leftovers(cache) == []


@pytest.mark.parametrize("kind", ["truncated", "html", "another-file"])
def test_a_bad_file_is_refused_not_cached_and_fetched_again_next_time(published, cache, wav, capsys, monkeypatch,
                                                                      kind):
    data, _ = published
    if kind == "truncated":  # complete as served (right Content-Length), but half a checkpoint
        bad = data[: len(data) // 2]
    elif kind == "html":  # what a rate-limited or moved download link returns
        bad = b"<!DOCTYPE html><html><body>Too many requests</body></html>"
    else:  # a real torch checkpoint, but not this model
        buf = io.BytesIO()
        torch.save({"model": {"weight": torch.zeros(3)}}, buf)
        bad = buf.getvalue()
    with WeightsServer({PATH: bad}) as server:
        monkeypatch.setenv("AUDIOSET_DCLS_WEIGHTS_URL", server.url)
        for attempt in (1, 2):
            code, _, err = run_infer(capsys, wav, "-q")
            assert code == 2
            (line,) = error_lines(err)
            assert line.startswith(f"error: {NAME}: {server.url}/{FILE} is not the published {FILE}")
            assert "nothing cached" in line and "audioset_dcls convert" in line
            assert leftovers(cache) == []  # no converted file, no download, no .part
            assert server.count(PATH) == attempt  # the next call tries again


def test_offline_with_an_empty_cache_fails_with_one_line(cache, wav, capsys, monkeypatch):
    with WeightsServer({}) as server:
        monkeypatch.setenv("AUDIOSET_DCLS_WEIGHTS_URL", server.url)
        code, _, err = run_infer(capsys, wav, "--offline")
        assert code == 2
        monkeypatch.setenv("AUDIOSET_DCLS_OFFLINE", "1")
        code2, _, err2 = run_infer(capsys, wav, "--model", "fastvit_sa24_dcls")
        assert code2 == 2
    assert server.requests == []
    (line,) = error_lines(err)
    assert line.startswith(f"error: {NAME}: not in the cache ({cache / 'convnext_dcls_audio_tiny.safetensors'})")
    assert "AUDIOSET_DCLS_OFFLINE=1" in line and PUBLISHED_MODELS[NAME].url in line and "audioset_dcls convert" in line
    assert error_lines(err2)[0].startswith("error: fastvit_sa24_dcls: not in the cache")
    # the prefetch command says the same, per model
    assert pretrained_main(["--offline", NAME, "convformer_s18"]) == 1
    lines = error_lines(capsys.readouterr().err)
    assert [ln.split(":")[1].strip() for ln in lines] == [NAME, "convformer_s18"]
    assert not cache.exists() or leftovers(cache) == []


def test_a_local_folder_mirror_is_converted_in_place(published, cache, tmp_path, monkeypatch):
    data, sd = published
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / FILE).write_bytes(data)
    monkeypatch.setenv("AUDIOSET_DCLS_WEIGHTS_URL", mirror.as_uri())  # file://...; missing file first
    (mirror / FILE).rename(mirror / "elsewhere.pth")
    with pytest.raises(PretrainedError, match=rf"^{NAME}: {mirror.as_uri()}/{FILE} does not exist"):
        fetch_pretrained(NAME, progress=False)
    (mirror / "elsewhere.pth").rename(mirror / FILE)
    monkeypatch.setenv("AUDIOSET_DCLS_WEIGHTS_URL", str(mirror))  # a plain folder
    path = fetch_pretrained(NAME, progress=False)
    assert (mirror / FILE).read_bytes() == data  # the user's file is left where it was
    assert leftovers(cache) == [path.name]
    assert read_checkpoint_info(path).extra["converted_from"]["url"] == str(mirror / FILE)


def test_concurrent_first_uses_download_once(published, cache, tmp_path):
    """Two processes ask for the model at once (as the ranks of a launch do): one downloads and
    converts, the other waits for it and reads the cache."""
    data, _ = published
    code = ("import sys; from audioset_dcls.hub.pretrained import fetch_pretrained; "
            f"print(fetch_pretrained({NAME!r}, retry_wait=0))")
    with WeightsServer({PATH: data}, delay=1.0) as server:
        env = dict(os.environ, AUDIOSET_DCLS_CACHE=str(cache), AUDIOSET_DCLS_WEIGHTS_URL=server.url,
                   PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        env.pop("AUDIOSET_DCLS_OFFLINE", None)
        procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert [rc for _, _, rc in results] == [0, 0], [err for _, err, _ in results]
    assert {out.strip() for out, _, _ in results} == {str(cache / "convnext_dcls_audio_tiny.safetensors")}
    assert server.count(PATH) == 1
    assert sum("waiting for another process" in err for _, err, _ in results) == 1
    assert leftovers(cache) == ["convnext_dcls_audio_tiny.safetensors"]
