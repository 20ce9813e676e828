"""Builders shared by the tagging, CLI and export tests: a random tiny checkpoint and real audio
files written by soundfile (not collected by pytest: no ``test_`` prefix)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from audioset_dcls.hub.checkpoint import CheckpointInfo, save_inference_checkpoint
from audioset_dcls.models import create_model
from audioset_dcls.synthetic import CLASSES, synthesize_clip

TINY_MODEL = "convnext_atto_dcls"
LABELS = [{"index": i, "mid": mid, "name": name} for i, (mid, name) in enumerate(CLASSES)]
LABEL_NAMES = [name for _, name in CLASSES]

# name, format, subtype, rate, channels, seconds: the formats and layouts users bring.
AUDIO_VARIANTS = [
    ("mono32k.wav", "WAV", "PCM_16", 32000, 1, 10.0),
    ("stereo44k.flac", "FLAC", "PCM_16", 44100, 2, 12.0),
    ("stereo48k.ogg", "OGG", "VORBIS", 48000, 2, 8.0),
    ("mono44k.mp3", "MP3", None, 44100, 1, 10.0),
    ("short16k.wav", "WAV", "FLOAT", 16000, 1, 3.0),
]


def write_checkpoint(path: Path, model_name: str = TINY_MODEL, seed: int = 0, favour: int | None = None,
                     labels: list[dict] | None = None) -> Path:
    """A random-weight checkpoint with the synthetic classes' label names (or ``labels``).

    ``favour=i`` sets the classifier bias to +10 for class i and -10 for the others, so the
    top tag of any input is known: a check of the index -> label mapping end to end."""
    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=len(CLASSES))
    if favour is not None:
        with torch.no_grad():
            bias = model.get_classifier().bias
            bias.fill_(-10.0)
            bias[favour] = 10.0
    # Random DCLS positions spread the Gaussians over the kernel, so baked and unbaked forms
    # are compared on non-trivial kernels, not on the near-centre init.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("positions"):
                p.uniform_(-8, 8)
    info = CheckpointInfo(model_name=model_name, num_classes=len(CLASSES), labels=labels or LABELS,
                          extra={"note": "random weights, for tests"})
    return save_inference_checkpoint(path, model.state_dict(), info)


def write_audio(path: Path, seconds: float, sr: int = 44100, channels: int = 1, fmt: str | None = None,
                subtype: str | None = None, classes: tuple[int, ...] = (0, 3), seed: int = 0) -> Path:
    """A synthetic clip of the given classes written as a real audio file."""
    rng = np.random.default_rng(seed)
    mono = synthesize_clip(list(classes), seconds, sr, rng)
    data = np.stack([mono, 0.7 * mono], axis=1) if channels == 2 else mono
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, sr, format=fmt, subtype=subtype)
    return path


def write_variants(folder: Path) -> list[Path]:
    """One file per entry of AUDIO_VARIANTS under ``folder``."""
    return [write_audio(folder / name, seconds, sr, ch, fmt, sub, seed=i)
            for i, (name, fmt, sub, sr, ch, seconds) in enumerate(AUDIO_VARIANTS)]
