"""The archive job (audioset_dcls/tagging/archive.py): the work split, inputs and ids, a 2-process
(torchrun, gloo) run equal to a 1-process run with loader workers, kill -9 and SIGTERM then resume
(every input exactly once), a damaged part redone, another model refused, parquet read back with
pyarrow and pandas, embeddings equal to Tagger.tag's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pd = pytest.importorskip("pandas")
import pyarrow.dataset as ds  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from audioset_dcls.preemption import EXIT_PREEMPTED  # noqa: E402
from audioset_dcls.tagging.archive import chunks_of_process, process_index  # noqa: E402
from audioset_dcls.tagging.archive_inputs import decode_input, list_inputs  # noqa: E402
from audioset_dcls.tagging.tagger import Tagger  # noqa: E402
from helpers_tagging import LABEL_NAMES, write_audio, write_checkpoint, write_variants  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OPTIONS = ["--hop", "5", "--top-k", "3", "--all-scores", "--per-window", "--events", "--window-embeddings",
           "--sha256", "--batch-size", "4", "-q"]
BROKEN = {"broken.flac": "unreadable", "empty.wav": "empty", "dangling.wav": "missing"}


# ---- units ----------------------------------------------------------------------------------


@pytest.mark.parametrize("inputs,chunk,parts,world", [(10, 3, 1, 2), (1000, 7, 3, 4), (5, 10, 2, 2), (0, 4, 1, 1)])
def test_every_chunk_belongs_to_exactly_one_process(monkeypatch, inputs, chunk, parts, world):
    owners: dict[int, list[int]] = {}
    for i in range(parts):
        for rank in range(world):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", str(world))
            process, processes, _ = process_index((i, parts))
            assert processes == parts * world
            for k in chunks_of_process(inputs, chunk, process, processes):
                owners.setdefault(k, []).append(process)
    assert sorted(owners) == list(range(-(-inputs // chunk)))
    assert all(len(p) == 1 for p in owners.values())


def test_inputs_have_stable_order_and_ids(tmp_path):
    for name in ("b/z.wav", "a.flac", "b/a.ogg", "notes.txt"):
        (tmp_path / "root" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "root" / name).write_bytes(b"x")
    items = list_inputs([str(tmp_path / "root")])
    assert [i.id for i in items] == ["a.flac", "b/a.ogg", "b/z.wav"]  # sorted, relative, audio only
    assert all(Path(i.source).is_file() for i in items)
    (tmp_path / "list.txt").write_text("# clips\nroot/b/z.wav\n\nroot/a.flac\n")
    assert [(i.id, i.source) for i in list_inputs([f"@{tmp_path / 'list.txt'}"])] == [
        ("root/a.flac", str(tmp_path / "root/a.flac")), ("root/b/z.wav", str(tmp_path / "root/b/z.wav"))]
    (tmp_path / "list.csv").write_text("id,path,label\nYT2,root/b/z.wav,x\nYT1,root/a.flac,y\n")
    assert [(i.id, Path(i.source).name) for i in list_inputs([f"@{tmp_path / 'list.csv'}"])] == [
        ("YT1", "a.flac"), ("YT2", "z.wav")]
    with pytest.raises(ValueError, match="given twice"):
        list_inputs([f"@{tmp_path / 'list.txt'}", f"@{tmp_path / 'list.txt'}"])


def test_decode_input_reports_the_decode_layers_kind(tmp_path, audio_dir):
    for name, kind in BROKEN.items():
        d = decode_input(list_inputs([str(audio_dir / name)])[0], 32000, 320000, 160000)
        assert d["error_kind"] == kind and d["windows"].shape == (0, 320000) and d["error"]


# ---- end to end -----------------------------------------------------------------------------


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def job_command(checkpoint: Path, inputs: Path, out: Path, *extra: str, processes: int = 1) -> list[str]:
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
                   "--master_port", _port()]
    return launch + ["-m", "audioset_dcls.tagging.archive", str(inputs), "--out", str(out), "--checkpoint",
                     str(checkpoint), *OPTIONS, *extra]


def run_job(*args, processes: int = 1, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(job_command(*args, processes=processes, **kw), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stderr


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    """Five formats and layouts twice (one copy in a sub-folder), a 25 s file, and three broken files."""
    folder = tmp_path_factory.mktemp("archive")
    write_variants(folder)
    write_variants(folder / "sub")
    write_audio(folder / "long.flac", 25.0, 44100, 2, "FLAC", "PCM_16", seed=9)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "broken.flac").write_bytes(b"fLaC" + bytes(range(256)))
    os.symlink(folder / "gone.wav", folder / "dangling.wav")
    return folder


@pytest.fixture(scope="module")
def one_process(checkpoint, audio_dir, tmp_path_factory) -> Path:
    """The reference: one process, one loader worker, chunks of 3."""
    out = tmp_path_factory.mktemp("one") / "out"
    ok(run_job(checkpoint, audio_dir, out, "--chunk-size", "3", "--workers", "1"))
    return out


def read(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    tags = pd.read_parquet(out / "tags").sort_values("id").reset_index(drop=True)
    fails = pd.read_parquet(out / "failures").sort_values("id").reset_index(drop=True)
    return tags, fails


def assert_same_results(a: Path, b: Path) -> None:
    (ta, fa), (tb, fb) = read(a), read(b)
    assert list(ta["id"]) == list(tb["id"]) and len(set(ta["id"])) == len(ta)
    assert fa[["id", "kind", "reason"]].equals(fb[["id", "kind", "reason"]])
    for col in ("top_score", "embedding"):
        np.testing.assert_allclose(np.stack(ta[col]), np.stack(tb[col]), atol=1e-5)
    np.testing.assert_allclose(np.stack(ta["scores"]).astype(np.float32), np.stack(tb["scores"]).astype(np.float32),
                               atol=1e-3, rtol=1e-3)  # float16: a 1e-6 difference may round one ulp apart
    assert [list(x) for x in ta["top_index"]] == [list(x) for x in tb["top_index"]]
    assert list(ta["sha256"]) == list(tb["sha256"]) and list(ta["duration"]) == list(tb["duration"])


def test_one_process_output_reads_back_with_pyarrow_and_pandas(one_process, audio_dir):
    tags, fails = read(one_process)
    table = ds.dataset(one_process / "tags", format="parquet").to_table()
    assert table.num_rows == len(tags) == 11 and sorted(table.column("id").to_pylist()) == list(tags["id"])
    assert dict(zip(fails["id"], fails["kind"])) == BROKEN
    assert table.schema.field("scores").type == pa.list_(pa.float16())
    meta = json.loads(pq.read_schema(next((one_process / "tags").glob("*.parquet"))).metadata[b"audioset_dcls.settings"])
    assert [lab["name"] for lab in meta["model"]["labels"]] == LABEL_NAMES
    assert meta == json.loads((one_process / "settings.json").read_text())
    row = tags.set_index("id").loc["long.flac"]
    assert row["duration"] == 25.0 and row["sample_rate"] == 44100 and row["num_windows"] == 4
    assert list(row["window_start"]) == [0, 5, 10, 15] and len(row["window_scores"]) == 4
    assert len(row["scores"]) == len(LABEL_NAMES) and np.stack(row["window_embeddings"]).shape[0] == 4
    import hashlib
    assert row["sha256"] == hashlib.sha256((audio_dir / "long.flac").read_bytes()).hexdigest()
    summary = json.loads((one_process / "summary.json").read_text())
    assert summary["complete"] and summary["inputs"] == 14 and summary["tagged"] == 11
    assert summary["failures_by_kind"] == {"empty": 1, "missing": 1, "unreadable": 1}
    assert summary["audio_seconds"] == pytest.approx(tags["duration"].sum())
    assert not list(one_process.rglob("*.tmp"))


def test_scores_and_embeddings_equal_the_taggers(one_process, checkpoint, audio_dir):
    tags, _ = read(one_process)
    tagger = Tagger.from_checkpoint(checkpoint, device="cpu", hop_seconds=5.0, batch_size=4)
    for _, row in tags.iterrows():
        result = tagger.tag(audio_dir / row["id"], embeddings=True)
        np.testing.assert_allclose(row["embedding"], result.embedding, atol=1e-5)
        np.testing.assert_allclose(np.stack(row["window_embeddings"]), result.window_embeddings, atol=1e-5)
        np.testing.assert_allclose(row["top_score"], [t.score for t in result.top(3)], atol=1e-5)
        np.testing.assert_allclose(row["scores"].astype(np.float32), result.scores, atol=1e-3, rtol=1e-3)
        assert [e["name"] for e in row["events"]] == [e.name for e in result.events(0.5)]
    np.testing.assert_allclose(tagger.embed(audio_dir / "long.flac"), np.stack(tags.set_index("id").loc["long.flac", "embedding"]),
                               atol=1e-5)


def test_two_processes_equal_one(one_process, checkpoint, audio_dir, tmp_path):
    """torchrun, 2 ranks (gloo), decoding in each rank's main process: the same results."""
    out = tmp_path / "two"
    ok(run_job(checkpoint, audio_dir, out, "--chunk-size", "3", "--workers", "0", processes=2))
    assert_same_results(one_process, out)
    summary = json.loads((out / "summary.json").read_text())
    assert [r["process"] for r in summary["per_rank"]] == [0, 1] and summary["complete"]
    assert sum(r["inputs"] for r in summary["per_rank"]) == 14
    assert all(r["chunks_written"] == r["chunks_assigned"] > 0 for r in summary["per_rank"])


