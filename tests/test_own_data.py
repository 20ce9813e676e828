"""Shards from your own labelled audio (issue 13): ``--list`` CSVs and ``--class-folders``, with
their own label names, through the same builder (manifest, skipped report, resume)."""

from __future__ import annotations

import csv
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audioset_dcls.features import FeatureConfig
from audioset_dcls.labels import LabelError
from audioset_dcls.shards.build import BuildError, BuildOptions, build_shards, format_summary
from audioset_dcls.shards.format import decode_sample, read_manifest
from audioset_dcls.synthetic import make_own_dataset, synthesize_clip
from audioset_dcls.shards.cli import main as build_main

CFG = FeatureConfig(clip_seconds=2.0)


def _samples(out: Path) -> dict[str, dict]:
    """key -> {"labels", "meta", "frames"} of every sample of a shard folder."""
    found = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members: dict[str, dict] = {}
            for m in tar:
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
        for key, raw in members.items():
            s = decode_sample(raw)
            found[key] = {"labels": s.labels, "meta": s.meta}
    return found


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    return make_own_dataset(tmp_path_factory.mktemp("own"), per_class=3, folds=2, seconds=3.0)


def _opts(out: Path, **kw) -> BuildOptions:
    return BuildOptions(out=out, split=kw.pop("split", "train"), workers=0, shard_size=8, progress=False,
                        feature_config=CFG, **kw)


def test_class_folders_build_with_the_folder_names_and_report_broken_files(own, tmp_path):
    result = build_shards(_opts(tmp_path / "cf", class_folders=own.class_folders))
    m = result.manifest
    assert m["labels"]["names"] == own.class_names == sorted(own.class_names)  # the sorted set of folders
    assert m["num_samples"] == 3 * len(own.class_names) and m["labels_per_clip"] == {"min": 1, "max": 1}
    (bad,) = m["skipped"]  # the corrupt file; notes.txt is not audio and not a clip
    assert bad["kind"] == "unreadable" and bad["path"] == str(own.broken[0])
    names = m["labels"]["names"]
    for s in _samples(tmp_path / "cf").values():  # each clip labelled with its own folder
        assert f"/clips/{names[s['labels'][0]]}/" in s["meta"]["source"]
    # 3 s clips, 2 s shards: trimmed, and said so in the duration summary
    assert m["durations"]["trimmed"] == m["num_samples"] and "trimmed to 2 s" in format_summary(result)


