"""Tagging: checkpoint -> Tagger -> scores over 10 s windows -> tags, events, outputs.

``tagger`` (the model over windows of files, arrays and live audio), ``windows`` (the windowing
rule), ``results`` (what a tag run gives back), ``events`` (window scores -> sound events),
``outputs`` (every output format), ``inputs`` (files, folders, lists), ``plot``, ``export``
(ONNX) and ``cli`` (``infer.py``).
"""

from __future__ import annotations

__all__ = ["Tagger", "TagResult", "TagFailure"]


def __getattr__(name: str):  # lazy: `python infer.py --help` imports no torch
    if name == "Tagger":
        from .tagger import Tagger

        return Tagger
    if name in ("TagResult", "TagFailure"):
        from . import results

        return getattr(results, name)
    raise AttributeError(f"module 'audioset_dcls.tagging' has no attribute {name!r}")
