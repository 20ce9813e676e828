"""AudioSet class index and segment CSVs (both variants), and finding each segment's audio file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from audioset_dcls.labels import (
    LabelError,
    LabelSet,
    Segment,
    index_audio_dir,
    read_label_set,
    read_segment_files,
    read_segments,
    resolve_pattern,
)

CLASS_INDEX = '''index,mid,display_name
0,/m/09x0r,"Speech"
1,/m/05zppz,"Male speech, man speaking"
2,/m/068hy,"Domestic animals, pets"
3,/m/04rlf,"Music"
'''

# Official layout: two '#' header lines, column line, ', ' separators, 0.000 times, quoted lists.
OFFICIAL = '''# Segments csv created Sun Mar  5 10:54:31 2017
# num_ytids=3, num_segs=3, num_unique_labels=3, num_positive_labels=5
# YTID, start_seconds, end_seconds, positive_labels
--4gqARaEJE, 0.000, 10.000, "/m/068hy,/m/09x0r"
-0RWZT-miFs, 420.000, 430.000, "/m/04rlf"
abcdEFGH_12, 30.500, 39.250, "/m/09x0r,/m/05zppz,/m/04rlf"
'''

# Re-saved layout: no leading comments, ',' separators, integer times, quoted only if several.
RESAVED = '''# YTID, start_seconds, end_seconds, positive_labels
--4gqARaEJE,0,10,"/m/068hy,/m/09x0r"
-0RWZT-miFs,420,430,/m/04rlf
abcdEFGH_12,30.5,39.25,"/m/09x0r,/m/05zppz,/m/04rlf"
'''


@pytest.fixture
def labels(tmp_path) -> LabelSet:
    path = tmp_path / "class_labels_indices.csv"
    path.write_text(CLASS_INDEX)
    return read_label_set(path)


def test_label_set_parses_quoted_names(labels):
    assert len(labels) == 4
    assert labels.names[1] == "Male speech, man speaking"
    assert labels.index["/m/04rlf"] == 3
    np.testing.assert_array_equal(labels.to_multi_hot(["/m/04rlf", "/m/09x0r"]), [1, 0, 0, 1])
    np.testing.assert_array_equal(labels.to_multi_hot([2]), [0, 0, 1, 0])
    assert LabelSet.from_dict(labels.to_dict()) == labels


@pytest.mark.parametrize("text", [OFFICIAL, RESAVED, OFFICIAL.replace("\n", "\r\n")],
                         ids=["official", "resaved", "official-crlf"])
def test_both_segment_variants_parse_the_same(tmp_path, labels, text):
    path = tmp_path / "segments.csv"
    path.write_text(text)
    segs = read_segments(path, labels)
    assert [s.ytid for s in segs] == ["--4gqARaEJE", "-0RWZT-miFs", "abcdEFGH_12"]
    assert [(s.start, s.end) for s in segs] == [(0.0, 10.0), (420.0, 430.0), (30.5, 39.25)]
    assert segs[0].labels == (0, 2) and segs[2].labels == (0, 1, 3)
    assert segs[2].mids == ("/m/09x0r", "/m/05zppz", "/m/04rlf")
    assert segs[1].key == "-0RWZT-miFs_420000" and segs[2].key == "abcdEFGH_12_30500"
    assert segs[0].source.endswith("segments.csv:" + ("2" if text is RESAVED else "4"))
    assert segs.dropped == []


def test_unknown_mid_is_an_error_naming_file_and_line(tmp_path, labels):
    path = tmp_path / "seg.csv"
    path.write_text(OFFICIAL.replace('"/m/04rlf"', '"/m/04rlf,/m/zzzz"'))
    with pytest.raises(LabelError, match=r"seg\.csv:5: mid\(s\) /m/zzzz not in the class index") as info:
        read_segments(path, labels)
    assert "\n" not in str(info.value)
    # ... or dropped and reported; a row with no known mid left is skipped and reported
    path.write_text(OFFICIAL.replace('"/m/04rlf"', '"/m/04rlf,/m/zzzz"').replace('"/m/068hy,/m/09x0r"', '"/m/yyy"'))
    segs = read_segments(path, labels, unknown_mids="drop")
    assert [s.ytid for s in segs] == ["-0RWZT-miFs", "abcdEFGH_12"]
    assert segs[0].labels == (3,)
    # the row left with no mid, reported once, and the row that lost /m/zzzz
    skipped, kept = segs.dropped
    assert all(d.kind == "label" for d in segs.dropped)
    assert (skipped.ytid, skipped.start, skipped.end) == ("--4gqARaEJE", 0, 10)
    assert "/m/yyy" in skipped.reason and "no known label" in skipped.reason and skipped.row.endswith("seg.csv:4")
    assert (kept.ytid, kept.start, kept.end) == ("-0RWZT-miFs", 420.0, 430.0)
    assert kept.row.endswith("seg.csv:5") and "/m/zzzz" in kept.reason


@pytest.mark.parametrize(
    "row, words",
    [
        ("abc,0,10", "expected YTID"),
        ("abc,zero,10,/m/09x0r", "start time 'zero' is not a number"),
        ("abc,10,5,/m/09x0r", "before start"),
        ('abc,0,10,""', "no labels"),
        ("a.b/c,0,10,/m/09x0r", "YTID"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, labels, row, words):
    path = tmp_path / "bad.csv"
    path.write_text(RESAVED + row + "\n")
    with pytest.raises(LabelError) as info:
        read_segments(path, labels)
    msg = str(info.value)
    assert f"{path}:5:" in msg and words in msg and "\n" not in msg


def test_malformed_class_index(tmp_path):
    path = tmp_path / "idx.csv"
    path.write_text(CLASS_INDEX.replace("2,/m/068hy", "5,/m/068hy"))
    with pytest.raises(LabelError, match=r"idx\.csv:4: class index 5 out of order"):
        read_label_set(path)
    path.write_text(CLASS_INDEX.replace("/m/068hy", "/m/09x0r"))
    with pytest.raises(LabelError, match=r"idx\.csv:4: mid /m/09x0r already used on line 2"):
        read_label_set(path)


def test_several_files_are_concatenated_and_duplicates_reported(tmp_path, labels):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text(OFFICIAL)
    b.write_text("# YTID, start_seconds, end_seconds, positive_labels\nzzzzzzzzzzz,0,10,/m/09x0r\n"
                 "--4gqARaEJE,0,10,/m/09x0r\n")
    segs = read_segment_files([a, b], labels)
    assert [s.ytid for s in segs] == ["--4gqARaEJE", "-0RWZT-miFs", "abcdEFGH_12", "zzzzzzzzzzz"]
    (dup,) = segs.dropped
    assert (dup.kind, dup.ytid, dup.start, dup.end) == ("duplicate", "--4gqARaEJE", 0.0, 10.0)
    assert dup.row.endswith("b.csv:3") and "a.csv:4" in dup.reason


def test_real_audioset_metadata(audioset_meta: Path):
    labels = read_label_set(audioset_meta / "class_labels_indices.csv")
    assert len(labels) == 527
    assert labels.mids[0] == "/m/09x0r" and labels.names[0] == "Speech"
    assert labels.names[1] == "Male speech, man speaking"
    ev = read_segments(audioset_meta / "eval_segments.csv", labels)
    bal = read_segments(audioset_meta / "balanced_train_segments.csv", labels)
    # every non-comment line is a segment
    for segs, name in [(ev, "eval_segments.csv"), (bal, "balanced_train_segments.csv")]:
        lines = (audioset_meta / name).read_text().splitlines()
        assert len(segs) == sum(1 for ln in lines if ln.strip() and not ln.startswith("#"))
        assert segs.dropped == []
    assert len(bal) == 22160  # the file's own '# num_segs=22160' line
    first = ev[0]
    assert first.ytid == "--4gqARaEJE" and (first.start, first.end) == (0.0, 10.0)
    assert first.labels == tuple(sorted(labels.index[m] for m in ("/m/068hy", "/m/07q6cd_", "/m/0bt9lr", "/m/0jbk")))
    assert sum(s.ytid.startswith("-") for s in ev) > 100
    assert sum(len(s.labels) > 1 for s in bal) > 10000
    used = {i for s in bal for i in s.labels}
    assert len(used) == 527  # '# num_unique_labels=527'
    assert sum(len(s.labels) for s in bal) == 52882  # '# num_positive_labels=52882'
    both = read_segment_files([audioset_meta / "balanced_train_segments.csv", audioset_meta / "eval_segments.csv"], labels)
    assert len(both) == len(ev) + len(bal) and both.dropped == []


def test_audio_index_finds_common_layouts(tmp_path):
    layouts = {
        "Y--4gqARaEJE.wav": Segment("--4gqARaEJE", 0.0, 10.0, ()),
        "-0RWZT-miFs.flac": Segment("-0RWZT-miFs", 420.0, 430.0, ()),
        "sub/dir/abcdefghijk_30.ogg": Segment("abcdefghijk", 30.0, 40.0, ()),
        "x/Ybbbbbbbbbbb_30000_40000.m4a": Segment("bbbbbbbbbbb", 30.0, 40.0, ()),
        "Yccccccccccc_30.500_40.500.MP3": Segment("ccccccccccc", 30.5, 40.5, ()),
        "ddddddddddd_7_17.opus": Segment("ddddddddddd", 7.0, 17.0, ()),
        "fffffffffff_0_10000.m4a": Segment("fffffffffff", 0.0, 10.0, ()),
        "ggggggggggg_0.000.wav": Segment("ggggggggggg", 0.0, 10.0, ()),
    }
    for name in layouts:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "eeeeeeeeeee.wav.part").write_bytes(b"x")  # partial download: never matched
    (tmp_path / "eeeeeeeeeee.txt").write_bytes(b"x")
    index = index_audio_dir(tmp_path)
    assert index.num_files == len(layouts)
    for name, seg in layouts.items():
        assert index.find(seg) == (tmp_path / name, 1), name
    assert index.find(Segment("eeeeeeeeeee", 0.0, 10.0, ())) == (None, 0)
    # a more specific name wins over the bare id; ties resolve to the first path in order
    (tmp_path / "-0RWZT-miFs_420.wav").write_bytes(b"x")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "-0RWZT-miFs_420.wav").write_bytes(b"x")
    index = index_audio_dir(tmp_path)
    assert index.find(layouts["-0RWZT-miFs.flac"]) == (tmp_path / "-0RWZT-miFs_420.wav", 2)


def test_audio_index_follows_folder_symlinks_without_looping(tmp_path):
    disk2 = tmp_path / "disk2"
    (disk2 / "inner").mkdir(parents=True)
    (disk2 / "inner" / "Yaaaaaaaaaaa.flac").write_bytes(b"x")
    (disk2 / "inner" / "loop").symlink_to(disk2)  # a cycle
    root = tmp_path / "audio"
    root.mkdir()
    (root / "unbalanced").symlink_to(disk2)
    index = index_audio_dir(root)
    assert index.num_files == 1
    path, hits = index.find(Segment("aaaaaaaaaaa", 0.0, 10.0, ()))
    assert hits == 1 and path.name == "Yaaaaaaaaaaa.flac" and path.is_file()


def test_filename_pattern(tmp_path):
    seg = Segment("-0RWZT-miFs", 420.0, 430.0, ())
    assert resolve_pattern("Y{ytid}_{start:.3f}_{end:.3f}.wav", tmp_path, seg) == tmp_path / "Y-0RWZT-miFs_420.000_430.000.wav"
    assert resolve_pattern("{ytid}_{start_ms}_{end_ms}.m4a", "d", seg) == Path("d/-0RWZT-miFs_420000_430000.m4a")
    assert resolve_pattern("{ytid[0]}/{ytid}_{start_s}.flac", "d", seg) == Path("d/-/-0RWZT-miFs_420.flac")
    with pytest.raises(ValueError, match="fields: ytid"):
        resolve_pattern("{id}.wav", "d", seg)


def test_audioset_class_index_ships_with_the_package():
    """The bundled class index (CC BY 4.0, with its attribution) is declared package data, so a
    wheel or the Docker image has it; it parses into AudioSet's 527 classes."""
    import importlib.resources
    from fnmatch import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from audioset_dcls.labels import audioset_label_set

    labels = audioset_label_set()
    assert len(labels) == 527 and labels.names[:2] == ("Speech", "Male speech, man speaking")
    assets = importlib.resources.files("audioset_dcls") / "assets"
    assert "CC BY 4.0" in (assets / "NOTICE.md").read_text()
    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["audioset_dcls"]
    for name in ("class_labels_indices.csv", "NOTICE.md"):
        assert any(fnmatch(f"assets/{name}", pat) for pat in patterns), name


def test_bundled_class_index_is_audiosets(audioset_meta):
    from audioset_dcls.labels import audioset_label_set

    assert audioset_label_set() == read_label_set(audioset_meta / "class_labels_indices.csv")