def test_list_csv_multi_label_cuts_and_missing_files(own, tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(1)
    sf.write(audio / "long.wav", synthesize_clip([0, 3], 6.0, 16000, rng), 16000)
    sf.write(audio / "short.flac", synthesize_clip([1], 2.0, 22050, rng)[:22050], 22050)
    lst = tmp_path / "list.csv"
    lst.write_text("path,labels,start,end\n"
                   "audio/long.wav,dog;siren,0,1.5\n"  # a cut, two labels
                   "audio/long.wav,dog,4,\n"  # from 4 s to the end of the file
                   f"{audio / 'short.flac'},cat,,\n"  # absolute path, padded
                   "audio/gone.wav,cat,,\n"  # missing: skipped and reported
                   "audio/long.wav,dog,7,8\n"  # past the end of the file: skipped and reported
                   "\n")
    result = build_shards(_opts(tmp_path / "out", lists=(lst,)))
    m = result.manifest
    assert m["labels"] == {"mids": ["cat", "dog", "siren"], "names": ["cat", "dog", "siren"]}
    assert m["labels_per_clip"] == {"min": 1, "max": 2}
    got = sorted((s["meta"]["start"], s["meta"]["end"], s["labels"]) for s in _samples(tmp_path / "out").values())
    assert got == [(0.0, 1.0, [0]), (0.0, 1.5, [1, 2]), (4.0, 6.0, [1])]
    assert sorted(s["kind"] for s in m["skipped"]) == ["empty", "missing"]
    assert m["durations"]["min"] == pytest.approx(1.0) and m["durations"]["padded"] == 2
    with open(tmp_path / "out" / "skipped.csv", newline="") as f:
        rows = {r["kind"]: r for r in csv.DictReader(f)}
    assert rows["missing"]["segment_row"] == f"{lst}:5" and rows["empty"]["segment_row"] == f"{lst}:6"
    assert "no audio from 7 s on" in rows["empty"]["reason"]
    # the same command again: nothing to rebuild
    again = build_shards(_opts(tmp_path / "out", lists=(lst,)))
    assert again.shards_written == [] and again.manifest["clip_ids_sha256"] == m["clip_ids_sha256"]


def test_eval_folds_share_the_train_class_list_and_unknown_labels_fail(own, tmp_path, capsys):
    train, evl = tmp_path / "train", tmp_path / "eval"
    common = ["--workers", "0", "--no-progress", "--shard-size", "8"]
    assert build_main(["--list", str(own.folds[0]), "--out", str(train), "--split", "train"] + common) == 0
    # the eval fold is read with the train manifest's class list (a subset of labels keeps the indices)
    only_hum = tmp_path / "hum.csv"
    only_hum.write_text("path,labels\n" + str(own.class_folders / "hum" / "000.wav") + ",hum\n")
    assert build_main(["--list", str(only_hum), "--classes", str(train), "--out", str(evl), "--split", "eval"]
                      + common) == 0
    assert read_manifest(evl)["labels"] == read_manifest(train)["labels"]
    assert [s["labels"] for s in _samples(evl).values()] == [[own.class_names.index("hum")]]
    # a text class list fixes the order; a label unknown to it is one error line naming the row
    classes = tmp_path / "classes.txt"
    classes.write_text("whistle\nhum\n")
    capsys.readouterr()
    assert build_main(["--list", str(own.folds[1]), "--classes", str(classes), "--out", str(tmp_path / "x"),
                       "--split", "eval"] + common) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {own.folds[1]}:2: label(s) 'alarm' not in the class list") and "\n" not in err
    # ... or, with --unknown-mids drop, each such row is reported once
    assert build_main(["--list", str(own.folds[1]), "--classes", str(classes), "--out", str(tmp_path / "y"),
                       "--split", "eval", "--unknown-mids", "drop"] + common) == 0
    m = read_manifest(tmp_path / "y")
    assert m["labels"]["names"] == ["whistle", "hum"]
    label_rows = [s for s in m["skipped"] if s["kind"] == "label"]
    rows_in_list = sum(1 for line in own.folds[1].read_text().splitlines()[1:] if line.split(",")[1] not in
                       ("whistle", "hum"))
    assert len(label_rows) == rows_in_list and len({s["row"] for s in label_rows}) == rows_in_list


@pytest.mark.parametrize("text, words", [
    ("file,label\na.wav,x\n", "expected a header with the columns path,labels"),
    ("path,labels\na.wav,\n", ":2: no labels"),
    ("path,labels,start,end\na.wav,x,3,2\n", ":2: end 2 is not after start 3"),
    ("path,labels,start\na.wav,x,soon\n", ":2: start 'soon' is not a number of seconds"),
])
def test_malformed_lists_name_the_file_and_line(tmp_path, text, words):
    lst = tmp_path / "bad.csv"
    lst.write_text(text)
    with pytest.raises(LabelError, match=words) as info:
        build_shards(_opts(tmp_path / "out", lists=(lst,)))
    assert str(info.value).startswith(str(lst)) and "\n" not in str(info.value)


def test_one_kind_of_input(own, tmp_path):
    with pytest.raises(BuildError, match="one kind of input"):
        build_shards(_opts(tmp_path / "o", lists=own.folds, class_folders=own.class_folders))
    with pytest.raises(BuildError, match="--pattern is for --segments"):
        build_shards(_opts(tmp_path / "o", lists=own.folds, pattern="{ytid}.wav"))
    empty = tmp_path / "empty"
    (empty / "dog").mkdir(parents=True)
    with pytest.raises(LabelError, match="no audio files in class sub-folders"):
        build_shards(_opts(tmp_path / "o", class_folders=empty))


def test_clip_seconds_and_the_warning_about_clips_padded_with_silence(own, tmp_path, capsys):
    """3 s clips built at the default 10 s are mostly silence (5 s clips padded to 10 s trained to
    0.19 mAP instead of 0.50): the summary says so and names --clip-seconds, which builds them at
    their own length."""
    common = ["--class-folders", str(own.class_folders), "--split", "train", "--workers", "0", "--no-progress"]
    assert build_main(common + ["--out", str(tmp_path / "ten")]) == 0
    out = capsys.readouterr().out
    assert "warning: the clips average 3.00 s of the 10 s" in out and "--clip-seconds 3 " in out
    assert read_manifest(tmp_path / "ten")["shape"] == [128, 1001]
    assert build_main(common + ["--out", str(tmp_path / "three"), "--clip-seconds", "3"]) == 0
    assert "warning" not in capsys.readouterr().out
    m = read_manifest(tmp_path / "three")
    assert m["feature_config"]["clip_seconds"] == 3.0 and m["shape"] == [128, 301]
    assert m["durations"]["padded"] == 0
    with pytest.raises(SystemExit):
        build_main(common + ["--out", str(tmp_path / "bad"), "--clip-seconds", "0"])
    assert "'0' is not a clip length in seconds" in capsys.readouterr().err
