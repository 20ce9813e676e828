"""A small real labelled set for fine-tuning measurements: ten classes of recorded drum and
percussion hits from Debian's freely licensed drum-kit packages, cut into 5 s clips, ESC-50-like
(single label, a few hundred clips, folds that never share a source recording).

    python benchmarks/real_clips.py --out /tmp/real --per-class 40 --folds 5

Sources (Debian packages, fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``
into ``--cache``; an installed copy under /usr/share is used as is):

- ``hydrogen-drumkits`` (GPL-2 / GPL-2+ kits, Audiophob CC0, ColomboAcousticDrumkit GPL-2+ with
  a composition exception; per kit in /usr/share/doc/hydrogen-drumkits/copyright. ForzeeStereo,
  ColomboAcousticDrumkit, Millo_MultiLayered2/3 are recorded acoustic kits; rumpf_kit's
  CC-BY-3.0 loops are not used);
- ``hydrogen-data`` (GPL-2+: GMRockKit, TR808EmulationKit);
- ``lmms-common`` (GPL-2+: /usr/share/lmms/samples/drums).

The audio is not in the repository: this script rebuilds the same set (seeded) on any Debian/
Ubuntu machine with those packages available. Each source file is one recording of one hit; its
class comes from its file name (``CLASSES``: regular expressions, first match wins; names that
match none, or two kinds at once such as "CrashRide", are left out). Every source file is
assigned to one fold (by a hash of its path), so train and eval clips never share a recording.
A clip is 5 s at 32 kHz: 1-6 hits of its class drawn from its fold's files, each at a random
onset, level (-18..0 dB) and playback rate (0.85-1.15, which also shifts pitch, as a drummer's
tuning does), in a random room (reverb) over a pink/brown noise bed at 15-40 dB below the hits.
Writes ``<out>/clips/<class>/*.wav``, ``<out>/folds/foldK.csv`` (``path,labels``) and
``<out>/sources.json`` (every source file by class and fold).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clips import _colored_noise, _reverb  # noqa: E402

PACKAGES = ("hydrogen-drumkits", "hydrogen-data", "lmms-common")
ROOTS = ("hydrogen/data/drumkits", "lmms/samples/drums")  # under usr/share
SR = 32000
# class -> file-name pattern (lower case, path under the kit); first match wins.
CLASSES = {
    "clap": r"clap",
    "cowbell": r"cowbell|agogo|tambourine|shaker|mc_cb|clave|clav\d|(^|/)bell-",
    "rimshot": r"rim|sidestick|stick|/rs[_\d.]|/sr[_\d.]",
    "crash": r"crash|splash|china|/cc[_\d.]|cymbal",
    "ride": r"ride|/rc[_\d.]",
    "hihat_open": r"hat.?op|hihat.?open|hhopen|openhat|ohh|/ho[_\d.]|hat_ring",
    "hihat_closed": r"hat.?cl|hihat.?closed|hhclosed|closehihat|chh|/hh[_\d.]|hat.?pedal|hhpedal|pedalhihat|hihatfoot|hihat_foot|hh_p",
    "tom": r"tom|/ft[_\d.]|/t[12][_\d.]|conga",
    "snare": r"snare|/sd[_\d.]|/jsnare|/rsnare",
    "kick": r"kick|bassdrum|/bd[_\d.]|bass_drum",
}
AMBIGUOUS = r"crashride|emptysample|beats_\d|nasty"
AUDIO = (".wav", ".flac", ".ogg")


def find_sources(cache: Path) -> Path:
    """usr/share holding the packages' samples: the installed one, else unpacked into ``cache``."""
    if all((Path("/usr/share") / r).is_dir() for r in ROOTS) and any(Path("/usr/share/hydrogen/data/drumkits").glob("Forzee*")):
        return Path("/usr/share")
    share = cache / "usr" / "share"
    if all((share / r).is_dir() for r in ROOTS):
        return share
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=cache, check=True)
    for deb in sorted(cache.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(cache)], check=True)
    return share


def classify(rel: str) -> str | None:
    name = "/" + rel.lower().replace(" ", "_")
    if re.search(AMBIGUOUS, name):
        return None
    base = "/" + name.rsplit("/", 1)[-1]
    for cls, pattern in CLASSES.items():
        if re.search(pattern, base):
            return cls
    return None


