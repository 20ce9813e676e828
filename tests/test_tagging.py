"""Tagger: window rule, streamed decoding == whole-file decoding, features == training features,
real formats, baked == unbaked, embeddings, cross-file batching, threads/devices, safe loading."""

from __future__ import annotations

import os
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from audioset_dcls.audio import AudioDecodeError, load_audio
from audioset_dcls.features import compute_logmel
from audioset_dcls.models.dcls import DclsConv2d
from audioset_dcls.audio.stream import stream_audio
from audioset_dcls.tagging.inputs import expand_inputs
from audioset_dcls.tagging.results import TagFailure
from audioset_dcls.tagging.tagger import Tagger, resolve_device, resolve_precision, set_cpu_threads
from audioset_dcls.tagging.windows import SlidingWindows, window_starts
from helpers_tagging import AUDIO_VARIANTS, LABEL_NAMES, write_audio, write_checkpoint, write_variants

SR = 32000
CLIP = 10 * SR


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def tagger(checkpoint) -> Tagger:
    return Tagger.from_checkpoint(checkpoint, device="cpu", batch_size=4, hop_seconds=5.0)


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("audio")
    write_variants(folder)
    return folder


@pytest.fixture()
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ---- the window rule ------------------------------------------------------------------------


def test_window_starts_rule():
    hop = 5 * SR
    # 35 s, hop 5 s: the regular windows end exactly at the end -> 6 windows 0..25 s
    assert [s / SR for s in window_starts(35 * SR, CLIP, hop)] == [0, 5, 10, 15, 20, 25]
    # 37 s: one more window, aligned to the end (27-37 s), never a mostly-padded one
    assert [s / SR for s in window_starts(37 * SR, CLIP, hop)] == [0, 5, 10, 15, 20, 25, 27]
    # 10 s or less: one window (padded like training)
    assert window_starts(CLIP, CLIP, hop) == [0]
    assert window_starts(3 * SR, CLIP, hop) == [0]
    # hop longer than the window skips audio but still ends at the end
    assert [s / SR for s in window_starts(25 * SR, CLIP, 20 * SR)] == [0, 15]
    with pytest.raises(ValueError):
        window_starts(CLIP, CLIP, 0)


@pytest.mark.parametrize("total,block,hop", [(35 * SR, 7919, 5 * SR), (37 * SR + 123, SR, 3 * SR),
                                             (3 * SR, 1000, 5 * SR), (25 * SR, 4 * SR, 20 * SR),
                                             (CLIP, CLIP, CLIP), (CLIP + 1, 10**6, CLIP)])
def test_sliding_windows_match_rule_and_signal(total, block, hop):
    signal = np.random.default_rng(total).standard_normal(total).astype(np.float32)
    blocks = (signal[i:i + block] for i in range(0, total, block))
    sliding = SlidingWindows(blocks, CLIP, hop)
    got = list(sliding)
    assert sliding.num_samples == total
    assert [s for s, _ in got] == window_starts(total, CLIP, hop)
    for start, wave in got:
        expected = signal[start:start + CLIP]
        assert wave.shape == (CLIP,)
        np.testing.assert_array_equal(wave[:len(expected)], expected)
        assert not wave[len(expected):].any()  # only a short signal is padded, with zeros


def test_sliding_windows_memory_is_bounded():
    """20 minutes of audio in 1 s blocks: the windower holds about one window + hop + block."""
    def blocks():
        for _ in range(20 * 60):
            yield np.full(SR, 0.1, np.float32)

    tracemalloc.start()
    count = 0
    for _, wave in SlidingWindows(blocks(), CLIP, 5 * SR):
        count += 1
        del wave
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == len(window_starts(20 * 60 * SR, CLIP, 5 * SR)) == 239
    # 20 min of float32 is 154 MB; a window is 1.3 MB; allow a few windows' worth.
    assert peak < 8e6, f"peak {peak / 1e6:.1f} MB"


