"""Tag audio of any length with an inference checkpoint: files, arrays, many files at once.

The tagger uses only what the checkpoint says about itself (``checkpoint.CheckpointInfo``): the
model, the front-end settings, the normalisation and the label names. DCLS layers are baked into
plain depthwise convolutions (``checkpoint.load_model(bake=True)``).

Long audio is cut into 10 s windows (the training clip length) every ``hop_seconds``:

* windows start at 0, hop, 2*hop, ... as long as they end inside the audio;
* if the last of those ends before the audio does, one more window is added that **ends exactly
  at the end of the audio** (it starts at ``duration - 10 s``), so every window is full of real
  audio and the tail is never scored on mostly padding;
* audio of 10 s or less gives one window, zero-padded at the end exactly like in training
  (``features.pad_or_trim``).

See :func:`window_starts`. A 35 s file with hop 5 s gives 6 windows (0-10, ..., 25-35); a 37 s file
gives 7 (0-10, ..., 25-35, 27-37).

Files are streamed: read in blocks (``soundfile``), downmixed, resampled with a streaming soxr
resampler (its output does not depend on the block size and equals ``soxr.resample`` of the
whole signal), and cut into windows on the fly, so memory stays bounded for hours of audio.
Each window's log-mel is the same as ``features.compute_logmel`` of that stretch of the fully
decoded signal. Formats that need ffmpeg (m4a, opus, ...) are decoded whole.

Windows of consecutive files share batches, so a folder of short clips runs at full batch size.

``TagResult.events`` turns a file's window scores into sound events (``audioset_dcls/events.py``);
:meth:`Tagger.tag_live` scores the windows of a live stream (``audio.stream_pcm``: raw PCM from
a pipe) one by one as their audio arrives, with the same windows and scores as a file.
"""

from __future__ import annotations

import collections
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..hub.checkpoint import CheckpointInfo, load_model, probabilities
from .events import HYSTERESIS, MIN_GAP, Event, detect_events
from ..audio.decode import AudioDecodeError, error_line, to_mono_resampled
from ..audio.stream import stream_audio, stream_pcm
from ..features import FeatureConfig, LogMel, pad_or_trim
from ..hub.pretrained import DEFAULT_MODEL, fetch_pretrained

__all__ = [
    "Tag",
    "TagResult",
    "TagFailure",
    "Tagger",
    "window_starts",
    "SlidingWindows",
    "stream_audio",
    "stream_pcm",
    "resolve_device",
    "set_cpu_threads",
]

AGGREGATES = ("max", "mean")


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------


def window_starts(num_samples: int, clip_samples: int, hop_samples: int) -> list[int]:
    """Start samples of the windows over ``num_samples`` of audio (the rule in the module doc).

    Returns a list of ints, never empty: ``[0]`` for audio no longer than one clip.
    """
    if hop_samples <= 0:
        raise ValueError(f"hop must be positive, got {hop_samples} samples")
    if num_samples <= clip_samples:
        return [0]
    starts = list(range(0, num_samples - clip_samples + 1, hop_samples))
    if starts[-1] + clip_samples < num_samples:
        starts.append(num_samples - clip_samples)
    return starts


class SlidingWindows:
    """Cut a stream of mono blocks into fixed-length windows without holding the whole signal.

    Iterating yields ``(start_sample, window)`` with window float32 of shape (clip_samples,);
    the starts are exactly ``window_starts(total, clip, hop)``. After the iteration
    ``num_samples`` holds the total length of the stream. At most about
    ``clip + hop + one block`` samples are held at any time.
    """

    def __init__(self, blocks: Iterable[np.ndarray], clip_samples: int, hop_samples: int):
        if hop_samples <= 0:
            raise ValueError(f"hop must be positive, got {hop_samples} samples")
        self.blocks = blocks
        self.clip = clip_samples
        self.hop = hop_samples
        self.num_samples = 0

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        clip, hop = self.clip, self.hop
        buf = np.zeros(0, np.float32)
        buf_start = 0  # absolute index of buf[0]
        next_start = 0
        last_end = 0  # end of the last window yielded
        total = 0
        for block in self.blocks:
            if block.size == 0:
                continue
            buf = np.concatenate([buf, block.astype(np.float32, copy=False)])
            total += block.shape[0]
            while next_start + clip <= total:
                s = next_start - buf_start
                yield next_start, buf[s : s + clip].copy()
                last_end = next_start + clip
                next_start += hop
            # Keep what the next regular window needs, and always the last clip's worth of
            # samples: the final end-aligned window may need them once the stream ends.
            keep_from = max(buf_start, min(next_start, total - clip))
            buf = buf[keep_from - buf_start :]
            buf_start = keep_from
        self.num_samples = total
        if total == 0:
            return
        if last_end == 0:  # shorter than one clip: pad like training does
            yield 0, pad_or_trim(buf[:total], clip).astype(np.float32, copy=False)
        elif last_end < total:
            start = total - clip
            yield start, buf[start - buf_start :].copy()


