"""Shards from AudioSet containers (PANNs HDF5, Hugging Face parquet, audio WebDataset tars),
written here with h5py, pyarrow and tarfile, against a folder of the same audio."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

h5py = pytest.importorskip("h5py")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from audioset_dcls.audio import containers  # noqa: E402
from audioset_dcls.audio.containers import ClipRef, hdf5_clip_ids, read_clip, read_clip_mono  # noqa: E402
from audioset_dcls.audio.decode import AudioDecodeError, downmix  # noqa: E402
from audioset_dcls.data import build_eval_loader, open_shard_set  # noqa: E402
from audioset_dcls.features import Normalization  # noqa: E402
from audioset_dcls.labels import audioset_label_set, read_segments  # noqa: E402
from audioset_dcls.shards.build import BuildOptions, build_shards, format_summary  # noqa: E402
from audioset_dcls.shards.cli import main  # noqa: E402
from audioset_dcls.shards.format import read_manifest, sha256_file  # noqa: E402
from helpers_shards import kill_build_after_first_shard

REPO_ROOT = Path(__file__).resolve().parents[1]
LABELS = audioset_label_set()
MIDS = ["/m/09x0r", "/m/04rlf", "/m/0jbk", "/m/068hy"]  # Speech, Music, Animal, Domestic animals
SECONDS = 10.0
SR = 32000

# ytid -> (rate, channels, subtype, mids). The 32 kHz mono 16-bit clips are also in the HDF5 files.
CLIPS = {
    "aaaaaaaaaaa": (32000, 1, "PCM_16", ["/m/09x0r"]),
    "-bbbbbbbbbb": (32000, 1, "PCM_16", ["/m/04rlf", "/m/09x0r"]),
    "ccccccccc_c": (32000, 1, "PCM_16", ["/m/0jbk"]),
    "ddddddddddd": (32000, 1, "PCM_16", ["/m/068hy", "/m/0jbk"]),
    "eeeeeeeeeee": (48000, 2, "PCM_24", ["/m/04rlf"]),  # like most of the Hugging Face copy
    "fffffffffff": (44100, 2, "PCM_16", ["/m/09x0r"]),
    "ggggggggggg": (16000, 1, "PCM_16", ["/m/0jbk"]),  # a 16 kHz copy: upsampled
}
H5_IDS = [y for y, c in CLIPS.items() if c[0] == SR]


def _ints(ytid: str, rate: int, channels: int) -> np.ndarray:
    """10 s of a tone + noise as int16, (N,) or (N, channels)."""
    rng = np.random.default_rng(zlib.crc32(ytid.encode()))
    n = int(SECONDS * rate)
    t = np.arange(n) / rate
    x = 0.2 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t) + 0.05 * rng.standard_normal(n)
    x = np.stack([x, 0.5 * x[::-1]], axis=1) if channels == 2 else x
    return np.round(x * 32767).astype(np.int16)


def _flac(data: np.ndarray, rate: int, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate, format="FLAC", subtype=subtype)
    return buf.getvalue()


def _write_h5(path: Path, names: list[bytes], waves: np.ndarray, targets: np.ndarray, rate: int | None = SR) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("audio_name", data=np.array(names, dtype="S20"))
        f.create_dataset("waveform", data=waves)
        f.create_dataset("target", data=targets)
        if rate is not None:
            f.attrs.create("sample_rate", data=rate, dtype=np.int32)
    return path


def _target(mids: list[str]) -> np.ndarray:
    t = np.zeros(len(LABELS), bool)
    t[LABELS.indices(mids)] = True
    return t


def _write_parquet(path: Path, rows: list[tuple[str, bytes | None, list[str]]], group: int) -> Path:
    table = pa.table({
        "video_id": [r[0] for r in rows],
        "audio": [None if r[1] is None else {"bytes": r[1], "path": f"{r[0]}.flac"} for r in rows],
        "labels": [r[2] for r in rows],
        "human_labels": [[LABELS.names[LABELS.index[m]] if m in LABELS.index else m for m in r[2]] for r in rows],
    })
    pq.write_table(table, path, row_group_size=group)
    return path


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                _add(tar, f"{key}.{ext}", data)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """The same audio as a folder + CSV, as HDF5 (int16 and float32), parquet and tars."""
    root = tmp_path_factory.mktemp("containers")
    folder, folder32 = root / "audio", root / "audio32"
    folder.mkdir(), folder32.mkdir()
    flacs, ints = {}, {}
    for ytid, (rate, ch, subtype, mids) in CLIPS.items():
        ints[ytid] = _ints(ytid, rate, ch)
        flacs[ytid] = _flac(ints[ytid], rate, subtype)
        (folder / f"Y{ytid}.flac").write_bytes(flacs[ytid])
        if ytid in H5_IDS:
            (folder32 / f"Y{ytid}.flac").write_bytes(flacs[ytid])

    def csv(path: Path, ytids, start=0.0) -> Path:
        path.write_text("# YTID, start_seconds, end_seconds, positive_labels\n" + "".join(
            f'{y}, {start:.3f}, {start + 10:.3f}, "{",".join(CLIPS[y][3])}"\n' for y in ytids))
        return path

    waves = np.stack([ints[y] for y in H5_IDS])  # (4, 320000) int16
    targets = np.stack([_target(CLIPS[y][3]) for y in H5_IDS])
    names = [f"Y{y}.wav".encode() for y in H5_IDS]
    (root / "h5").mkdir()
    return {
        "root": root, "folder": folder, "folder32": folder32, "flacs": flacs, "ints": ints,
        "csv": csv(root / "all.csv", CLIPS), "csv32": csv(root / "h5.csv", H5_IDS),
        "csv32_at30": csv(root / "h5_at30.csv", H5_IDS, start=30.0),
        "h5_int16": _write_h5(root / "h5" / "balanced_train.h5", names, waves, targets),
        "h5_float32": _write_h5(root / "h5" / "old_float32.h5", names,
                                waves.astype(np.float32) / np.float32(32768), targets),
        "parquet1": _write_parquet(root / "rg1.parquet", [(y, flacs[y], CLIPS[y][3]) for y in CLIPS], 1),
        "parquet3": _write_parquet(root / "rg3.parquet", [(y, flacs[y], CLIPS[y][3]) for y in CLIPS], 3),
        "tar": _write_tar(root / "audio-000000.tar", [
            (f"Y{y}", {"flac": flacs[y], "json": json.dumps({"labels": CLIPS[y][3]}).encode()}) for y in CLIPS]),
    }


def _opts(out: Path, **kw) -> BuildOptions:
    base = dict(out=out, split="train", workers=2, shard_size=2, seed=3, progress=False)
    base.update(kw)
    return BuildOptions(**base)


def _tar_samples(out: Path) -> dict[str, list[tuple[str, dict[str, bytes]]]]:
    """shard name -> [(key, {ext: bytes})] in tar order."""
    shards = {}
    for p in sorted(out.glob("train-*.tar")):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(p) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
        shards[p.name] = list(samples.items())
    return shards


def _content(out: Path) -> dict[str, tuple[list[int], bytes]]:
    """key -> (labels, encoded log-mel bytes)."""
    return {k: (json.loads(m["json"])["labels"], m["logmel.u8.zst"])
            for samples in _tar_samples(out).values() for k, m in samples}


def _same_shards(a: Path, b: Path) -> None:
    """Same shards, same keys in the same order, same labels and log-mel bytes."""
    sa, sb = _tar_samples(a), _tar_samples(b)
    assert list(sa) == list(sb)
    for name in sa:
        assert [k for k, _ in sa[name]] == [k for k, _ in sb[name]], name
    assert _content(a) == _content(b)


@pytest.fixture(scope="module")
def folder_builds(data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folder_builds")
    outs = {"all": root / "all", "h5": root / "h5", "h5_at30": root / "h5_at30"}
    build_shards(_opts(outs["all"], segments=(data["csv"],), audio_dir=data["folder"]))
    build_shards(_opts(outs["h5"], segments=(data["csv32"],), audio_dir=data["folder32"]))
    build_shards(_opts(outs["h5_at30"], segments=(data["csv32_at30"],), audio_dir=data["folder32"]))
    return outs


# ------------------------------------------------------------------------ the central test

@pytest.mark.parametrize("source", ["h5_int16", "h5_float32"])
def test_hdf5_gives_the_folder_shards(data, folder_builds, source, tmp_path):
    out = tmp_path / "out"
    result = build_shards(_opts(out, hdf5=(str(data[source]),)))
    _same_shards(out, folder_builds["h5"])
    assert result.upsampled == {}
    m = read_manifest(out)
    assert m["num_samples"] == len(H5_IDS) and m["num_skipped"] == 0


@pytest.mark.parametrize("source", ["parquet1", "tar"])
def test_parquet_and_tars_give_the_folder_shards(data, folder_builds, source, tmp_path):
    out = tmp_path / "out"
    kw = {"wds_audio": (str(data["tar"]),)} if source == "tar" else {"parquet": (str(data[source]),)}
    result = build_shards(_opts(out, **kw))
    _same_shards(out, folder_builds["all"])
    assert result.upsampled == {16000: 1}  # ggggggggggg
    assert "upsampled 1 clip(s) (1 from 16 kHz)" in format_summary(result)


def test_parquet_row_groups_stay_together_with_the_same_clips(data, folder_builds, tmp_path):
    out = tmp_path / "out"
    build_shards(_opts(out, parquet=(str(data["parquet3"]),), shard_size=3))
    assert _content(out) == _content(folder_builds["all"])  # the same samples, in another order
    order = [k.rsplit("_", 1)[0] for s in _tar_samples(out).values() for k, _ in s]
    groups = [list(CLIPS)[i: i + 3] for i in range(0, len(CLIPS), 3)]  # the file's row groups
    group_of = {y: i for i, g in enumerate(groups) for y in g}
    runs = [group_of[y] for i, y in enumerate(order) if i == 0 or group_of[y] != group_of[order[i - 1]]]
    assert sorted(runs) == [0, 1, 2]  # each row group's clips are consecutive in the order


def test_hdf5_with_segments_takes_their_times_and_reports_coverage(data, folder_builds, tmp_path):
    """--segments with a container: the listed segments' keys (ytid_30000), as a folder build
    gives them; listed segments the containers lack are missing clips."""
    out = tmp_path / "out"
    listed = tmp_path / "eval.csv"
    listed.write_text(data["csv32_at30"].read_text() + 'zzzzzzzzzzz, 30.000, 40.000, "/m/09x0r"\n')
    result = build_shards(_opts(out, hdf5=(str(data["h5_int16"]),), segments=(data["csv32_at30"],)))
    _same_shards(out, folder_builds["h5_at30"])
    # what training and `evaluate --segments` read: the loader's keys are the segment list's keys
    shards = open_shard_set(out, "data.eval")
    keys = [k for b in build_eval_loader(shards, 2, 0, Normalization(), rank=0, world_size=1) for k in b["keys"]]
    assert sorted(keys) == sorted(seg.key for seg in read_segments(data["csv32_at30"]))
    assert all(k.endswith("_30000") for k in keys)
    result = build_shards(_opts(tmp_path / "out2", hdf5=(str(data["h5_int16"]),), segments=(listed,)))
    m = read_manifest(tmp_path / "out2")
    assert [(s["kind"], s["ytid"]) for s in m["skipped"]] == [("missing", "zzzzzzzzzzz")]
    assert result.unlisted == 0
    two = tmp_path / "two.csv"
    two.write_text("".join(data["csv32_at30"].read_text().splitlines(keepends=True)[1:3]))
    result = build_shards(_opts(tmp_path / "out3", hdf5=(str(data["h5_int16"]),), segments=(two,)))
    assert result.unlisted == 2 and result.clips_written == 2
    assert "2 clip(s) of the containers are not in --segments and were left out" in format_summary(result)


# ------------------------------------------------------------------------ broken rows

def test_broken_hdf5_rows_are_skipped_with_their_kind(data, tmp_path):
    good = data["ints"]["aaaaaaaaaaa"]
    names = [b"Yaaaaaaaaaaa.wav", b"", b"Yhhhhhhhhhhh.wav", b"Yiiiiiiiiiii.wav"]
    waves = np.stack([good, good, np.zeros_like(good), good])
    targets = np.stack([_target(["/m/09x0r"]), _target(["/m/09x0r"]), _target(["/m/04rlf"]),
                        np.zeros(len(LABELS), bool)])
    h5 = _write_h5(tmp_path / "broken.h5", names, waves, targets, rate=None)  # no attribute: 32 kHz
    out = tmp_path / "out"
    build_shards(_opts(out, hdf5=(str(h5),)))
    m = read_manifest(out)
    kinds = {(s["kind"], s["ytid"], s["row"]) for s in m["skipped"]}
    assert kinds == {("missing", "", f"{h5}:row 1"), ("silent", "hhhhhhhhhhh", f"{h5}:row 2"),
                     ("no_labels", "iiiiiiiiiii", f"{h5}:row 3")}
    assert m["num_samples"] == 1
    silent = next(s for s in m["skipped"] if s["kind"] == "silent")
    assert silent["path"] == f"{h5}:row 2" and "every sample is zero" in silent["reason"]
    assert hdf5_clip_ids([h5, data["h5_int16"]]) == ["aaaaaaaaaaa", "", "hhhhhhhhhhh", "iiiiiiiiiii", *H5_IDS]


def test_hdf5_at_16k_is_upsampled_and_counted(data, tmp_path):
    """A 16 kHz HDF5 copy: the sample_rate attribute is read, the clip resampled like the same
    audio in a 16 kHz file, and the summary counts it."""
    ints = data["ints"]["ggggggggggg"]  # 16 kHz mono int16
    h5 = _write_h5(tmp_path / "16k.h5", [b"Yggggggggggg.wav"], ints[None], _target(CLIPS["ggggggggggg"][3])[None],
                   rate=16000)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "Yggggggggggg.flac").write_bytes(data["flacs"]["ggggggggggg"])
    listed = tmp_path / "g.csv"
    listed.write_text('ggggggggggg, 0.000, 10.000, "/m/0jbk"\n')
    result = build_shards(_opts(tmp_path / "h5", hdf5=(str(h5),)))
    build_shards(_opts(tmp_path / "folder_out", segments=(listed,), audio_dir=folder))
    assert result.upsampled == {16000: 1} and "1 from 16 kHz" in format_summary(result)
    assert _content(tmp_path / "h5") == _content(tmp_path / "folder_out")


def test_broken_parquet_rows_are_reported(data, tmp_path, capsys):
    flac = data["flacs"]["aaaaaaaaaaa"]
    rows = [("aaaaaaaaaaa", flac, ["/m/09x0r"]), ("jjjjjjjjjjj", b"", ["/m/09x0r"]),
            ("kkkkkkkkkkk", b"fLaC" + bytes(range(256)) * 8, ["/m/09x0r"]), ("lllllllllll", None, ["/m/04rlf"]),
            ("mmmmmmmmmmm", flac, ["/m/not_a_mid"]), ("bad.id/x", flac, ["/m/09x0r"])]
    pqf = _write_parquet(tmp_path / "broken.parquet", rows, 2)
    argv = ["--parquet", str(tmp_path), "--out", str(tmp_path / "out"), "--split", "train", "--workers", "0",
            "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{pqf}:group 2 row 0" in err and "/m/not_a_mid" in err
    assert main(argv + ["--unknown-mids", "drop"]) == 0
    m = read_manifest(tmp_path / "out")
    got = {s["ytid"]: (s["kind"], s["row"]) for s in m["skipped"]}
    assert got == {"jjjjjjjjjjj": ("empty", f"{pqf}:group 0 row 1"),
                   "kkkkkkkkkkk": ("unreadable", f"{pqf}:group 1 row 0"),
                   "lllllllllll": ("empty", f"{pqf}:group 1 row 1"),
                   "mmmmmmmmmmm": ("label", f"{pqf}:group 2 row 0"),
                   "bad.id/x": ("unreadable", f"{pqf}:group 2 row 1")}
    assert m["num_samples"] == 1


def test_tar_samples_labels_and_broken_members(data, tmp_path):
    flac = data["flacs"]["aaaaaaaaaaa"]
    by_name = json.dumps({"tags": "Speech; Music"}).encode()
    _write_tar(tmp_path / "x-000001.tar", [
        ("Ynnnnnnnnnnn", {"flac": flac, "json": by_name}),  # names, ';'-separated
        ("ooooooooooo", {"json": by_name}),  # no audio
        ("ppppppppppp", {"flac": flac}),  # no json
        ("qqqqqqqqqqq", {"flac": b"fLaC" + bytes(300), "json": json.dumps({"tags": ["/m/09x0r"]}).encode()}),
        ("rrrrrrrrrrr", {"wav": b"", "json": json.dumps({"tags": ["/m/09x0r"]}).encode()}),
    ])
    _write_tar(tmp_path / "x-000000.tar", [("sssssssssss", {"flac": flac, "json": by_name})])
    out = tmp_path / "out"
    build_shards(_opts(out, wds_audio=(str(tmp_path / "x-{000000..000001}.tar"),), label_field="tags"))
    m = read_manifest(out)
    assert {s["ytid"]: s["kind"] for s in m["skipped"]} == {
        "ooooooooooo": "missing", "ppppppppppp": "no_labels", "qqqqqqqqqqq": "unreadable", "rrrrrrrrrrr": "empty"}
    content = _content(out)
    assert set(content) == {"nnnnnnnnnnn_0", "sssssssssss_0"}
    assert content["nnnnnnnnnnn_0"][0] == LABELS.indices(["/m/09x0r", "/m/04rlf"])
    assert content["nnnnnnnnnnn_0"][1] == content["sssssssssss_0"][1]


# ------------------------------------------------------------------------ reading clips

def test_read_clip_every_container_and_one_handle_per_file(data):
    containers.close_containers()
    ints = data["ints"]
    for row, ytid in enumerate(H5_IDS):
        for source in ("h5_int16", "h5_float32"):
            samples, sr = read_clip(ClipRef.hdf5(data[source], row))
            assert sr == SR and samples.dtype == np.float32 and samples.shape == (320000,)
            np.testing.assert_array_equal(samples, ints[ytid] / np.float32(32768))
    for row, ytid in enumerate(CLIPS):
        ref = ClipRef.parquet(data["parquet3"], row // 3, row % 3)
        samples, sr = read_clip(ref)
        assert sr == CLIPS[ytid][0] and samples.shape[0] == int(SECONDS * sr)
        mono, sr2 = read_clip_mono(ref)
        assert sr2 == sr and np.array_equal(mono, downmix(samples))  # bit for bit
    assert len(containers.open_containers()) == 3  # two HDF5 files and one parquet file
    with pytest.raises(AudioDecodeError) as err:
        read_clip(ClipRef.hdf5(data["root"] / "nope.h5", 0))
    assert err.value.kind == "missing"
    with pytest.raises(AudioDecodeError) as err:
        read_clip(ClipRef.hdf5(data["h5_int16"], 99))
    assert err.value.kind == "unreadable" and "row 99" in str(err.value)
    plain = data["root"] / "binary.parquet"  # an audio column of plain binary instead of a struct
    pq.write_table(pa.table({"video_id": ["aaaaaaaaaaa"], "audio": [data["flacs"]["aaaaaaaaaaa"]],
                             "labels": [["/m/09x0r"]]}), plain)
    assert np.array_equal(read_clip(ClipRef.parquet(plain, 0, 0))[0], read_clip(ClipRef.parquet(data["parquet1"], 0, 0))[0])
    cut = read_clip(ClipRef.file(data["folder"] / "Yaaaaaaaaaaa.flac", 2.0, 3.5))[0]
    assert cut.shape == (48000,)


# ------------------------------------------------------------------------ resume and parts

def test_part_jobs_over_a_container_give_the_single_run(data, tmp_path):
    single = tmp_path / "single"
    build_shards(_opts(single, parquet=(str(data["parquet3"]),), shard_size=1))
    shared = tmp_path / "shared"
    for i in range(3):
        build_shards(_opts(shared, parquet=(str(data["parquet3"]),), shard_size=1, part=(i, 3)))
    digests = lambda out: {p.name: sha256_file(p) for p in sorted(out.glob("*.tar"))}  # noqa: E731
    assert digests(shared) == digests(single) and len(digests(single)) == len(CLIPS)
    assert read_manifest(shared) == read_manifest(single)


def test_killed_container_build_resumes_to_the_clean_build(data, tmp_path):
    """SIGKILL the real command after its first shard, re-run it: the clean build's shards."""
    clean = tmp_path / "clean"
    build_shards(_opts(clean, hdf5=(str(data["h5_int16"]),), shard_size=1, workers=1))
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "preprocessing.build_shards", "--hdf5", str(data["h5_int16"]), "--out", str(out),
            "--split", "train", "--shard-size", "1", "--workers", "1", "--seed", "3", "--no-progress"]
    kill_build_after_first_shard(argv, out)
    result = build_shards(_opts(out, hdf5=(str(data["h5_int16"]),), shard_size=1, workers=1))
    assert result.shards_reused
    digests = lambda o: {p.name: sha256_file(p) for p in sorted(o.glob("*.tar"))}  # noqa: E731
    assert digests(out) == digests(clean)
    assert read_manifest(out) == read_manifest(clean)