# ---- decoding and features ------------------------------------------------------------------


@pytest.mark.parametrize("name", [v[0] for v in AUDIO_VARIANTS])
def test_streamed_decoding_equals_whole_file(audio_dir, name):
    """Blocks of 0.37 s (many block boundaries, none aligned with anything) concatenate to
    exactly what the front end's load_audio returns for the whole file: the streaming soxr
    resampler is the same filter run incrementally."""
    path = audio_dir / name
    streamed = np.concatenate(list(stream_audio(path, SR, block_seconds=0.37)))
    whole = load_audio(path, SR)
    assert streamed.shape == whole.shape
    np.testing.assert_allclose(streamed, whole, rtol=0, atol=1e-6)


def test_window_logmel_equals_training_features(tmp_path, tagger):
    """The log-mel the model sees for each window of a streamed 37 s stereo 44.1 kHz file equals
    features.compute_logmel of that stretch of the fully decoded signal.

    Tolerance 1e-3 dB: decoding is identical (previous test); what differs is only that the
    tagger runs a batched STFT/matmul, which may sum in another order (float32 rounding, ~1e-6
    relative on the power, i.e. ~1e-5 dB). Padded short clips are covered by the same test on
    a 3 s file."""
    for seconds in (37.0, 3.0):
        path = write_audio(tmp_path / f"long{seconds}.flac", seconds, sr=44100, channels=2, fmt="FLAC")
        whole = load_audio(path, SR)
        windows = list(tagger.windows(path))
        starts = [s for s, _ in windows]
        assert starts == window_starts(len(whole), CLIP, tagger.hop_samples)
        got = tagger.windows_logmel(torch.from_numpy(np.stack([w for _, w in windows]))).numpy()
        for (start, _), mel in zip(windows, got):
            expected = compute_logmel(whole[start:start + CLIP], tagger.features)
            assert mel.shape == expected.shape == (128, 1001)
            np.testing.assert_allclose(mel, expected, rtol=0, atol=1e-3)


def test_scores_equal_model_on_training_features(checkpoint, audio_dir):
    """End to end for a short clip: tagger score == sigmoid(model(normalised compute_logmel))."""
    from audioset_dcls.hub.checkpoint import load_model

    tagger = Tagger.from_checkpoint(checkpoint, device="cpu")
    model, info = load_model(checkpoint, bake=True)
    path = audio_dir / "short16k.wav"
    x = torch.from_numpy(compute_logmel(load_audio(path, SR), info.features))
    with torch.no_grad():
        expected = torch.sigmoid(model(info.normalization.apply(x)[None, None])).numpy()[0]
    result = tagger.tag(path)
    assert result.num_windows == 1
    assert result.duration == pytest.approx(3.0)
    assert result.ends[0] == pytest.approx(3.0)  # the window's end is where the audio ends
    np.testing.assert_allclose(result.scores, expected, rtol=0, atol=1e-5)


# ---- tagging --------------------------------------------------------------------------------


def test_tags_every_format_with_checkpoint_labels(tagger, audio_dir):
    paths = [audio_dir / v[0] for v in AUDIO_VARIANTS]
    results = list(tagger.tag_many(paths))
    assert [r.source for r in results] == [str(p) for p in paths]
    for r, (_, _, _, _, _, seconds) in zip(results, AUDIO_VARIANTS):
        assert r.ok, r
        assert r.duration == pytest.approx(seconds, abs=0.06)  # mp3 adds encoder padding
        assert r.window_scores.shape == (len(window_starts(round(r.duration * SR), CLIP, tagger.hop_samples)), 8)
        assert np.all((r.scores >= 0) & (r.scores <= 1))
        np.testing.assert_allclose(r.scores, r.window_scores.max(0))
        top = r.top(3)
        assert [t.score for t in top] == sorted((t.score for t in top), reverse=True)
        assert all(t.name == LABEL_NAMES[t.index] for t in top)
        assert top[0].score == pytest.approx(r.scores.max())


