"""The shard builder end to end on real files: formats, broken clips, round trip, resume, --part."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from audioset_dcls import features
from audioset_dcls.labels import read_label_set, read_segment_files
from audioset_dcls.data import build_eval_loader, open_shard_set
from audioset_dcls.features import Normalization
from audioset_dcls.shards.format import LogmelEncoding, decode_sample, hash_ids, list_shards, read_manifest, sha256_file
from audioset_dcls.shards.build import BuildOptions, build_shards
from audioset_dcls.shards.cli import main
from audioset_dcls.shards.plan import order_segments, part_shard_range
from helpers_shards import kill_build_after_first_shard

CLASSES = [("/m/09x0r", "Speech"), ("/m/05zppz", "Male speech, man speaking"), ("/m/04rlf", "Music"),
           ("/m/068hy", "Domestic animals, pets"), ("/m/0jbk", "Animal")]

# ytid -> (file name or None, format, subtype, sample rate, channels, seconds, start, mids)
GOOD = {
    "-aaaaaaaaaa": ("Y-aaaaaaaaaa.flac", "FLAC", "PCM_16", 44100, 2, 12.0, 30.0, ["/m/09x0r", "/m/05zppz"]),
    "bbbbbbbbbbb": ("bbbbbbbbbbb_30.wav", "WAV", "PCM_16", 16000, 1, 8.0, 30.0, ["/m/04rlf"]),
    "ccccccccc-c": ("deep/er/ccccccccc-c_0_10000.ogg", "OGG", "VORBIS", 44100, 2, 10.0, 0.0,
                    ["/m/068hy", "/m/0jbk", "/m/09x0r"]),
    "ddddddddddd": ("sub/ddddddddddd.wav", "WAV", "FLOAT", 44100, 2, 8.0, 20.0, ["/m/0jbk"]),
    "eeeeeeeeeee": ("Yeeeeeeeeeee_40.000_50.000.flac", "FLAC", "PCM_24", 16000, 1, 12.0, 40.0, ["/m/04rlf", "/m/09x0r"]),
    "fffffffffff": ("fffffffffff.ogg", "OGG", "VORBIS", 16000, 1, 10.0, 0.0, ["/m/05zppz"]),
}
# ytid -> (what to put in the folder, expected skip kind)
BAD = {
    "ggggggggggg": ("corrupt", "unreadable"),
    "hhhhhhhhhhh": ("empty", "empty"),
    "iiiiiiiiiii": ("missing", "missing"),
    "jjjjjjjjjjj": ("silent", "silent"),
    "kkkkkkkkkkk": ("m4a", "unreadable"),
}
SHARD_SIZE = 3
REPO_ROOT = Path(__file__).resolve().parents[1]


def _write_dataset(root: Path) -> dict:
    rng = np.random.default_rng(0)
    audio = root / "audio"
    rows = []
    for ytid, (name, fmt, subtype, sr, ch, seconds, start, mids) in GOOD.items():
        n = int(seconds * sr)
        t = np.arange(n) / sr
        x = 0.2 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t) + 0.05 * rng.standard_normal(n)
        data = np.stack([x, 0.5 * x[::-1]], axis=1) if ch == 2 else x
        path = audio / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, data.astype(np.float32), sr, format=fmt, subtype=subtype)
        rows.append((ytid, start, start + 10.0, mids))
    for ytid, (what, _) in BAD.items():
        if what == "corrupt":
            (audio / f"Y{ytid}.flac").write_bytes(b"fLaC" + rng.bytes(3000))
        elif what == "empty":
            (audio / f"{ytid}.wav").write_bytes(b"")
        elif what == "silent":
            sf.write(audio / f"{ytid}.wav", np.zeros(16000, np.float32), 16000)
        elif what == "m4a":  # needs ffmpeg, which this machine may lack: unreadable either way
            (audio / f"{ytid}.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + rng.bytes(200))
        rows.append((ytid, 0.0, 10.0, ["/m/09x0r"]))
    (audio / "notes.txt").write_text("not audio")
    labels = root / "class_labels_indices.csv"
    labels.write_text("index,mid,display_name\n" + "".join(f'{i},{m},"{n}"\n' for i, (m, n) in enumerate(CLASSES)))
    # first CSV in the official layout, second one re-saved (as users have both)
    official = root / "balanced_train_segments.csv"
    with open(official, "w") as f:
        f.write("# Segments csv created Sun Mar  5 10:54:31 2017\n# num_ytids=6, num_segs=6, "
                "num_unique_labels=5, num_positive_labels=9\n# YTID, start_seconds, end_seconds, positive_labels\n")
        for ytid, start, end, mids in rows[:6]:
            f.write(f'{ytid}, {start:.3f}, {end:.3f}, "{",".join(mids)}"\n')
    resaved = root / "unbalanced_train_segments.csv"
    with open(resaved, "w") as f:
        f.write("# YTID, start_seconds, end_seconds, positive_labels\n")
        for ytid, start, end, mids in rows[6:]:
            lab = f'"{",".join(mids)}"' if len(mids) > 1 else mids[0]
            f.write(f"{ytid},{int(start)},{int(end)},{lab}\n")
        f.write(f"{rows[0][0]},{int(rows[0][1])},{int(rows[0][2])},/m/09x0r\n")  # duplicate row
    return {"root": root, "audio": audio, "labels": labels, "segments": (official, resaved)}


def _options(ds: dict, out: Path, **kw) -> BuildOptions:
    base = dict(segments=ds["segments"], labels=ds["labels"], audio_dir=ds["audio"], out=out, split="train",
                workers=2, shard_size=SHARD_SIZE, seed=7, progress=False)
    base.update(kw)
    return BuildOptions(**base)


def _read_all(out: Path) -> dict[str, tuple]:
    """key -> (shard name, ShardSample), through webdataset from the manifest's shard list."""
    samples = {}
    for shard in list_shards(out):
        for raw in wds.WebDataset(str(shard), shardshuffle=False):
            s = decode_sample(raw)
            assert s.key not in samples, f"duplicate sample {s.key}"
            samples[s.key] = (shard.name, s)
    return samples


