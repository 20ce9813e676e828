"""A small AudioSet-format dataset made of distinguishable synthetic sounds.

Used by the quickstart example and the tests, so every step of the pipeline can run on real
files without downloading anything. It writes exactly what an AudioSet download looks like:

- ``class_labels_indices.csv`` (``index,mid,display_name``, names quoted),
- ``balanced_train_segments.csv`` and ``eval_segments.csv`` in the official layout (two ``#``
  comment lines, the ``# YTID, start_seconds, ...`` column line, ``, `` separators,
  ``0.000`` times, quoted label lists),
- ``audio/<split>/...`` files named after the YouTube-style id in several common layouts and
  formats (wav, flac, ogg/vorbis, mp3), sample rates (16, 32, 44.1, 48 kHz), mono and stereo,
  lengths of 8-12 s, plus a few broken clips: one corrupt file, one empty file, and one clip
  that is listed but missing.

Each clip holds one to three of the classes below over a faint noise floor; all class content
lies under 7.5 kHz so even 16 kHz files carry it. A tiny model learns them in a few CPU minutes.

Command line: ``python -m audioset_dcls example-data --out DIR [--train N] [--eval N]``.
"""

from __future__ import annotations

import argparse
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

# (mid, display name): mids use the /x/ prefix so they can never be confused with real AudioSet ones.
CLASSES: list[tuple[str, str]] = [
    ("/x/low_tone", "Low hum, harmonic"),
    ("/x/high_tone", "High tone"),
    ("/x/noise_band", "Hiss, band noise"),
    ("/x/clicks", "Clicks"),
    ("/x/chirp_up", "Rising chirp"),
    ("/x/chirp_down", "Falling chirp"),
    ("/x/beeps", "Beeps"),
    ("/x/rumble", "Rumble"),
]

# file layout, format, soundfile subtype, sample rate, channels: cycled over the clips.
_VARIANTS = [
    ("Y{ytid}.wav", "WAV", "PCM_16", 32000, 1),
    ("{ytid}.flac", "FLAC", "PCM_16", 44100, 2),
    ("{ytid}_{start}.ogg", "OGG", "VORBIS", 48000, 2),
    ("Y{ytid}.mp3", "MP3", None, 44100, 1),
    ("{ytid}_{start_ms}_{end_ms}.wav", "WAV", "FLOAT", 16000, 1),
    ("nested/{ytid}.flac", "FLAC", "PCM_24", 32000, 2),
]
_DURATIONS = [10.0, 10.0, 8.0, 10.0, 12.0]  # seconds; AudioSet has short and long clips


@dataclass
class MiniAudioSet:
    """Paths of a generated dataset and what the generator knows about it."""

    root: Path
    labels_csv: Path
    segments: dict[str, Path]  # split name -> segment CSV
    audio_dir: Path
    class_names: list[str]
    broken: dict[str, str] = field(default_factory=dict)  # ytid -> "corrupt" | "empty" | "missing"


def _ytid(rng: np.random.Generator, used: set[str]) -> str:
    alphabet = string.ascii_letters + string.digits + "-_"
    while True:
        ytid = "".join(rng.choice(list(alphabet), size=11))
        if ytid not in used:
            used.add(ytid)
            return ytid