def test_array_input_equals_file_and_needs_rate(tagger, tmp_path):
    path = write_audio(tmp_path / "x.wav", 14.0, sr=22050, channels=2, fmt="WAV", subtype="FLOAT")
    import soundfile as sf

    data, sr = sf.read(str(path), dtype="float32")
    from_file = tagger.tag(path)
    from_array = tagger.tag(data, sample_rate=sr)
    from_tensor = tagger.tag(torch.from_numpy(data), sample_rate=sr)
    assert from_array.source == "<array>"
    np.testing.assert_allclose(from_array.window_scores, from_file.window_scores, atol=1e-6)
    np.testing.assert_allclose(from_tensor.scores, from_file.scores, atol=1e-6)
    with pytest.raises(ValueError, match="sample_rate"):
        tagger.tag(data)
    with pytest.raises(ValueError, match=r"\(channels, N\)"):  # torchaudio's layout is refused, not misread
        tagger.tag(data.T, sample_rate=sr)


def test_mean_aggregate_and_hop(checkpoint, tmp_path):
    path = write_audio(tmp_path / "l.wav", 35.0, sr=32000, fmt="WAV")
    r = Tagger.from_checkpoint(checkpoint, device="cpu", hop_seconds=5, aggregate="mean").tag(path)
    assert r.num_windows == 6
    np.testing.assert_allclose(r.starts, [0, 5, 10, 15, 20, 25])
    np.testing.assert_allclose(r.ends, [10, 15, 20, 25, 30, 35])
    np.testing.assert_allclose(r.scores, r.window_scores.mean(0), rtol=1e-6)
    r10 = Tagger.from_checkpoint(checkpoint, device="cpu").tag(path)  # default hop = 10 s
    np.testing.assert_allclose(r10.starts, [0, 10, 20, 25])
    with pytest.raises(ValueError):
        Tagger.from_checkpoint(checkpoint, device="cpu", aggregate="median")


def test_baked_equals_unbaked(checkpoint, audio_dir):
    baked = Tagger.from_checkpoint(checkpoint, device="cpu", bake=True)
    unbaked = Tagger.from_checkpoint(checkpoint, device="cpu", bake=False)
    assert not any(isinstance(m, DclsConv2d) for m in baked.model.modules())
    assert sum(isinstance(m, DclsConv2d) for m in unbaked.model.modules()) > 0
    path = audio_dir / "stereo44k.flac"
    a, b = baked.tag(path), unbaked.tag(path)
    np.testing.assert_allclose(a.window_scores, b.window_scores, rtol=0, atol=1e-5)
    assert np.abs(a.scores - 0.5).max() > 1e-3  # the scores carry information to compare


def test_embeddings_shape(tagger, audio_dir):
    r = tagger.tag(audio_dir / "stereo44k.flac", embeddings=True)
    dim = tagger.model.num_features
    assert r.window_embeddings.shape == (r.num_windows, dim)
    assert r.embedding.shape == (dim,)
    np.testing.assert_allclose(r.embedding, r.window_embeddings.mean(0), rtol=1e-5)
    assert tagger.tag(audio_dir / "stereo44k.flac").embedding is None


def test_batches_across_files_equal_one_by_one(checkpoint, audio_dir):
    paths = sorted(audio_dir.iterdir())
    one = Tagger.from_checkpoint(checkpoint, device="cpu", batch_size=1, hop_seconds=4)
    many = Tagger.from_checkpoint(checkpoint, device="cpu", batch_size=3, hop_seconds=4)
    for a, b in zip([one.tag(p) for p in paths], many.tag_many(paths)):
        assert a.source == b.source
        np.testing.assert_allclose(a.window_scores, b.window_scores, rtol=0, atol=1e-5)