# --------------------------------------------------------------------------------------------
# Audio sources
# --------------------------------------------------------------------------------------------


def _array_blocks(audio: np.ndarray | torch.Tensor, sr: int, sample_rate: int) -> Iterator[np.ndarray]:
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim not in (1, 2) or audio.size == 0:
        raise ValueError(f"audio array must be (N,) or (N, channels) and non-empty, got shape {audio.shape}")
    if audio.ndim == 2 and audio.shape[1] > audio.shape[0]:
        # torchaudio and librosa(mono=False) give (channels, N); soundfile gives (N, channels)
        raise ValueError(f"audio array of shape {audio.shape} looks like (channels, N); pass (N, channels) "
                         "(e.g. audio.T) or a mono (N,) array")
    if not np.all(np.isfinite(audio)):
        raise ValueError("audio array contains NaN or infinite samples")
    yield to_mono_resampled(audio, sr, sample_rate)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tag:
    """One label with its score."""

    index: int
    mid: str
    name: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "mid": self.mid, "name": self.name, "score": round(float(self.score), 6)}


def _labels_or_default(info: CheckpointInfo) -> list[dict[str, Any]]:
    if info.labels:
        return [{"index": int(lab.get("index", i)), "mid": str(lab.get("mid", "")), "name": str(lab["name"])}
                for i, lab in enumerate(info.labels)]
    return [{"index": i, "mid": "", "name": f"class_{i}"} for i in range(info.num_classes)]


Threshold = float | Sequence[float] | np.ndarray  # one number, or (C,) per class (calibrated)


def top_tags(scores: np.ndarray, labels: Sequence[dict[str, Any]], k: int = 10,
             threshold: Threshold | None = None) -> list[Tag]:
    """Highest scores first: the ``k`` best (``k <= 0``: all), then those ``>= threshold`` (one
    number, or (C,) per-class values such as ``CheckpointInfo.class_thresholds``)."""
    order = np.argsort(-scores, kind="stable")
    if k and k > 0:
        order = order[:k]
    tags = [Tag(int(i), labels[i]["mid"], labels[i]["name"], float(scores[i])) for i in order]
    if threshold is not None:
        cut = np.broadcast_to(np.asarray(threshold, dtype=np.float64), scores.shape)
        tags = [t for t in tags if t.score >= cut[t.index]]
    return tags