@pytest.mark.parametrize("extra, words", [
    (["--audio-dir", "."], "--hdf5 holds the audio: drop --audio-dir"),
    (["--parquet", "x.parquet"], "not --hdf5 and --parquet"),
    (["--classes", "c.txt"], "--classes is for --list and --class-folders"),
    (["--labels", "LABELS5"], "target has 527 classes, the class list (--labels) 5"),
])
def test_container_argument_errors_are_one_line(data, tmp_path, capsys, extra, words):
    five = tmp_path / "labels5.csv"
    five.write_text("index,mid,display_name\n" + "".join(f'{i},{m},"{m}"\n' for i, m in enumerate(MIDS + ["/m/x"])))
    code = main(["--hdf5", str(data["h5_int16"]), "--out", str(tmp_path / "o"), "--split", "train", "--no-progress",
                 *[str(five) if x == "LABELS5" else x for x in extra]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and "\n" not in err, err


def test_a_pattern_naming_nothing_is_one_line(tmp_path, capsys):
    code = main(["--wds-audio", str(tmp_path / "a-{000..002}.tar"), "--out", str(tmp_path / "o"), "--split", "t"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: {tmp_path / 'a-{000..002}.tar'}: no wds audio file(s) found"


# ------------------------------------------------------------------------ without the extra

def test_without_h5py_one_line_names_the_extra(data, tmp_path):
    code = ("import sys; sys.modules['h5py'] = None\n"
            "from audioset_dcls.shards.cli import main\n"
            f"sys.exit(main(['--hdf5', {str(data['h5_int16'])!r}, '--out', {str(tmp_path / 'o')!r}, "
            "'--split', 'train', '--no-progress']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert 'pip install "audioset-dcls[containers]"' in proc.stderr