def _envelope(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """A random on-span of 2 s to the whole clip, with 20 ms fades."""
    length = int(rng.uniform(2.0, n / sr) * sr)
    start = int(rng.integers(0, n - length + 1))
    env = np.zeros(n, np.float32)
    env[start : start + length] = 1.0
    fade = min(int(0.02 * sr), length // 2)
    if fade > 0:
        ramp = np.linspace(0, 1, fade, dtype=np.float32)
        env[start : start + fade] *= ramp
        env[start + length - fade : start + length] *= ramp[::-1]
    return env


def _bandpass_noise(n: int, sr: int, lo: float, hi: float, rng: np.random.Generator) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    spec[(freqs < lo) | (freqs > hi)] = 0
    x = np.fft.irfft(spec, n)
    return (x / (np.abs(x).max() + 1e-9)).astype(np.float32)


def _class_signal(c: int, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n, dtype=np.float64) / sr
    if c == 0:  # harmonic hum around 200 Hz
        f0 = rng.uniform(180, 240)
        x = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 5))
    elif c == 1:  # steady high tone
        x = np.sin(2 * np.pi * rng.uniform(3000, 4000) * t)
    elif c == 2:  # band noise 5-7 kHz
        return _bandpass_noise(n, sr, 5000, 7000, rng)
    elif c == 3:  # click train
        x = np.zeros(n)
        period = int(sr / rng.uniform(4, 10))
        x[:: max(period, 1)] = 1.0
        x = np.convolve(x, np.hanning(32), mode="same")
    elif c in (4, 5):  # 1 s chirps, repeated
        seg = t % 1.0
        f_lo, f_hi = 500.0, 6000.0
        k = (f_hi - f_lo) if c == 4 else -(f_hi - f_lo)
        f_start = f_lo if c == 4 else f_hi
        x = np.sin(2 * np.pi * (f_start * seg + 0.5 * k * seg**2))
    elif c == 6:  # 1 kHz beeps, 100 ms on / 200 ms off
        x = np.sin(2 * np.pi * 1000 * t) * ((t % 0.3) < 0.1)
    else:  # rumble: noise under 150 Hz
        return _bandpass_noise(n, sr, 30, 150, rng)
    x = np.asarray(x, np.float64)
    return (x / (np.abs(x).max() + 1e-9)).astype(np.float32)