@dataclass
class TagResult:
    """Tags of one input.

    Attributes:
        source: the path, or ``"<array>"``.
        duration: seconds of audio (before any padding).
        starts, ends: (W,) window start/end times in seconds (``end`` is capped at ``duration``
            for a padded short clip).
        window_scores: (W, C) sigmoid scores per window ("tags over time"); softmax for a
            single-label checkpoint (``info.task``).
        scores: (C,) clip-level scores: ``aggregate`` ("max" or "mean") over the windows.
            (A single-label checkpoint's window scores are softmax probabilities: they sum to 1,
            and so do its clip scores with the "mean" aggregate, its default.)
        window_embeddings: (W, D) pooled features per window, or None.
        embedding: (D,) mean of the window embeddings, or None.
        warning: one line when the tags deserve little trust (a file shorter than one analysis
            window), else None.
        hop_seconds: the step between windows (for :meth:`events`).
    """

    source: str
    duration: float
    starts: np.ndarray
    ends: np.ndarray
    window_scores: np.ndarray
    scores: np.ndarray
    aggregate: str
    labels: list[dict[str, Any]]
    window_embeddings: np.ndarray | None = None
    embedding: np.ndarray | None = None
    warning: str | None = None
    hop_seconds: float = 10.0

    ok = True

    @property
    def num_windows(self) -> int:
        return int(self.window_scores.shape[0])

    def top(self, k: int = 10, threshold: Threshold | None = None) -> list[Tag]:
        """Clip-level top tags (see :func:`top_tags`)."""
        return top_tags(self.scores, self.labels, k, threshold)

    def window_top(self, window: int, k: int = 10, threshold: Threshold | None = None) -> list[Tag]:
        """Top tags of one window."""
        return top_tags(self.window_scores[window], self.labels, k, threshold)

    def events(self, threshold: Threshold, *, hysteresis: float = HYSTERESIS, min_gap: float = MIN_GAP) -> list[Event]:
        """Sound events with onset and offset (``events.detect_events``): per class, runs of windows
        above ``threshold`` (one number or (C,) per class), sorted by onset."""
        return detect_events(self.window_scores, self.starts, self.ends, self.duration, threshold, self.labels,
                             hop_seconds=self.hop_seconds, hysteresis=hysteresis, min_gap=min_gap)

    def to_dict(self, k: int = 10, threshold: Threshold | None = None, per_window: bool = False,
                events: Sequence[Event] | None = None) -> dict[str, Any]:
        """JSON-ready summary: path, duration, windows, aggregate, tags (and windows' tags, events)."""
        d: dict[str, Any] = {
            "path": self.source,
            "duration": round(self.duration, 4),
            "num_windows": self.num_windows,
            "aggregate": self.aggregate,
            "tags": [t.to_dict() for t in self.top(k, threshold)],
        }
        if self.warning:
            d["warning"] = self.warning
        if per_window:
            d["windows"] = [
                {"start": round(float(s), 4), "end": round(float(e), 4),
                 "tags": [t.to_dict() for t in self.window_top(i, k, threshold)]}
                for i, (s, e) in enumerate(zip(self.starts, self.ends))
            ]
        if events is not None:
            d["events"] = [e.to_dict() for e in events]
        return d


@dataclass
class TagFailure:
    """An input that could not be tagged: ``reason`` is one line (without the file name).

    ``kind``: ``"missing"``, ``"empty"`` or ``"unreadable"`` (an ``AudioDecodeError.kind``), or
    ``"error"`` for any other failure (e.g. an invalid array).
    """

    source: str
    reason: str
    kind: str = "error"
    ok = False

    def to_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"path": self.source, "error": self.reason, "kind": self.kind}


@dataclass
class _Job:
    source: str
    window_starts: list[int] = field(default_factory=list)
    scores: list[np.ndarray | None] = field(default_factory=list)
    embeddings: list[np.ndarray | None] = field(default_factory=list)
    num_samples: int = 0
    finished: bool = False
    error: str | None = None
    error_kind: str = ""
    pending: int = 0  # windows queued but not yet run

    @property
    def done(self) -> bool:
        return self.finished and (self.error is not None or self.pending == 0)


# --------------------------------------------------------------------------------------------
# Devices and threads
# --------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda if available, else cpu. Asking for cuda without one is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but no CUDA device is available (use --device cpu)")
    return dev


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> bf16 on a CUDA device that supports it, else fp32.

    bf16/fp16 run the model under ``torch.autocast`` (the front end stays float32). On the CPU,
    bf16 pays off only with native bf16 instructions (AVX512-BF16 or AMX: ConvNeXt-T 2.8-3.2x,
    ConvFormer-S18 1.3x, FastViT-SA24 1.25x faster than fp32 on the AMD EPYC of
    benchmarks/RESULTS.md); without them oneDNN emulates it, slower than fp32. fp16 is CUDA-only.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 needs a CUDA device; on the CPU use bf16 (or fp32)")
    return precision


