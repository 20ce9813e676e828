"""Build log-mel WebDataset shards from an AudioSet download or your own labelled audio: the
command line.

    audioset-dcls build-shards --segments balanced_train_segments.csv \\
        unbalanced_train_segments.csv --labels class_labels_indices.csv \\
        --audio-dir /data/audioset/audio --out /data/shards/train --split train --workers 16
    audioset-dcls build-shards --hdf5 'hdf5s/waveforms/*train*.h5' --out shards/train --split train
    audioset-dcls build-shards --parquet AudioSet/data/eval --out shards/eval --split eval
    audioset-dcls build-shards --wds-audio 'audioset-{000000..000099}.tar' --out shards/train --split train
    audioset-dcls build-shards --list train.csv --out shards/train --split train
    audioset-dcls build-shards --list eval.csv --classes shards/train --out shards/eval --split eval
    audioset-dcls build-shards --class-folders clips/ --out shards/train --split train

``--hdf5`` / ``--parquet`` / ``--wds-audio``: AudioSet as PANNs HDF5 waveforms, the Hugging Face
parquet copy or audio WebDataset tars, read in place (see :mod:`audioset_dcls.audio.containers`).
``--list``: CSVs with a header ``path,labels[,start,end]`` (labels separated by ``;``, paths
relative to the CSV); ``--class-folders``: ``DIR/<class>/*.wav``; ``--classes``: the class list
(a text file, or the train shard folder) so that train and eval share class indices. See
:mod:`audioset_dcls.shards.sources`.

Writes ``<split>-NNNNNN.tar`` shards, ``sizes.json``, ``manifest.json``, ``skipped.csv`` and the
resume state ``_build/`` into ``--out`` (one split per folder). Re-running the same command
resumes a killed run. ``--part i/N`` builds part i of N (e.g. ``--part $SLURM_ARRAY_TASK_ID/N``);
the job that completes the set writes the manifest, or ``--merge --out DIR`` does for parts built
in separate folders and copied into one. The work is done by :mod:`audioset_dcls.shards.build`;
the package docstring describes the output and how clips become shards. In a checkout,
``python -m preprocessing.build_shards`` is the same command.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from ..audio.containers import MissingExtra
from ..features import FeatureConfig
from ..labels import LabelError
from .build import (
    SKIPPED_NAME,
    BuildError,
    BuildOptions,
    build_shards,
    format_summary,
    merge_shards,
)
from .format import MANIFEST_NAME
from .worker import keep_freed_memory

__all__ = ["build_parser", "clip_seconds_arg", "main"]


def _parse_part(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--part {text!r}: expected i/N, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="audioset-dcls build-shards",
        description="Build log-mel WebDataset shards (+ manifest, sizes.json, skipped.csv) from AudioSet "
                    "segment CSVs and a folder of downloaded audio, from AudioSet containers (--hdf5, --parquet, --wds-audio), from lists of labelled files (--list) or "
                    "from one folder per class (--class-folders).",
    )
    p.add_argument("--segments", nargs="+", type=Path, metavar="CSV",
                   help="segment CSV(s), e.g. balanced_train_segments.csv unbalanced_train_segments.csv")
    p.add_argument("--labels", type=Path, metavar="CSV",
                   help="class_labels_indices.csv (default: AudioSet's 527 classes, shipped with the package)")
    p.add_argument("--audio-dir", type=Path, metavar="DIR", help="folder of audio files (searched recursively)")
    p.add_argument("--hdf5", nargs="+", metavar="FILE_OR_GLOB",
                   help="AudioSet as PANNs / DCLS-Audio HDF5 files (audio_name, waveform, target); files, folders "
                        "or globs. With --segments: their times, labels and coverage")
    p.add_argument("--parquet", nargs="+", metavar="FILE_OR_DIR_OR_GLOB",
                   help="AudioSet as Hugging Face parquet (agkphysics/AudioSet: video_id, audio, labels)")
    p.add_argument("--wds-audio", nargs="+", metavar="TAR_OR_GLOB",
                   help="AudioSet as audio WebDataset tars (one audio member + .json per sample; brace patterns "
                        "like a-{000..009}.tar work)")
    p.add_argument("--label-field", default="labels", metavar="FIELD",
                   help="--wds-audio: the .json field with the labels (mids or names; list or ';'-separated)")
    p.add_argument("--list", dest="lists", nargs="+", type=Path, metavar="CSV",
                   help="your own labelled audio: CSV(s) with a header path,labels[,start,end]; labels separated "
                        "by ';'; paths relative to the CSV's folder; start/end (s) cut a clip from a longer file")
    p.add_argument("--class-folders", type=Path, metavar="DIR",
                   help="your own labelled audio: DIR/<class>/<file> (any depth, audio extensions), one label per clip")
    p.add_argument("--classes", type=Path, metavar="FILE",
                   help="class list for --list/--class-folders: a text file (one name per line) or the train "
                        "shard folder / its manifest.json (default: the sorted set of labels found)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (one split per folder)")
    p.add_argument("--split", metavar="NAME", help="split name, used in shard names: NAME-000000.tar")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes (default: all cores; 0 = in this process)")
    p.add_argument("--shard-size", type=int, default=1000, help="segments per shard (default 1000, ~256 MB)")
    p.add_argument("--part", type=_parse_part, default=(0, 1), metavar="i/N",
                   help="build only part i of N (0-based), e.g. --part $SLURM_ARRAY_TASK_ID/8")
    p.add_argument("--seed", type=int, default=0, help="seed of the clip order (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the CSV order instead of shuffling")
    p.add_argument("--pattern", metavar="PATTERN",
                   help="file name under --audio-dir instead of searching, e.g. 'Y{ytid}.wav' or "
                        "'{ytid}_{start_ms}_{end_ms}.m4a' (fields: ytid start end start_s end_s start_ms end_ms)")
    p.add_argument("--clip-seconds", type=clip_seconds_arg, default=FeatureConfig.clip_seconds, metavar="S",
                   help="length every clip is padded or trimmed to (default 10, AudioSet's; 5 for ESC-50's "
                        "5 s clips: padding short clips with silence trains far worse, docs/finetune.md)")
    p.add_argument("--encoding", choices=("uint8", "float16"), default="uint8",
                   help="how log-mels are stored: uint8 (default; 0.625 dB steps + zstd, ~75 kB per 10 s clip, "
                        "at most 0.3125 dB off) or float16 (~256 kB per clip)")
    p.add_argument("--unknown-mids", choices=("error", "drop"), default="error",
                   help="a label not in --labels (or --classes): stop with an error (default) or drop it and "
                        "report it")
    p.add_argument("--no-verify", action="store_true",
                   help="on resume/merge, check finished shards by size only, not sha256")
    p.add_argument("--merge", action="store_true",
                   help="only write the manifest of --out from the shards of all --part jobs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def clip_seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a clip length in seconds (0 < S <= 3600)")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.merge:
            manifest = merge_shards(args.out, verify=not args.no_verify, threads=max(1, args.workers))
            print(f"merged: {manifest['num_samples']} samples in {manifest['num_shards']} shard(s); "
                  f"{manifest['num_skipped']} clip(s) left out (see {args.out / SKIPPED_NAME}); "
                  f"manifest: {args.out / MANIFEST_NAME}")
            return 0
        own = args.lists or args.class_folders or args.hdf5 or args.parquet or args.wds_audio
        needed = ("segments", "audio_dir", "split") if not own else ("split",)
        missing = [f"--{n.replace('_', '-')}" for n in needed if getattr(args, n) is None]
        if missing:
            parser.error(f"missing {', '.join(missing)} (needed unless --merge)")
        opts = BuildOptions(
            segments=tuple(args.segments or ()), labels=args.labels, audio_dir=args.audio_dir, out=args.out,
            hdf5=tuple(args.hdf5 or ()), parquet=tuple(args.parquet or ()), wds_audio=tuple(args.wds_audio or ()),
            label_field=args.label_field,
            lists=tuple(args.lists or ()), class_folders=args.class_folders, classes=args.classes,
            split=args.split, workers=args.workers, shard_size=args.shard_size, part=args.part,
            seed=args.seed, shuffle=not args.no_shuffle, pattern=args.pattern,
            unknown_mids=args.unknown_mids, verify=not args.no_verify, progress=not args.no_progress,
            encoding=args.encoding, feature_config=FeatureConfig(clip_seconds=args.clip_seconds),
        )
        keep_freed_memory()  # this process unpickles and writes every sample (or, with --workers 0, makes them)
        result = build_shards(opts)
    except (BuildError, LabelError, MissingExtra, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(result, opts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