def test_failures_are_reported_and_others_go_on(tagger, audio_dir, tmp_path):
    corrupt = tmp_path / "corrupt.flac"
    corrupt.write_bytes(b"fLaC" + bytes(range(256)) * 8)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    fake_m4a = tmp_path / "fake.m4a"  # ffmpeg-only container: without ffmpeg it says so, with it, it fails
    fake_m4a.write_bytes(b"\x00\x00\x00\x18ftypM4A " + bytes(512))
    good = audio_dir / "mono32k.wav"
    results = list(tagger.tag_many([good, corrupt, tmp_path / "missing.wav", empty, fake_m4a, good]))
    assert [r.ok for r in results] == [True, False, False, False, False, True]
    failures = [r for r in results if isinstance(r, TagFailure)]
    reasons = [r.reason for r in failures]
    assert "unreadable audio" in reasons[0] and "no such file" in reasons[1] and "empty file" in reasons[2]
    assert "ffmpeg" in reasons[3]
    assert all("\n" not in r and not r.startswith(str(tmp_path)) for r in reasons)  # the record names the file
    assert [r.kind for r in failures] == ["unreadable", "missing", "empty", "unreadable"]
    np.testing.assert_array_equal(results[0].scores, results[5].scores)
    with pytest.raises(AudioDecodeError, match="corrupt.flac"):
        tagger.tag(corrupt)


def test_expand_inputs(tmp_path, audio_dir):
    (tmp_path / "a" / "b").mkdir(parents=True)
    write_audio(tmp_path / "a" / "b" / "deep.flac", 2.5, fmt="FLAC")
    write_audio(tmp_path / "a" / "top.WAV", 2.5, fmt="WAV")
    (tmp_path / "a" / "notes.txt").write_text("not audio")
    listing = tmp_path / "list.txt"
    listing.write_text("# my files\na/top.WAV\n\n" + str(audio_dir / "mono32k.wav") + "\n")
    assert expand_inputs([str(tmp_path / "a")]) == [str(tmp_path / "a" / "b" / "deep.flac"),
                                                    str(tmp_path / "a" / "top.WAV")]
    assert expand_inputs(["@" + str(listing)]) == [str(tmp_path / "a" / "top.WAV"), str(audio_dir / "mono32k.wav")]


def test_a_folder_that_cannot_be_listed_is_reported_not_skipped(tmp_path):
    """Permission denied on a sub-folder; root reads everything, so as root the walk runs in a
    child process that drops to an unprivileged user."""
    import multiprocessing
    import tempfile

    with tempfile.TemporaryDirectory() as top:
        os.chmod(top, 0o755)
        root = Path(top)
        (root / "open").mkdir()
        (root / "locked").mkdir()
        for name in ("open/a.wav", "locked/b.wav", "secret.wav"):
            (root / name).write_bytes(b"RIFF")  # never decoded here
        os.chmod(root / "open" / "a.wav", 0o644)
        os.chmod(root / "locked", 0o000)
        os.chmod(root / "secret.wav", 0o000)
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_expand_unprivileged, args=(str(root), child))
        proc.start()
        found, problems = parent.recv()
        proc.join()
        os.chmod(root / "locked", 0o755)
    assert found == [str(root / "open" / "a.wav")]
    assert problems == [(str(root / "locked"), "cannot list this folder (Permission denied): its files are not tagged",
                         "unreadable"),
                        (str(root / "secret.wav"), "cannot be read (permission denied)", "unreadable")]


def _expand_unprivileged(root: str, conn) -> None:
    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)  # nobody
    problems: list = []
    found = expand_inputs([root], problems=problems)
    conn.send((found, [(p.source, p.reason, p.kind) for p in problems]))


# ---- threads and devices --------------------------------------------------------------------


def test_threads_and_devices(checkpoint, keep_threads):
    assert set_cpu_threads(1) == 1 == torch.get_num_threads()
    Tagger.from_checkpoint(checkpoint, device="cpu", threads=2)
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError):
        set_cpu_threads(0)
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")