def cpu_has_native_bf16() -> bool | None:
    """True/False from the CPU flags (avx512_bf16 or amx_bf16) on Linux; None where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return None


def set_cpu_threads(threads: int | None) -> int:
    """Set PyTorch's intra-op thread count (process-wide) and return the value now in effect.

    Only the intra-op pool matters for this tagger: the model runs one op after the other, so
    the inter-op pool (``torch.set_num_interop_threads``) is idle; it can only be set before
    any parallel work starts, so we leave it alone. Decoding and resampling run on the calling
    thread. ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` set before start-up give the same cap.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


# --------------------------------------------------------------------------------------------
# The tagger
# --------------------------------------------------------------------------------------------


class Tagger:
    """A loaded model plus its front end; tags files and arrays of any length.

    Build with :meth:`from_checkpoint` or :meth:`from_pretrained`. ``tag(x)`` returns a :class:`TagResult`;
    ``tag_many(xs)`` yields one TagResult or :class:`TagFailure` per input, in input order.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        info: CheckpointInfo,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        hop_seconds: float | None = None,
        aggregate: str | None = None,
        block_seconds: float = 30.0,
        precision: str = "fp32",
    ):
        if aggregate is None:  # a clip's softmax scores stay a distribution only when averaged
            aggregate = "mean" if info.task == "singlelabel" else "max"
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = model.to(self.device).eval()
        self.info = info
        self.features: FeatureConfig = info.features
        self.labels = _labels_or_default(info)
        self.batch_size = int(batch_size)
        self.hop_seconds = float(hop_seconds) if hop_seconds is not None else self.features.clip_seconds
        if self.hop_seconds <= 0:
            raise ValueError(f"hop must be positive, got {self.hop_seconds} s")
        self.aggregate = aggregate
        self.block_seconds = block_seconds
        self.logmel = LogMel(self.features).to(self.device)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "auto",
        batch_size: int = 8,
        hop_seconds: float | None = None,
        aggregate: str | None = None,
        threads: int | None = None,
        bake: bool = True,
        precision: str = "auto",
    ) -> "Tagger":
        """Load a safetensors inference checkpoint (never unpickles) and build a tagger.

        ``hop_seconds`` defaults to the clip length (non-overlapping windows); ``threads`` sets
        PyTorch's CPU thread count for the whole process (see :func:`set_cpu_threads`);
        ``bake=False`` keeps DCLS layers in training form (same scores, slower); ``precision``:
        see :func:`resolve_precision` (auto: bf16 on CUDA, fp32 on the CPU).
        """
        set_cpu_threads(threads)
        dev = resolve_device(device)
        model, info = load_model(path, bake=bake, device=dev)
        return cls(model, info, device=dev, batch_size=batch_size, hop_seconds=hop_seconds, aggregate=aggregate,
                   precision=precision)

    @classmethod
    def from_pretrained(cls, name: str = DEFAULT_MODEL, *, offline: bool | None = None,
                        progress: bool = True, **kwargs: Any) -> "Tagger":
        """A tagger with a published model (``audioset_dcls.hub.pretrained.PUBLISHED_MODELS``),
        downloaded and converted into the cache on first use; ``kwargs`` as :meth:`from_checkpoint`.
        ``offline`` (default ``$AUDIOSET_DCLS_OFFLINE``): use the cache only."""
        return cls.from_checkpoint(fetch_pretrained(name, offline=offline, progress=progress), **kwargs)

    @property
    def hop_samples(self) -> int:
        return max(1, int(round(self.hop_seconds * self.features.sample_rate)))

    # ---- model -----------------------------------------------------------------------------

    @torch.no_grad()
    def forward_windows(self, waves: torch.Tensor, embeddings: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Waveform windows (B, clip_samples) at the model rate -> (scores (B, C), embeddings (B, D) or None).

        Log-mel and normalisation run on the tagger's device; scores are sigmoid probabilities
        (softmax for a single-label checkpoint: ``info.task``);
        embeddings are the pooled pre-logit features (``forward_head(pre_logits=True)``).
        """
        x = self.logmel(waves.to(self.device, non_blocking=True))  # (B, n_mels, T), float32
        x = self.info.normalization.apply(x).unsqueeze(1)  # (B, 1, n_mels, T)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            if embeddings:
                feats = self.model.forward_features(x)
                emb = self.model.forward_head(feats, pre_logits=True).flatten(1).float()
                logits = self.model.forward_head(feats)
            else:
                emb = None
                logits = self.model(x)
        return probabilities(logits, self.info.task), emb

    def windows_logmel(self, waves: torch.Tensor) -> torch.Tensor:
        """The un-normalised log-mel the model sees: (B, clip_samples) -> (B, n_mels, num_frames)."""
        with torch.no_grad():
            return self.logmel(waves.to(self.device))

    # ---- sources ---------------------------------------------------------------------------

    def windows(self, source: str | Path | np.ndarray | torch.Tensor,
                sample_rate: int | None = None) -> SlidingWindows:
        """The windows of one input: iterate for ``(start_sample, wave (clip_samples,))``."""
        cfg = self.features
        if isinstance(source, (str, Path)):
            blocks = stream_audio(source, cfg.sample_rate, self.block_seconds)
        else:
            if sample_rate is None:
                raise ValueError(
                    f"pass sample_rate= with an audio array (its own rate; the model runs at "
                    f"{cfg.sample_rate} Hz and the tagger resamples)")
            blocks = _array_blocks(source, int(sample_rate), cfg.sample_rate)
        return SlidingWindows(blocks, cfg.clip_samples, self.hop_samples)

    def tag_live(self, sliding: SlidingWindows) -> Iterator[tuple[float, float, np.ndarray]]:
        """Score each window of ``sliding`` (``SlidingWindows`` over live blocks, e.g.
        ``audio.stream_pcm``) as soon as its audio has arrived, one at a time: yields
        ``(start s, end s, scores (C,))``. The windows and scores are those :meth:`tag` gives the
        same audio; ``sliding.num_samples`` holds the length once the input has ended."""
        sr = self.features.sample_rate
        for start, wave in sliding:
            scores, _ = self.forward_windows(torch.from_numpy(wave)[None])
            end = start + self.features.clip_samples
            if sliding.num_samples:  # the input has ended: a short input's window ends with it
                end = min(end, sliding.num_samples)
            yield start / sr, end / sr, scores[0].cpu().numpy()

    # ---- tagging ---------------------------------------------------------------------------

    def tag(self, source: str | Path | np.ndarray | torch.Tensor, sample_rate: int | None = None,
            *, embeddings: bool = False) -> TagResult:
        """Tag one file or array ((N,) or (N, channels) at ``sample_rate``).

        Raises AudioDecodeError / ValueError when the input cannot be tagged.
        """
        results = list(self.tag_many([source], sample_rate=sample_rate, embeddings=embeddings, _raise=True))
        return results[0]  # type: ignore[return-value]

    def tag_many(self, sources: Iterable[str | Path | np.ndarray | torch.Tensor], *,
                 sample_rate: int | None = None, embeddings: bool = False,
                 _raise: bool = False) -> Iterator[TagResult | TagFailure]:
        """Tag many inputs, batching windows across them; yields results in input order.

        An input that fails to decode yields a :class:`TagFailure` (path + one-line reason) and
        the others go on. Memory: one batch of windows plus the per-window scores of the inputs
        in flight.
        """
        jobs: collections.deque[_Job] = collections.deque()
        batch: list[tuple[_Job, int, np.ndarray]] = []

        def run_batch() -> None:
            live = [(job, i, w) for job, i, w in batch if job.error is None]
            batch.clear()
            if not live:
                return
            waves = torch.from_numpy(np.stack([w for _, _, w in live]))
            scores, emb = self.forward_windows(waves, embeddings)
            scores_np = scores.cpu().numpy()
            emb_np = emb.float().cpu().numpy() if emb is not None else None
            for row, (job, i, _) in enumerate(live):
                job.scores[i] = scores_np[row]
                if emb_np is not None:
                    job.embeddings[i] = emb_np[row]
                job.pending -= 1

        def pop_done() -> Iterator[TagResult | TagFailure]:
            while jobs and jobs[0].done:
                yield self._finish(jobs.popleft())

        for source in sources:
            name = str(source) if isinstance(source, (str, Path)) else "<array>"
            job = _Job(name)
            jobs.append(job)
            try:
                sliding = self.windows(source, sample_rate)
                for start, wave in sliding:
                    job.window_starts.append(start)
                    job.scores.append(None)
                    job.embeddings.append(None)
                    job.pending += 1
                    batch.append((job, len(job.window_starts) - 1, wave))
                    if len(batch) >= self.batch_size:
                        run_batch()
                        yield from pop_done()
                job.num_samples = sliding.num_samples
                if job.num_samples == 0:
                    raise AudioDecodeError(name, "empty", "no audio samples")
            except (KeyboardInterrupt, torch.cuda.OutOfMemoryError):
                raise
            except Exception as err:
                if _raise:
                    raise
                # A decode error's reason leaves out the file name: the record names the file.
                if isinstance(err, AudioDecodeError):
                    job.error, job.error_kind = err.reason, err.kind
                else:
                    job.error, job.error_kind = error_line(err), "error"
            job.finished = True
            yield from pop_done()
        run_batch()
        yield from pop_done()

    def _finish(self, job: _Job) -> TagResult | TagFailure:
        if job.error is not None:
            return TagFailure(job.source, job.error, job.error_kind)
        sr = self.features.sample_rate
        clip = self.features.clip_samples
        starts = np.asarray(job.window_starts, dtype=np.int64)
        window_scores = np.stack(job.scores).astype(np.float32)  # (W, C)
        scores = window_scores.max(0) if self.aggregate == "max" else window_scores.mean(0)
        win_emb = np.stack(job.embeddings).astype(np.float32) if job.embeddings and job.embeddings[0] is not None else None
        warning = None
        if job.num_samples < self.features.n_fft:
            # Less than one STFT window of signal: every frame is mostly padding.
            warning = (f"only {job.num_samples} samples ({1000 * job.num_samples / sr:.1f} ms), less than one "
                       f"{self.features.n_fft}-sample analysis window: its tags mean little")
        return TagResult(
            source=job.source,
            duration=job.num_samples / sr,
            starts=starts / sr,
            ends=np.minimum(starts + clip, job.num_samples) / sr,
            window_scores=window_scores,
            scores=scores,
            aggregate=self.aggregate,
            labels=self.labels,
            window_embeddings=win_emb,
            embedding=None if win_emb is None else win_emb.mean(0),
            warning=warning,
            hop_seconds=self.hop_seconds,
        )


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".w64", ".caf",
                    ".m4a", ".mp4", ".aac", ".opus", ".webm", ".mkv", ".wma")


def expand_inputs(inputs: Sequence[str], extensions: Sequence[str] = AUDIO_EXTENSIONS,
                  problems: list[TagFailure] | None = None) -> list[str]:
    """Files as given; folders searched recursively for audio extensions (sorted; symbolic
    links to folders are not followed); ``@list.txt`` read as one path per line (blank lines
    and ``#`` comments skipped, relative paths taken from the list file's folder). A missing path
    is kept, so it is reported later.

    What a folder holds but cannot be tagged is never left out silently: a dangling symbolic
    link (kind ``"missing"``), an audio file this process may not read or that is not a regular
    file, a sub-folder that cannot be listed (``"unreadable"``) go to ``problems`` as
    :class:`TagFailure` when a list is given, and stay in the result otherwise (tagging then
    reports them)."""
    exts = {e.lower() for e in extensions}
    out: list[str] = []
    for item in inputs:
        if item.startswith("@"):
            list_path = Path(item[1:])
            for line in list_path.read_text().splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                p = Path(line)
                out.extend(expand_inputs([str(p if p.is_absolute() else list_path.parent / p)], extensions, problems))
        elif os.path.isdir(item):
            found, bad = _walk_audio(item, exts)
            if problems is None:
                found += [b.source for b in bad]
            else:
                problems.extend(bad)
            out.extend(sorted(found))
        else:
            out.append(item)
    return out


def _walk_audio(folder: str, exts: set[str]) -> tuple[list[str], list[TagFailure]]:
    """(audio files under ``folder``, entries that cannot be tagged with why)."""
    found: list[str] = []
    bad: list[TagFailure] = []

    def unlisted(err: OSError) -> None:
        bad.append(TagFailure(str(err.filename), f"cannot list this folder ({err.strerror}): its files are not tagged",
                              "unreadable"))

    for root, _, names in os.walk(folder, onerror=unlisted):
        for name in names:
            if os.path.splitext(name)[1].lower() not in exts:
                continue
            path = os.path.join(root, name)
            try:
                mode = os.stat(path).st_mode
            except FileNotFoundError:
                bad.append(TagFailure(path, f"dangling symbolic link (to {os.readlink(path)})", "missing"))
                continue
            except OSError as err:  # a symbolic link loop, a permission on the way
                bad.append(TagFailure(path, f"cannot be read ({err.strerror})", "unreadable"))
                continue
            if not stat.S_ISREG(mode):
                bad.append(TagFailure(path, "not a regular file (a pipe, socket or device)", "unreadable"))
            elif not os.access(path, os.R_OK):
                bad.append(TagFailure(path, "cannot be read (permission denied)", "unreadable"))
            else:
                found.append(path)
    bad.sort(key=lambda b: b.source)
    return found, bad


def plot_tags(result: TagResult, out: str | Path, *, k: int = 5, audio_path: str | Path | None = None,
              features: FeatureConfig | None = None, max_columns: int = 4000,
              events: Sequence[Event] | None = None) -> Path:
    """Draw the log-mel spectrogram of ``result.source`` with the top-``k`` tags over time, and
    with ``events`` (``TagResult.events``) one bar per event under it, a row per class.

    Needs matplotlib (``pip install matplotlib``). The spectrogram is streamed and
    time-pooled to at most ``max_columns`` columns, so hours of audio stay cheap.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib (or the project's [plot] extra)") from None
    cfg = features or FeatureConfig()
    spec = _streamed_spectrogram(audio_path or result.source, cfg, max_columns)
    tags = result.top(k)
    rows = sorted({e.index: e.name for e in events or ()}.items())
    ratios = [2, 1] + ([max(0.6, 0.25 * len(rows))] if events is not None else [])
    fig, axes = plt.subplots(len(ratios), 1, figsize=(12, 6 + (1.5 if events is not None else 0)), sharex=True,
                             gridspec_kw={"height_ratios": ratios}, squeeze=False)
    ax0, ax1 = axes[0, 0], axes[1, 0]
    ax0.imshow(spec, origin="lower", aspect="auto", cmap="magma", extent=(0, result.duration, 0, cfg.n_mels))
    ax0.set_ylabel("mel bin")
    ax0.set_title(Path(result.source).name)
    centres = (result.starts + result.ends) / 2
    for t in tags:
        if result.num_windows > 1:
            ax1.plot(centres, result.window_scores[:, t.index], marker=".", label=t.name)
        else:
            ax1.bar([t.name], [t.score])
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("score")
    if result.num_windows > 1:
        ax1.legend(loc="upper right", fontsize="small")
    if events is not None:
        ax2 = axes[2, 0]
        row_of = {index: row for row, (index, _) in enumerate(rows)}
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for e in events:
            row = row_of[e.index]
            ax2.broken_barh([(e.onset, max(e.offset - e.onset, 1e-3))], (row - 0.4, 0.8),
                            facecolors=colours[row % len(colours)], alpha=0.4 + 0.6 * min(1.0, e.peak))
        ax2.set_yticks(range(len(rows)), [name for _, name in rows], fontsize="small")
        ax2.set_ylim(-0.6, max(len(rows), 1) - 0.4)
        ax2.set_xlim(0, result.duration)
        ax2.set_ylabel("events")
        if not rows:
            ax2.text(0.5, 0.5, "no events", transform=ax2.transAxes, ha="center", va="center")
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _streamed_spectrogram(path: str | Path, cfg: FeatureConfig, max_columns: int) -> np.ndarray:
    """Log-mel (n_mels, <= max_columns) of a whole file, 10 s at a time, averaged in time."""
    logmel = LogMel(cfg)
    cols: list[np.ndarray] = []
    clip = cfg.clip_samples
    buf = np.zeros(0, np.float32)
    with torch.no_grad():
        for block in stream_audio(path, cfg.sample_rate):
            buf = np.concatenate([buf, block])
            while buf.shape[0] >= clip:
                cols.append(logmel(torch.from_numpy(buf[:clip]))[:, :-1].numpy())
                buf = buf[clip:]
        if buf.shape[0]:
            # reflect padding needs at least n_fft // 2 + 1 samples; a tiny tail is padded
            tail = pad_or_trim(buf, max(buf.shape[0], cfg.n_fft))
            cols.append(logmel(torch.from_numpy(tail))[:, :-1].numpy())
    spec = np.concatenate(cols, axis=1) if cols else np.zeros((cfg.n_mels, 1), np.float32)
    pool = max(1, math.ceil(spec.shape[1] / max_columns))
    if pool > 1:
        t = spec.shape[1] // pool * pool
        spec = spec[:, :t].reshape(spec.shape[0], -1, pool).mean(-1)
    return spec
