"""Every way tags and events are written, from the same records.

A *record* is the JSON-ready dict of one result (:func:`result_record`), one failure
(:func:`failure_record`) or one live window (:func:`window_record`); every format is built from
them or from the same :class:`~.results.Tag` / :class:`~.events.Event` lists:

=========  ==================================================================================
format     what
=========  ==================================================================================
table      readable lines per input (top tags, tags over time, events)
json       one document ``{header..., "results": [record, ...]}``, written as results come
jsonl      one record per line
csv        long format, one row per tag (``CSV_COLUMNS``), or per event (``EVENT_CSV_COLUMNS``)
audacity   the events of one input as an Audacity label track
=========  ==================================================================================

Writers take an :class:`OutputOptions` (top-k, threshold, per-window, events), never a command
line; :func:`open_writer` picks one by format name. A new format is one class here.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from typing import IO, Any, Sequence

from .events import Event
from .results import Tag, TagFailure, TagResult, Threshold

__all__ = [
    "FORMATS",
    "CSV_COLUMNS",
    "EVENT_CSV_COLUMNS",
    "OutputOptions",
    "format_time",
    "result_record",
    "failure_record",
    "window_record",
    "end_record",
    "events_table",
    "audacity_labels",
    "open_writer",
]

FORMATS = ("table", "json", "jsonl", "csv", "audacity")
CSV_COLUMNS = ["path", "window", "start", "end", "rank", "index", "mid", "name", "score"]
EVENT_CSV_COLUMNS = ["path", "onset", "offset", "index", "mid", "name", "peak", "mean"]


@dataclass(frozen=True)
class OutputOptions:
    """What goes into each output. ``top_k <= 0``: every class; ``threshold``: one number or (C,)
    per class (tags below it are left out); ``events``: events are written (and, in CSV, replace
    the tag rows)."""

    top_k: int = 10
    threshold: Threshold | None = None
    per_window: bool = False
    events: bool = False


def format_time(seconds: float) -> str:
    """``m:ss.s`` (``h:mm:ss.s`` from an hour on)."""
    m, s = divmod(float(seconds), 60.0)
    h, m = divmod(int(m), 60)
    return f"{h}:{m:02d}:{s:04.1f}" if h else f"{m}:{s:04.1f}"


# ------------------------------------------------------------------------------------ records


def _tags(tags: Sequence[Tag]) -> list[dict[str, Any]]:
    return [t.to_dict() for t in tags]


def result_record(result: TagResult, options: OutputOptions, events: Sequence[Event] | None = None) -> dict[str, Any]:
    """``{path, duration, num_windows, aggregate, tags[, warning][, windows][, events]}``."""
    k, th = options.top_k, options.threshold
    d: dict[str, Any] = {"path": result.source, "duration": round(result.duration, 4),
                         "num_windows": result.num_windows, "aggregate": result.aggregate,
                         "tags": _tags(result.top(k, th))}
    if result.warning:
        d["warning"] = result.warning
    if options.per_window:
        d["windows"] = [{"start": round(float(s), 4), "end": round(float(e), 4), "tags": _tags(result.window_top(i, k, th))}
                        for i, (s, e) in enumerate(zip(result.starts, result.ends))]
    if events is not None:
        d["events"] = [e.to_dict() for e in events]
    return d


def failure_record(failure: TagFailure) -> dict[str, Any]:
    """``{path, error, kind}``."""
    return {"path": failure.source, "error": failure.reason, "kind": failure.kind}


def window_record(index: int, start: float, end: float, tags: Sequence[Tag],
                  events: Sequence[Event] | None = None) -> dict[str, Any]:
    """One live window: ``{window, start, end, tags[, events]}`` (the events that closed with it)."""
    d: dict[str, Any] = {"window": index, "start": round(start, 4), "end": round(end, 4), "tags": _tags(tags)}
    if events is not None:
        d["events"] = [e.to_dict() for e in events]
    return d


def end_record(duration: float, num_windows: int, events: Sequence[Event] | None = None) -> dict[str, Any]:
    """The last live line: ``{end_of_input: true, duration, num_windows[, events]}``."""
    d: dict[str, Any] = {"end_of_input": True, "duration": round(duration, 4), "num_windows": num_windows}
    if events is not None:
        d["events"] = [e.to_dict() for e in events]
    return d


def _record(result: TagResult | TagFailure, options: OutputOptions, events: Sequence[Event] | None) -> dict[str, Any]:
    return result_record(result, options, events) if result.ok else failure_record(result)


# --------------------------------------------------------------------------------- event text


def events_table(events: Sequence[Event]) -> list[str]:
    """Readable lines, one per event: ``  0:15.0-0:25.0  High tone  peak 0.93 mean 0.81``."""
    if not events:
        return ["  (no events)"]
    width = max(len(e.name) for e in events)
    return [f"  {format_time(e.onset):>8}-{format_time(e.offset):<8}  {e.name:<{width}}  "
            f"peak {e.peak:.2f} mean {e.mean:.2f}" for e in events]


def audacity_labels(events: Sequence[Event], stream: IO[str]) -> None:
    """An Audacity label track (File > Import > Labels): ``onset<TAB>offset<TAB>label`` per line."""
    w = csv.writer(stream, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONE, escapechar="\\")
    for e in events:
        w.writerow([f"{e.onset:.6f}", f"{e.offset:.6f}", e.name.replace("\t", " ")])


# ------------------------------------------------------------------------------------ writers


class Writer:
    """Writes results one by one as they come (``write``), then ``close``. Failures are written
    only by the formats that carry them (JSON, JSONL); the others leave them to stderr."""

    def __init__(self, stream: IO[str], options: OutputOptions, header: dict[str, Any]):
        self.stream, self.options, self.header = stream, options, header

    def write(self, result: TagResult | TagFailure, events: Sequence[Event] | None = None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TableWriter(Writer):
    """Readable per-file table; per-window lines show the top 3 tags of each window."""

    def write(self, result: TagResult | TagFailure, events: Sequence[Event] | None = None) -> None:
        if not result.ok:
            return
        o = self.options
        lines = [f"{result.source}  ({result.duration:.1f} s, {result.num_windows} window"
                 f"{'s' if result.num_windows != 1 else ''}, {result.aggregate} over windows)"]
        tags = result.top(o.top_k, o.threshold)
        width = max([len(t.name) for t in tags] + [4])
        lines += [f"  {rank:>3}  {t.score:6.3f}  {t.name:<{width}}  {t.mid}" for rank, t in enumerate(tags, 1)]
        if not tags:
            lines.append("  (no tag above the threshold)")
        if o.per_window:
            lines.append("  tags over time:")
            for i in range(result.num_windows):
                wt = result.window_top(i, min(3, o.top_k) if o.top_k > 0 else 3, o.threshold)
                span = f"{format_time(result.starts[i])}-{format_time(result.ends[i])}"
                lines.append(f"    {span:>17}  " + (", ".join(f"{t.name} {t.score:.2f}" for t in wt) or "-"))
        if events is not None:
            lines += ["  events:"] + ["  " + line for line in events_table(events)]
        self.stream.write("\n".join(lines) + "\n\n")
        self.stream.flush()


class JsonLinesWriter(Writer):
    """One record per input and line."""

    def write(self, result: TagResult | TagFailure, events: Sequence[Event] | None = None) -> None:
        self.stream.write(json.dumps(_record(result, self.options, events)) + "\n")
        self.stream.flush()


class JsonWriter(Writer):
    """One JSON document ``{header..., "results": [...]}``, written incrementally."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        head = json.dumps(self.header, indent=1)[:-2]  # drop the closing "\n}"
        self.stream.write(head + ',\n "results": [')
        self.first = True

    def write(self, result: TagResult | TagFailure, events: Sequence[Event] | None = None) -> None:
        self.stream.write(("\n  " if self.first else ",\n  ") + json.dumps(_record(result, self.options, events)))
        self.first = False

    def close(self) -> None:
        self.stream.write("\n ]\n}\n")