def _shard_digests(out: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(out.glob("*.tar"))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    return _write_dataset(tmp_path_factory.mktemp("audioset"))


@pytest.fixture(scope="module")
def single_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "train"
    result = build_shards(_options(dataset, out))
    return out, result


def test_round_trip_every_value(dataset, single_run):
    out, result = single_run
    manifest = read_manifest(out)
    samples = _read_all(out)
    good_keys = {f"{y}_{int(GOOD[y][6] * 1000)}" for y in GOOD}
    assert set(samples) == good_keys  # no bad clip written, zero-filled or otherwise
    labels = read_label_set(dataset["labels"])
    segs = read_segment_files(dataset["segments"], labels)
    order = [seg.key for seg in order_segments(segs.segments, seed=7, shuffle=True)]
    all_values = []
    for ytid, (name, fmt, subtype, sr, ch, seconds, start, mids) in GOOD.items():
        shard, s = samples[f"{ytid}_{int(start * 1000)}"]
        path = dataset["audio"] / name
        ref, duration = features.logmel_from_file(path)
        assert s.logmel.dtype == np.float32 and s.logmel.shape == (128, 1001)
        stored = s.logmel
        # equal to the inference front end, to the default (uint8) encoding's 0.625 dB steps
        assert np.abs(stored - ref).max() <= 0.3125 + 1e-4, name
        assert s.labels == sorted(labels.index[m] for m in mids)
        assert s.meta["ytid"] == ytid and s.meta["start"] == start and s.meta["end"] == start + 10
        assert s.meta["source"] == str(path)
        assert s.meta["duration"] == pytest.approx(seconds, abs=1e-3) == pytest.approx(duration, abs=1e-5)
        all_values.append(stored.astype(np.float64))
    values = np.concatenate([v.ravel() for v in all_values])

    # manifest: counts, hashes, statistics, labels, ids, skipped clips
    assert manifest["num_samples"] == len(GOOD) == sum(s["count"] for s in manifest["shards"])
    # 12 rows, duplicate dropped -> 11 -> 4 slots of 3; a slot of only bad clips gets no tar
    slots = [order[i * SHARD_SIZE : (i + 1) * SHARD_SIZE] for i in range(4)]
    non_empty = [f"train-{i:06d}.tar" for i, slot in enumerate(slots) if set(slot) & good_keys]
    assert [s["name"] for s in manifest["shards"]] == non_empty
    assert sorted(p.name for p in out.glob("*.tar")) == non_empty
    assert manifest["build"]["num_slots"] == 4
    assert manifest["build"]["empty_slots"] == sorted(set(f"train-{i:06d}.tar" for i in range(4)) - set(non_empty))
    for entry in manifest["shards"]:
        tar = out / entry["name"]
        assert entry["sha256"] == sha256_file(tar) and entry["bytes"] == tar.stat().st_size
        assert entry["count"] == sum(1 for sh, _ in samples.values() if sh == entry["name"])
    assert json.loads((out / "sizes.json").read_text()) == {s["name"]: s["count"] for s in manifest["shards"]}
    assert manifest["normalization"]["mean"] == pytest.approx(values.mean(), abs=1e-9)
    assert manifest["normalization"]["std"] == pytest.approx(values.std(), rel=1e-9)
    assert features.Normalization.from_dict(manifest["normalization"]).std > 0
    assert manifest["labels"]["mids"] == [m for m, _ in CLASSES]
    assert manifest["labels"]["names"][1] == "Male speech, man speaking"
    assert manifest["feature_config"] == features.FeatureConfig().to_dict()
    assert manifest["encoding"] == LogmelEncoding("uint8").to_dict() and manifest["clipped_values"] == 0
    assert manifest["clip_ids_sha256"] == hash_ids(good_keys)
    assert manifest["durations"]["padded"] == 2 and manifest["durations"]["trimmed"] == 2
    kinds = {s["ytid"]: s["kind"] for s in manifest["skipped"]}
    assert kinds == {**{y: k for y, (_, k) in BAD.items()}, "-aaaaaaaaaa": "duplicate"}
    m4a = next(s for s in manifest["skipped"] if s["ytid"] == "kkkkkkkkkkk")
    assert m4a["path"].endswith("kkkkkkkkkkk.m4a") and "kkkkkkkkkkk.m4a" in m4a["reason"]
    if shutil.which("ffmpeg") is None:
        assert "ffmpeg" in m4a["reason"]
    assert all("\n" not in s["reason"] for s in manifest["skipped"])
    with open(out / "skipped.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["ytid"]: r["kind"] for r in rows} == kinds
    missing = next(r for r in rows if r["kind"] == "missing")
    assert missing["segment_row"].endswith("unbalanced_train_segments.csv:4") and missing["audio_path"] == ""

    # shuffled with the seed, then cut into consecutive shards; skipped clips leave gaps
    assert order != [seg.key for seg in segs]
    for entry in manifest["shards"]:
        keys = [k for k, (sh, _) in samples.items() if sh == entry["name"]]
        slot = slots[int(entry["name"][len("train-") : -len(".tar")])]
        assert keys == [k for k in slot if k in good_keys]
    assert result.clips_processed == 11 and result.clips_written == 6
    assert not list(out.glob("*.tmp"))


def test_resume_after_kill_keeps_finished_shards_and_loses_nothing(dataset, single_run, tmp_path):
    ref_out, _ = single_run
    out = tmp_path / "train"
    shutil.copytree(ref_out, out)
    before = _shard_digests(ref_out)
    names = sorted(before)
    # killed while writing shard 1: partial .tmp, no tar, no record
    tar1 = (out / names[1]).read_bytes()
    (out / names[1]).unlink()
    (out / "_build" / names[1].replace(".tar", ".json")).unlink()
    (out / (names[1] + ".tmp")).write_bytes(tar1[: len(tar1) // 2])
    # killed between renaming shard 3 and writing its record
    (out / "_build" / names[3].replace(".tar", ".json")).unlink()
    # shard 0 damaged on disk after it was recorded (same size, other bytes)
    damaged = bytearray((out / names[0]).read_bytes())
    damaged[5000] ^= 0xFF
    (out / names[0]).write_bytes(bytes(damaged))
    (out / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError):
        read_manifest(out)

    result = build_shards(_options(dataset, out, workers=1))
    assert sorted(result.shards_written) == [names[0], names[1], names[3]]
    assert result.shards_reused == [names[2]]
    assert _shard_digests(out) == before  # rebuilt shards are byte-identical
    assert not list(out.glob("*.tmp"))
    assert set(_read_all(out)) == set(_read_all(ref_out))
    assert read_manifest(out) == read_manifest(ref_out)

    again = build_shards(_options(dataset, out, workers=1))  # nothing left to do
    assert again.shards_written == [] and again.clips_processed == 0 and again.manifest is not None


def test_parts_together_equal_one_run(dataset, single_run, tmp_path, capsys):
    ref_out, _ = single_run
    ref_manifest = read_manifest(ref_out)
    assert [list(part_shard_range(4, i, 3)) for i in range(3)] == [[0], [1], [2, 3]]
    # jobs sharing one output folder: the one that completes the set writes the manifest
    shared = tmp_path / "shared"
    for i in (2, 0, 1):
        result = build_shards(_options(dataset, shared, part=(i, 3), workers=1))
        if i != 1:
            assert result.manifest is None and result.shards_missing
            assert not (shared / "manifest.json").exists()
    assert result.manifest is not None
    assert _shard_digests(shared) == _shard_digests(ref_out)
    assert read_manifest(shared) == ref_manifest

    # jobs with their own folders: copy everything into one, then --merge
    merged = tmp_path / "merged"
    for i in range(3):
        part_out = tmp_path / f"part{i}"
        build_shards(_options(dataset, part_out, part=(i, 3), workers=0))
        shutil.copytree(part_out, merged, dirs_exist_ok=True)
        if i == 1:
            capsys.readouterr()
            assert main(["--merge", "--out", str(merged)]) == 2
            err = capsys.readouterr().err.strip()
            assert "\n" not in err and "not built yet" in err and "train-000002.tar" in err
    assert main(["--merge", "--out", str(merged)]) == 0
    assert _shard_digests(merged) == _shard_digests(ref_out)
    assert read_manifest(merged) == ref_manifest
    assert [p.name for p in list_shards(merged)] == [s["name"] for s in ref_manifest["shards"]]
    # a shard damaged after it was recorded is caught by the merge (sha256), not listed
    name = ref_manifest["shards"][0]["name"]
    damaged = bytearray((merged / name).read_bytes())
    damaged[3000] ^= 0xFF
    (merged / name).write_bytes(bytes(damaged))
    capsys.readouterr()
    assert main(["--merge", "--out", str(merged)]) == 2
    err = capsys.readouterr().err
    assert f"{name}: sha256 differs" in err and f"not built yet ({name})" in err
    with pytest.raises(FileNotFoundError):  # the stale manifest is gone
        read_manifest(merged)


def test_float16_sets_and_sets_built_before_encodings(dataset, single_run, tmp_path, capsys):
    """--encoding float16 stores float16 values. A float16 set built before encodings existed (no
    encoding in its plan, records or manifest) still reads, resumes as float16, and is refused
    (one line) when resumed with the default uint8: a set never mixes encodings."""
    out = tmp_path / "f16"
    argv = ["--segments", *map(str, dataset["segments"]), "--labels", str(dataset["labels"]), "--audio-dir",
            str(dataset["audio"]), "--out", str(out), "--split", "train", "--seed", "7", "--shard-size", "3",
            "--workers", "0", "--no-progress"]
    assert main(argv + ["--encoding", "float16"]) == 0
    assert "stored as float16: " in capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest["encoding"] == {"name": "float16", "member": "logmel.npy"}
    u8 = _read_all(single_run[0])
    f16 = _read_all(out)
    assert set(f16) == set(u8)
    for key, (_, s) in f16.items():
        ytid = s.meta["ytid"]
        ref, _ = features.logmel_from_file(dataset["audio"] / GOOD[ytid][0])
        assert s.logmel.dtype == np.float32 and np.array_equal(s.logmel.astype(np.float16), s.logmel)
        assert np.all(np.abs(s.logmel - ref) <= np.abs(ref) * 2.0**-10 + 1e-3), key  # float16 precision
        assert np.abs(s.logmel - u8[key][1].logmel).max() <= 0.3125 + 0.05
        assert s.labels == u8[key][1].labels
    assert sum(s["bytes"] for s in read_manifest(single_run[0])["shards"]) < 0.6 * sum(
        s["bytes"] for s in manifest["shards"])

    # The same set as the builder wrote it before encodings existed.
    def strip(path, *keys):
        d = json.loads(path.read_text())
        for k in keys:
            d.pop(k)
        path.write_text(json.dumps(d))

    strip(out / "_build" / "plan.json", "encoding")
    for record in (out / "_build").glob("train-*.json"):
        strip(record, "clipped")
    strip(out / "manifest.json", "encoding", "clipped_values")
    shards = open_shard_set(out, "data.eval")
    keys = [k for b in build_eval_loader(shards, 4, 0, Normalization(), rank=0, world_size=1) for k in b["keys"]]
    assert sorted(keys) == sorted(f16)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "stored as float16, not uint8; resume it with --encoding float16" in err and "\n" not in err
    name = manifest["shards"][0]["name"]
    (out / name).unlink()  # something left to build
    assert main(argv + ["--encoding", "float16"]) == 0
    assert read_manifest(out) == manifest and sha256_file(out / name) == manifest["shards"][0]["sha256"]


def test_cli_builds_with_a_pattern_and_reports(dataset, tmp_path, capsys):
    # A flat folder named by one pattern: only the pattern is used, no search.
    flat = tmp_path / "flat"
    flat.mkdir()
    src = dataset["audio"]
    shutil.copy(src / GOOD["-aaaaaaaaaa"][0], flat / "-aaaaaaaaaa_30000.flac")
    shutil.copy(src / GOOD["fffffffffff"][0], flat / "fffffffffff_0.flac")  # ogg data, wrong suffix: still decodes
    seg = tmp_path / "seg.csv"
    seg.write_text("-aaaaaaaaaa,30,40,/m/09x0r\nfffffffffff,0,10,/m/04rlf\nzzzzzzzzzzz,0,10,/m/04rlf\n")
    out = tmp_path / "eval"
    code = main(["--segments", str(seg), "--labels", str(dataset["labels"]), "--audio-dir", str(flat),
                 "--out", str(out), "--split", "eval", "--workers", "0", "--no-progress", "--no-shuffle",
                 "--pattern", "{ytid}_{start_ms}.flac"])
    text = capsys.readouterr().out
    assert code == 0
    assert "2 of 3 clips written" in text and "left out 1 clip(s): 1 missing" in text and "skipped.csv" in text
    m = read_manifest(out)
    assert [s["name"] for s in m["shards"]] == ["eval-000000.tar"] and m["num_samples"] == 2
    assert m["skipped"][0]["path"] == str(flat / "zzzzzzzzzzz_0.flac")
    assert list(_read_all(out)) == ["-aaaaaaaaaa_30000", "fffffffffff_0"]  # CSV order kept


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--part", "3/3"], "0 <= i < N"),
        (["--shard-size", "0"], "--shard-size"),
        (["--split", "a.b"], "--split"),
        (["--pattern", "{id}.wav"], "fields: ytid"),
    ],
)
def test_cli_argument_errors_are_one_line(dataset, tmp_path, capsys, extra, words):
    argv = ["--segments", str(dataset["segments"][0]), "--labels", str(dataset["labels"]),
            "--audio-dir", str(dataset["audio"]), "--out", str(tmp_path / "o"), "--split", "train", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_other_build_in_the_folder_and_bad_labels_are_refused(dataset, single_run, tmp_path, capsys):
    ref_out, _ = single_run
    out = tmp_path / "copy"
    shutil.copytree(ref_out, out)
    base = ["--segments", *map(str, dataset["segments"]), "--labels", str(dataset["labels"]),
            "--audio-dir", str(dataset["audio"]), "--out", str(out), "--split", "train", "--seed", "7"]
    assert main(base + ["--shard-size", "5"]) == 2
    assert "different shard_size (was 3, now 5)" in capsys.readouterr().err
    assert main(base + ["--shard-size", "3", "--seed", "8", "--no-progress"]) == 2
    assert "different seed" in capsys.readouterr().err
    assert main(base + ["--shard-size", "3", "--encoding", "float16", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "stored as uint8, not float16; resume it with --encoding uint8" in err and "\n" not in err
    bad = tmp_path / "bad.csv"
    bad.write_text("# YTID, start_seconds, end_seconds, positive_labels\nabc,0,10,/m/nope\n")
    argv = ["--segments", str(bad), "--labels", str(dataset["labels"]), "--audio-dir", str(dataset["audio"]),
            "--out", str(tmp_path / "o2"), "--split", "x"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"{bad}:2:" in err and "/m/nope" in err and "\n" not in err
    assert main(argv + ["--unknown-mids", "drop", "--no-progress"]) == 2  # nothing left to build
    assert "no segments" in capsys.readouterr().err


def test_cli_killed_mid_run_resumes(dataset, tmp_path):
    """SIGKILL the real command after its first shard, re-run it, and lose or repeat nothing."""
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "preprocessing.build_shards", "--segments", *map(str, dataset["segments"]),
            "--labels", str(dataset["labels"]), "--audio-dir", str(dataset["audio"]), "--out", str(out),
            "--split", "train", "--shard-size", "1", "--workers", "1", "--seed", "7", "--no-progress"]
    kill_build_after_first_shard(argv, out)
    finished = len(list((out / "_build").glob("train-*.json")))
    assert 1 <= finished < 11

    result = build_shards(_options(dataset, out, shard_size=1, workers=1))
    assert len(result.shards_reused) == finished  # records are atomic: each one names a good shard
    assert not list(out.glob("*.tmp")) and not list((out / "_build").glob("*.tmp"))
    samples = _read_all(out)  # raises on a duplicate
    assert set(samples) == {f"{y}_{int(GOOD[y][6] * 1000)}" for y in GOOD}
    manifest = read_manifest(out)
    assert manifest["num_samples"] == len(GOOD) and manifest["build"]["num_slots"] == 11
    assert {s["ytid"] for s in manifest["skipped"]} == set(BAD) | {"-aaaaaaaaaa"}


def test_keep_freed_memory_stops_per_buffer_page_faults():
    """The builder's allocator setting: the buffers of a clip (sizes as in process_clip), all
    alive at once and then freed, must not be faulted in afresh for every clip (with glibc's
    defaults the freed heap top is trimmed back to the kernel each time: ~4,000 faults here)."""
    code = """
import resource, sys
import numpy as np
from audioset_dcls.shards.worker import keep_freed_memory
MB = 1 << 20
def clip():
    bufs = [np.ones(int(mb * MB), np.uint8) for mb in (3.5, 1.7, 1.3, 4.1, 1.8, 1.8, 1.8, 0.5)]
    del bufs
def faults():
    clip(); clip()  # warm up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        clip()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
default = faults()
assert keep_freed_memory()
tuned = faults()
print(default, tuned)
assert default > 1000 and tuned < 50, (default, tuned)
"""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc malloc settings are Linux-only")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr


def test_audioset_segments_default_to_the_bundled_class_list(dataset, tmp_path, capsys):
    """Without --labels, AudioSet segments get AudioSet's 527 classes that ship with the package."""
    out = tmp_path / "bundled"
    argv = ["--segments", str(dataset["segments"][0]), "--audio-dir", str(dataset["audio"]), "--out", str(out),
            "--split", "eval", "--workers", "0", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    manifest = read_manifest(out)
    names = manifest["labels"]["names"]
    assert len(names) == 527 and names[0] == "Speech" and manifest["labels"]["mids"][137] == "/m/04rlf"
    by_ytid = {s.meta["ytid"]: s for _, s in _read_all(out).values()}
    assert [names[i] for i in by_ytid["bbbbbbbbbbb"].labels] == ["Music"]
    assert sorted(names[i] for i in by_ytid["-aaaaaaaaaa"].labels) == ["Male speech, man speaking", "Speech"]