def test_precision_choice_and_bf16_on_cpu(checkpoint, audio_dir):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int8", cpu)
    path = audio_dir / "stereo44k.flac"
    fp32 = Tagger.from_checkpoint(checkpoint, device="cpu")
    bf16 = Tagger.from_checkpoint(checkpoint, device="cpu", precision="bf16")
    assert fp32.precision == "fp32" and bf16.precision == "bf16"
    a, b = fp32.tag(path, embeddings=True), bf16.tag(path, embeddings=True)
    assert b.embedding.dtype == np.float32
    diff = np.abs(a.window_scores - b.window_scores).max()
    assert 0 < diff < 0.02, diff  # bf16 really ran, and stays close to fp32
    assert list(np.argsort(-a.scores)[:3]) == list(np.argsort(-b.scores)[:3])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(checkpoint, audio_dir):
    path = audio_dir / "stereo44k.flac"
    cpu = Tagger.from_checkpoint(checkpoint, device="cpu").tag(path)
    gpu = Tagger.from_checkpoint(checkpoint, device="cuda", precision="fp32").tag(path)
    np.testing.assert_allclose(gpu.window_scores, cpu.window_scores, rtol=0, atol=2e-3)
    bf16 = Tagger.from_checkpoint(checkpoint, device="cuda").tag(path)  # auto: bf16 on CUDA
    np.testing.assert_allclose(bf16.window_scores, cpu.window_scores, rtol=0, atol=2e-2)


# ---- safe loading ---------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_pickle_checkpoint_is_refused_without_running_code(tmp_path, suffix):
    target = tmp_path / "pwned"
    evil = tmp_path / f"evil{suffix}"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(str(target))}, evil)
    with pytest.raises(ValueError, match="not a safetensors file"):
        Tagger.from_checkpoint(evil, device="cpu")
    assert not target.exists()
    # The file does carry code: plain unpickling runs it (read as bytes, so the name does not
    # steer torch.load to its safetensors reader).
    with open(evil, "rb") as f:
        blob = f.read()
    import io

    with pytest.raises(pickle.UnpicklingError):  # the weights-only loader refuses it too
        torch.load(io.BytesIO(blob), weights_only=True)
    assert not target.exists()
    torch.load(io.BytesIO(blob), weights_only=False)
    assert target.exists()


@pytest.mark.parametrize("name", [v[0] for v in AUDIO_VARIANTS])
def test_shard_features_equal_tagger_features(tagger, audio_dir, name):
    """The shard builder's stored log-mel of a file (float16 encoding, the more precise one) equals
    the tagger's first window of the same file cast to float16: training and tagging see the same
    features. (The 12 s file's shard is its first 10 s, which is the tagger's first window.)"""
    from audioset_dcls.audio.containers import ClipRef
    from audioset_dcls.shards.format import LogmelEncoding, decode_sample
    from audioset_dcls.shards.worker import ClipTask, process_clip

    path = audio_dir / name
    result = process_clip(ClipTask(key="clip", ref=ClipRef.file(path), labels=(1,), ytid="x", start=0.0, end=10.0),
                          tagger.features, LogmelEncoding("float16"))
    assert result.kind == "ok", result.reason
    stored = decode_sample(result.sample).logmel  # (128, 1001) float32 of float16 values
    _, first = next(iter(tagger.windows(path)))
    mine = tagger.windows_logmel(torch.from_numpy(first[None]))[0].numpy().astype(np.float16)
    assert np.array_equal(stored.astype(np.float16), stored) and stored.shape == mine.shape
    # Bit-identical here; the tolerance allows one float16 step (0.06 dB at |x| ~ 100), in case
    # a batched STFT rounds a float32 value across a float16 boundary on another machine.
    np.testing.assert_allclose(stored.astype(np.float32), mine.astype(np.float32), rtol=1e-3, atol=1e-3)