class CsvWriter(Writer):
    """Long format, one row per tag (``CSV_COLUMNS``: window is "clip" or 0..W-1); with events,
    one row per event instead (``EVENT_CSV_COLUMNS``)."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.csv = csv.writer(self.stream, lineterminator="\n")
        self.csv.writerow(EVENT_CSV_COLUMNS if self.options.events else CSV_COLUMNS)

    def write(self, result: TagResult | TagFailure, events: Sequence[Event] | None = None) -> None:
        if not result.ok:
            return
        if events is not None:
            self.csv.writerows([result.source, f"{e.onset:.3f}", f"{e.offset:.3f}", e.index, e.mid, e.name,
                                f"{e.peak:.6f}", f"{e.mean:.6f}"] for e in events)
        else:
            self._tag_rows(result)
        self.stream.flush()

    def _tag_rows(self, result: TagResult) -> None:
        o = self.options
        for rank, t in enumerate(result.top(o.top_k, o.threshold), 1):
            self.csv.writerow([result.source, "clip", 0.0, round(result.duration, 4), rank, t.index, t.mid,
                               t.name, f"{t.score:.6f}"])
        for i in range(result.num_windows) if o.per_window else ():
            for rank, t in enumerate(result.window_top(i, o.top_k, o.threshold), 1):
                self.csv.writerow([result.source, i, round(float(result.starts[i]), 4),
                                   round(float(result.ends[i]), 4), rank, t.index, t.mid, t.name, f"{t.score:.6f}"])


class AudacityWriter(Writer):
    """The events of one input as an Audacity label track."""

    def write(self, result: TagResult | TagFailure, events: Sequence[Event] | None = None) -> None:
        if result.ok and events is not None:
            audacity_labels(events, self.stream)
            self.stream.flush()


_WRITERS: dict[str, type[Writer]] = {"table": TableWriter, "json": JsonWriter, "jsonl": JsonLinesWriter,
                                     "csv": CsvWriter, "audacity": AudacityWriter}


def open_writer(fmt: str, stream: IO[str], options: OutputOptions, header: dict[str, Any] | None = None) -> Writer:
    """The writer of format ``fmt`` (one of :data:`FORMATS`) on ``stream``; ``header`` (model,
    settings) heads the JSON document."""
    if fmt not in _WRITERS:
        raise ValueError(f"unknown output format {fmt!r}; one of {', '.join(FORMATS)}")
    return _WRITERS[fmt](stream, options, header or {})