def test_slurm_parts_split_the_job(one_process, checkpoint, audio_dir, tmp_path):
    out = tmp_path / "parts"
    for i in range(2):
        ok(run_job(checkpoint, audio_dir, out, "--chunk-size", "3", "--workers", "0", "--part", f"{i}/2"))
    assert_same_results(one_process, out)


def _wait_for_parts(out: Path, job: subprocess.Popen, count: int) -> None:
    deadline = time.monotonic() + 300
    while len(list((out / "tags").glob("part-*.parquet"))) < count and job.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_kill_9_then_resume_tags_every_input_exactly_once(one_process, checkpoint, audio_dir, tmp_path):
    out = tmp_path / "killed"
    cmd = job_command(checkpoint, audio_dir, out, "--chunk-size", "1", "--workers", "1")
    job = subprocess.Popen(cmd, cwd=REPO, env=_env(), stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for_parts(out, job, 2)
    os.killpg(job.pid, signal.SIGKILL)  # the job and its loader worker, no clean-up
    job.wait()
    done = len(list((out / "tags").glob("part-*.parquet")))
    assert 2 <= done < 14, "the job finished before it could be killed"
    ok(run_job(checkpoint, audio_dir, out, "--chunk-size", "1", "--workers", "1"))
    ranks = json.loads((out / "ranks" / "part0-rank0.json").read_text())
    assert ranks["chunks_already_done"] == done and ranks["chunks_written"] == 14 - done
    assert_same_results(one_process, out)


def test_sigterm_stops_cleanly_and_a_damaged_part_is_redone(one_process, checkpoint, audio_dir, tmp_path):
    out = tmp_path / "stopped"
    cmd = job_command(checkpoint, audio_dir, out, "--chunk-size", "1", "--workers", "1")
    job = subprocess.Popen(cmd, cwd=REPO, env=_env(), stderr=subprocess.PIPE, text=True)
    _wait_for_parts(out, job, 1)
    job.send_signal(signal.SIGTERM)
    err = job.communicate(timeout=120)[1]
    assert job.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "SIGTERM received" in err and not list(out.rglob("*.tmp"))
    parts = sorted((out / "tags").glob("part-*.parquet"))
    assert 1 <= len(parts) < 14 and not (out / "summary.json").exists()
    damaged = parts[0]
    damaged.write_bytes(damaged.read_bytes()[:100])  # a part that does not read back is redone
    ok(run_job(checkpoint, audio_dir, out, "--chunk-size", "1", "--workers", "1"))
    ranks = json.loads((out / "ranks" / "part0-rank0.json").read_text())
    assert ranks["chunks_already_done"] == len(parts) - 1
    assert_same_results(one_process, out)


def test_an_output_folder_of_another_model_or_options_is_refused(one_process, checkpoint, audio_dir, tmp_path):
    other = write_checkpoint(tmp_path / "other.safetensors", seed=1)
    proc = run_job(other, audio_dir, one_process, "--chunk-size", "3", "--workers", "0")
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "model.sha256" in lines[0], proc.stderr
    proc = run_job(checkpoint, audio_dir, one_process, "--chunk-size", "4", "--workers", "0")
    assert proc.returncode == 2 and "options.chunk_size 3 -> 4" in proc.stderr
    copy = tmp_path / "more"
    shutil.copytree(audio_dir, copy, symlinks=True)
    write_audio(copy / "new.wav", 2.0, 32000)
    proc = run_job(checkpoint, copy, one_process, "--chunk-size", "3", "--workers", "0")
    assert proc.returncode == 2 and "inputs.count 14 -> 15" in proc.stderr


def test_hdf5_clips_are_inputs_with_their_youtube_ids(checkpoint, audio_dir, tmp_path):
    """A PANNs HDF5 file (int16 at 32 kHz) beside a folder: one input per row, id = YouTube id,
    scores and embeddings those of Tagger.tag on the same samples; a row of NaN is a failure."""
    h5py = pytest.importorskip("h5py")
    from audioset_dcls.tagging.archive import ArchiveOptions, tag_archive

    rng = np.random.default_rng(0)
    waves = (rng.standard_normal((3, 32000 * 10)) * 3000).astype(np.float32)
    waves[2, 5] = np.nan  # a broken row: NaN samples
    names = [b"Y--PJHxphWEs.wav", b"Y0123456789a.wav", b"Ybroken_row1.wav"]
    with h5py.File(tmp_path / "balanced.h5", "w") as f:
        f.create_dataset("audio_name", data=np.array(names, dtype="S20"))
        f.create_dataset("waveform", data=waves)
        f.create_dataset("target", data=np.zeros((3, 527), bool))
        f.attrs.create("sample_rate", data=32000, dtype=np.int32)
    single = tmp_path / "one"
    single.mkdir()
    shutil.copy(audio_dir / "mono32k.wav", single / "mono32k.wav")
    opts = ArchiveOptions(workers=1, embeddings="clip", all_scores=True, progress=False, chunk_size=2)
    stats = tag_archive([str(single)], tmp_path / "out", checkpoint=checkpoint, options=opts,
                        containers={"hdf5": [str(tmp_path / "balanced.h5")]})
    assert stats["job"]["complete"] and stats["inputs"] == 4
    tags, fails = read(tmp_path / "out")
    assert list(tags["id"]) == ["--PJHxphWEs", "0123456789a", "mono32k.wav"]
    assert list(fails["id"]) == ["broken_row1"] and list(fails["kind"]) == ["unreadable"]
    assert tags.set_index("id").loc["--PJHxphWEs", "path"].endswith("balanced.h5:row 0")
    tagger = Tagger.from_checkpoint(checkpoint, device="cpu")
    for i in range(2):
        result = tagger.tag(waves[i], sample_rate=32000, embeddings=True)
        row = tags.iloc[i]
        np.testing.assert_allclose(row["embedding"], result.embedding, atol=1e-5)
        np.testing.assert_allclose(row["scores"].astype(np.float32), result.scores, atol=1e-3, rtol=1e-3)
