"""Where a build's clips and labels come from: AudioSet segment lists and a folder of audio.

``read_clips`` gives the label set, the clips in input order and the input rows left out;
``file_finder`` gives each clip's audio file. The rest of the builder (plan, workers, writer,
manifest) sees only these, whatever the inputs were.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..labels import (
    DroppedRow,
    LabelSet,
    Segment,
    index_audio_dir,
    read_label_set,
    read_segment_files,
    resolve_pattern,
)
from .plan import BuildError, BuildOptions

__all__ = ["ClipList", "read_clips", "file_finder"]


@dataclass
class ClipList:
    """The clips of a build in input order, their label space, and the input rows left out."""

    labels: LabelSet
    clips: list[Segment]
    dropped: list[DroppedRow] = field(default_factory=list)


def read_clips(opts: BuildOptions) -> ClipList:
    """The segment rows of ``opts.segments`` (duplicates removed), labelled with ``opts.labels``.

    Raises LabelError (one line, naming the file and line) for malformed inputs, BuildError when
    no segment is left.
    """
    labels = read_label_set(opts.labels)
    segs = read_segment_files(opts.segments, labels, unknown_mids=opts.unknown_mids)
    if len(segs) == 0:
        raise BuildError(f"no segments in {', '.join(map(str, opts.segments))}")
    return ClipList(labels, segs.segments, segs.dropped)


def file_finder(opts: BuildOptions, clips: Sequence[Segment]) -> Callable[[Segment], str | None]:
    """clip -> path string or None, by ``opts.pattern`` or by a recursive index of the audio
    folder (built only when ``clips`` is not empty: resuming a finished build reads no folder)."""
    if opts.pattern:
        return lambda seg: str(resolve_pattern(opts.pattern, opts.audio_dir, seg))
    if not clips:
        return lambda seg: None
    index = index_audio_dir(opts.audio_dir)
    if opts.progress:
        print(f"indexed {index.num_files} audio files under {opts.audio_dir}", file=sys.stderr)

    def find(seg: Segment) -> str | None:
        path, _ = index.find(seg)
        return None if path is None else str(path)

    return find