def synthesize_clip(classes: list[int], seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Mono float32 clip (N,) containing the given classes over a faint noise floor."""
    n = int(seconds * sr)
    x = 0.003 * rng.standard_normal(n).astype(np.float32)
    for c in classes:
        x += rng.uniform(0.15, 0.3) * _class_signal(c, n, sr, rng) * _envelope(n, sr, rng)
    return np.clip(x, -1.0, 1.0)


def synthesize_events(events: list[tuple[int, float, float]], seconds: float, sr: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Mono float32 (N,): the faint noise floor with each ``(class, onset s, offset s)`` sound
    where it is listed (20 ms fades), for checking event times against known ones."""
    n = int(seconds * sr)
    x = 0.003 * rng.standard_normal(n).astype(np.float32)
    for c, onset, offset in events:
        a, b = int(onset * sr), min(n, int(offset * sr))
        env = np.zeros(n, np.float32)
        env[a:b] = 1.0
        fade = min(int(0.02 * sr), (b - a) // 2)
        if fade > 0:
            ramp = np.linspace(0, 1, fade, dtype=np.float32)
            env[a : a + fade] *= ramp
            env[b - fade : b] *= ramp[::-1]
        x += 0.25 * _class_signal(c, n, sr, rng) * env
    return np.clip(x, -1.0, 1.0)


def _draw_labels(rng: np.random.Generator, num_classes: int) -> list[int]:
    k = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    return sorted(int(c) for c in rng.choice(num_classes, size=k, replace=False))


def write_class_index(path: Path) -> None:
    with open(path, "w", newline="") as f:
        f.write("index,mid,display_name\n")
        for i, (mid, name) in enumerate(CLASSES):
            f.write(f'{i},{mid},"{name}"\n')


def _write_segments(path: Path, rows: list[tuple[str, float, float, list[str]]]) -> None:
    labels = {m for r in rows for m in r[3]}
    n_pos = sum(len(r[3]) for r in rows)
    with open(path, "w", newline="") as f:
        f.write("# Segments csv created by audioset_dcls.synthetic\n")
        f.write(f"# num_ytids={len(rows)}, num_segs={len(rows)}, num_unique_labels={len(labels)}, "
                f"num_positive_labels={n_pos}\n")
        f.write("# YTID, start_seconds, end_seconds, positive_labels\n")
        for ytid, start, end, mids in rows:
            f.write(f'{ytid}, {start:.3f}, {end:.3f}, "{",".join(mids)}"\n')


def make_mini_audioset(
    root: str | Path,
    *,
    num_train: int = 240,
    num_eval: int = 80,
    seed: int = 0,
    broken: bool = True,
) -> MiniAudioSet:
    """Write a mini AudioSet under ``root`` (created) and return its paths.

    ``num_train`` clips go to ``balanced_train_segments.csv``, ``num_eval`` to
    ``eval_segments.csv``. With ``broken=True`` the train split also lists one corrupt, one
    empty and one missing clip (on top of ``num_train`` good ones).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    audio_dir = root / "audio"
    root.mkdir(parents=True, exist_ok=True)
    labels_csv = root / "class_labels_indices.csv"
    write_class_index(labels_csv)
    used: set[str] = set()
    ds = MiniAudioSet(
        root=root, labels_csv=labels_csv, segments={}, audio_dir=audio_dir,
        class_names=[name for _, name in CLASSES],
    )
    clip_no = 0
    for split, count, csv_name in [("train", num_train, "balanced_train_segments.csv"),
                                   ("eval", num_eval, "eval_segments.csv")]:
        rows = []
        for _ in range(count):
            ytid = _ytid(rng, used)
            start = float(rng.integers(0, 30)) * 10.0
            layout, fmt, subtype, sr, channels = _VARIANTS[clip_no % len(_VARIANTS)]
            seconds = _DURATIONS[clip_no % len(_DURATIONS)]
            clip_no += 1
            classes = _draw_labels(rng, len(CLASSES))
            mono = synthesize_clip(classes, seconds, sr, rng)
            data = np.stack([mono, mono * 0.8], axis=1) if channels == 2 else mono
            name = layout.format(ytid=ytid, start=int(start), start_ms=int(start * 1000),
                                 end_ms=int((start + 10) * 1000))
            path = audio_dir / split / name
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(path), data, sr, format=fmt, subtype=subtype)
            rows.append((ytid, start, start + 10.0, [CLASSES[c][0] for c in classes]))
        if broken and split == "train":
            for kind in ("corrupt", "empty", "missing"):
                ytid = _ytid(rng, used)
                rows.append((ytid, 0.0, 10.0, [CLASSES[int(rng.integers(len(CLASSES)))][0]]))
                ds.broken[ytid] = kind
                path = audio_dir / split / f"Y{ytid}.flac"
                if kind == "corrupt":
                    path.write_bytes(b"fLaC" + rng.bytes(2048))
                elif kind == "empty":
                    path.write_bytes(b"")
        order = rng.permutation(len(rows))
        seg_path = root / csv_name
        _write_segments(seg_path, [rows[i] for i in order])
        ds.segments[split] = seg_path
    return ds


# Your own labelled audio, ESC-50 style: single-label classes of their own names (made of some of
# the sounds above), 5 s clips. name -> index in CLASSES of the sound it is made of.
OWN_CLASSES: dict[str, int] = {"alarm": 6, "clicks": 3, "hum": 0, "siren": 4, "whistle": 1}


@dataclass
class OwnDataset:
    """Paths of a generated own-label dataset (``make_own_dataset``)."""

    root: Path
    class_folders: Path  # <class>/<file>, one folder per class
    folds: list[Path]  # list CSVs (path,labels,start,end), one per fold
    class_names: list[str]
    broken: list[Path] = field(default_factory=list)


def make_own_dataset(root: str | Path, *, per_class: int = 8, folds: int = 2, seconds: float = 5.0,
                     seed: int = 0, broken: bool = True) -> OwnDataset:
    """Write a small single-label dataset of its own label names, as users bring theirs.

    ``root/clips/<class>/<n>.wav|flac``: ``per_class`` clips of ``seconds`` per class (sample
    rates 16-48 kHz, mono and stereo); ``root/recordings/long-<k>.flac``: one longer recording per
    fold of three 4 s events, cut by ``start,end`` in the lists; ``root/folds/fold<k>.csv``:
    ``path,labels,start,end`` (paths relative to the CSV), clip ``n`` in fold ``n % folds + 1``.
    With ``broken``, ``clips/hum/broken.wav`` is corrupt (listed in fold 1) and a ``notes.txt``
    lies among the clips (not audio: ignored).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    clips, fold_dir = root / "clips", root / "folds"
    rows: list[list[list[str]]] = [[] for _ in range(folds)]
    variants = [("wav", "WAV", "PCM_16", 16000, 1), ("flac", "FLAC", "PCM_16", 44100, 2),
                ("wav", "WAV", "FLOAT", 32000, 1), ("flac", "FLAC", "PCM_24", 48000, 1)]
    for name, sound in OWN_CLASSES.items():
        (clips / name).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            ext, fmt, subtype, sr, channels = variants[n % len(variants)]
            mono = synthesize_clip([sound], seconds, sr, rng)
            data = np.stack([mono, mono * 0.8], axis=1) if channels == 2 else mono
            path = clips / name / f"{n:03d}.{ext}"
            sf.write(str(path), data, sr, format=fmt, subtype=subtype)
            rows[n % folds].append([f"../clips/{name}/{path.name}", name, "", ""])
    (root / "recordings").mkdir(parents=True, exist_ok=True)
    names = list(OWN_CLASSES)
    for k in range(folds):
        events = [names[int(i)] for i in rng.choice(len(names), size=3, replace=False)]
        sr = 32000
        wave = np.concatenate([synthesize_clip([OWN_CLASSES[e]], 4.0, sr, rng) for e in events])
        sf.write(str(root / "recordings" / f"long-{k + 1}.flac"), wave, sr)
        rows[k] += [[f"../recordings/long-{k + 1}.flac", e, f"{4.0 * i:g}", f"{4.0 * (i + 1):g}"]
                    for i, e in enumerate(events)]
    ds = OwnDataset(root=root, class_folders=clips, folds=[], class_names=sorted(OWN_CLASSES))
    if broken:
        bad = clips / "hum" / "broken.wav"
        bad.write_bytes(b"RIFF" + rng.bytes(1024))
        (clips / "alarm" / "notes.txt").write_text("recorded with a phone, 2026\n")
        rows[0].append(["../clips/hum/broken.wav", "hum", "", ""])
        ds.broken.append(bad)
    fold_dir.mkdir(parents=True, exist_ok=True)
    for k in range(folds):
        path = fold_dir / f"fold{k + 1}.csv"
        with open(path, "w", newline="") as f:
            f.write("path,labels,start,end\n")
            f.writelines(",".join(r) + "\n" for r in rows[k])
        ds.folds.append(path)
    return ds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="directory to write the dataset into")
    p.add_argument("--train", type=int, default=240, help="number of training clips")
    p.add_argument("--eval", type=int, default=80, help="number of evaluation clips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-broken", action="store_true", help="do not add corrupt/empty/missing clips")
    p.add_argument("--own", action="store_true",
                   help="write a small single-label dataset of its own label names instead (class folders + "
                        "fold lists, as for fine-tuning); --train is then clips per class")
    p.add_argument("--folds", type=int, default=2, help="with --own: number of fold lists")
    args = p.parse_args(argv)
    if args.own:
        own = make_own_dataset(args.out, per_class=args.train, folds=args.folds, seed=args.seed,
                               broken=not args.no_broken)
        print(f"wrote {args.train} clips per class of {', '.join(own.class_names)} to {own.class_folders}")
        print(f"  fold lists: {' '.join(map(str, own.folds))}")
        if own.broken:
            print(f"  broken on purpose: {', '.join(map(str, own.broken))}")
        return
    ds = make_mini_audioset(args.out, num_train=args.train, num_eval=args.eval, seed=args.seed,
                            broken=not args.no_broken)
    print(f"wrote {args.train} train + {args.eval} eval clips, {len(CLASSES)} classes, to {ds.root}")
    for split, path in ds.segments.items():
        print(f"  {split:5s} segments: {path}")
    print(f"  labels: {ds.labels_csv}\n  audio:  {ds.audio_dir}")
    if ds.broken:
        print(f"  broken on purpose: {', '.join(f'{k} ({v})' for k, v in ds.broken.items())}")


if __name__ == "__main__":
    main()