def fold_of(rel: str, folds: int) -> int:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % folds


def load(path: Path) -> np.ndarray | None:
    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception:  # noqa: BLE001: an unreadable sample is left out
        return None
    x = x.mean(axis=1)
    if sr != SR:
        x = soxr.resample(x, sr, SR)
    x = x[: 3 * SR]  # a hit's first 3 s
    peak = np.abs(x).max()
    return x / peak if peak > 1e-4 else None


def make_clip(rng: np.random.Generator, hits: list[np.ndarray], seconds: float) -> np.ndarray:
    n = int(seconds * SR)
    out = np.zeros(n, np.float32)
    for _ in range(int(rng.integers(1, 7))):
        h = hits[int(rng.integers(len(hits)))]
        rate = rng.uniform(0.85, 1.15)
        h = soxr.resample(h, SR, int(SR / rate)) if abs(rate - 1) > 0.01 else h
        at = int(rng.integers(0, n - min(len(h), n // 4)))
        seg = h[: n - at] * 10 ** (rng.uniform(-18, 0) / 20)
        out[at: at + len(seg)] += seg
    if rng.random() < 0.7:
        out = _reverb(rng, out, SR, rt60=rng.uniform(0.2, 1.2), wet=rng.uniform(0.1, 0.5))[:n]
    bed = _colored_noise(rng, n, rng.choice([1.0, 2.0]))
    rms = np.sqrt(np.mean(out ** 2)) + 1e-9
    bed *= rms * 10 ** (-rng.uniform(15, 40) / 20) / (np.sqrt(np.mean(bed ** 2)) + 1e-9)
    out = out + bed
    return (out / (np.abs(out).max() + 1e-9) * 10 ** (rng.uniform(-12, -1) / 20)).astype(np.float32)


def build(out: Path, per_class: int, folds: int, seconds: float, seed: int, cache: Path) -> dict:
    share = find_sources(cache)
    sources: dict[str, list[list[str]]] = {c: [[] for _ in range(folds)] for c in CLASSES}
    for root in ROOTS:
        for p in sorted((share / root).rglob("*")):
            rel = str(p.relative_to(share))
            cls = classify(str(p.relative_to(share / root))) if p.suffix.lower() in AUDIO else None
            if cls:
                sources[cls][fold_of(rel, folds)].append(rel)
    rng = np.random.default_rng(seed)
    rows: list[list[str]] = [[] for _ in range(folds)]
    for cls, by_fold in sources.items():
        for k, files in enumerate(by_fold):
            hits = [h for h in (load(share / f) for f in files) if h is not None]
            if not hits:
                raise SystemExit(f"class {cls}: no readable source file in fold {k + 1}; use fewer --folds")
            for i in range(per_class // folds):
                path = out / "clips" / cls / f"{cls}_f{k + 1}_{i:03d}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(str(path), make_clip(rng, hits, seconds), SR, subtype="PCM_16")
                rows[k].append(f"{path.relative_to(out)},{cls}")
    (out / "folds").mkdir(parents=True, exist_ok=True)
    for k, r in enumerate(rows):
        (out / "folds" / f"fold{k + 1}.csv").write_text("path,labels\n" + "\n".join(f"../{x}" for x in r) + "\n")
    summary = {"packages": PACKAGES, "share": str(share), "classes": list(CLASSES), "folds": folds,
               "clips_per_fold": [len(r) for r in rows],
               "source_files": {c: [len(f) for f in v] for c, v in sources.items()}, "sources": sources}
    (out / "sources.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--per-class", type=int, default=40, help="clips per class over all folds")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "audioset_dcls" / "real_clips_debs")
    a = p.parse_args(argv)
    s = build(a.out, a.per_class, a.folds, a.seconds, a.seed, a.cache)
    print(f"{sum(s['clips_per_fold'])} clips of {len(s['classes'])} classes in {a.folds} folds under {a.out}; "
          f"source files per class and fold: {json.dumps(s['source_files'])}")


if __name__ == "__main__":
    main()
