"""Tag audio of any length with an inference checkpoint: files, arrays, many files at once.

The tagger uses only what the checkpoint says about itself (``checkpoint.CheckpointInfo``): the
model, the front-end settings, the normalisation and the label names. DCLS layers are baked into
plain depthwise convolutions (``checkpoint.load_model(bake=True)``).

Long audio is cut into 10 s windows (the training clip length) every ``hop_seconds`` by the rule
of :mod:`.windows`.

Files are streamed: read in blocks (``soundfile``), downmixed, resampled with a streaming soxr
resampler (its output does not depend on the block size and equals ``soxr.resample`` of the
whole signal), and cut into windows on the fly, so memory stays bounded for hours of audio.
Each window's log-mel is the same as ``features.compute_logmel`` of that stretch of the fully
decoded signal. Formats that need ffmpeg (m4a, opus, ...) are decoded whole.

Windows of consecutive files share batches, so a folder of short clips runs at full batch size.

``TagResult.events`` turns a file's window scores into sound events (``tagging/events.py``);
:meth:`Tagger.tag_live` scores the windows of a live stream (``audio.stream_pcm``: raw PCM from
a pipe) one by one as their audio arrives, with the same windows and scores as a file.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from ..audio.decode import AudioDecodeError, error_line, to_mono_resampled
from ..audio.stream import stream_audio
from ..features import FeatureConfig, LogMel
from ..hub.checkpoint import CheckpointInfo, load_model, probabilities
from ..hub.published import DEFAULT_MODEL
from ..hub.references import resolve_reference
from .results import TagFailure, TagResult, label_records
from .windows import SlidingWindows

__all__ = ["Tagger", "resolve_device", "resolve_precision", "set_cpu_threads", "cpu_has_native_bf16"]

AGGREGATES = ("max", "mean")


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
        self.labels = label_records(info)
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
        checkpoint: str | Path,
        *,
        device: str | torch.device = "auto",
        batch_size: int = 8,
        hop_seconds: float | None = None,
        aggregate: str | None = None,
        threads: int | None = None,
        bake: bool = True,
        precision: str = "auto",
        offline: bool | None = None,
        progress: bool = True,
    ) -> "Tagger":
        """A tagger from any checkpoint reference (:func:`audioset_dcls.hub.references.resolve_reference`:
        a published name, fetched on first use, an inference checkpoint or a finished run folder);
        safetensors only, never unpickles.

        ``hop_seconds`` defaults to the clip length (non-overlapping windows); ``threads`` sets
        PyTorch's CPU thread count for the whole process (see :func:`set_cpu_threads`);
        ``bake=False`` keeps DCLS layers in training form (same scores, slower); ``precision``:
        see :func:`resolve_precision` (auto: bf16 on CUDA, fp32 on the CPU); ``offline`` (default
        ``$AUDIOSET_DCLS_OFFLINE``) and ``progress`` apply to a published name's download.
        """
        path = resolve_reference(checkpoint, need="inference", offline=offline, progress=progress).path
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
        return cls.from_checkpoint(name, offline=offline, progress=progress, **kwargs)

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

    def embed(self, source: str | Path | np.ndarray | torch.Tensor, sample_rate: int | None = None, *,
              per_window: bool = False) -> np.ndarray:
        """The pooled pre-logit embedding of one file or array: (D,) float32, the mean over its
        windows, or with ``per_window`` (W, D), one per window (the windows of :meth:`tag`)."""
        result = self.tag(source, sample_rate, embeddings=True)
        assert result.window_embeddings is not None and result.embedding is not None
        return result.window_embeddings if per_window else result.embedding

    def _finish(self, job: _Job) -> TagResult | TagFailure:
        if job.error is not None:
            return TagFailure(job.source, job.error, job.error_kind)
        win_emb = np.stack(job.embeddings) if job.embeddings and job.embeddings[0] is not None else None
        return self.make_result(job.source, np.asarray(job.window_starts, dtype=np.int64), np.stack(job.scores),
                                job.num_samples, win_emb)

    def make_result(self, source: str, starts: np.ndarray, window_scores: np.ndarray, num_samples: int,
                    window_embeddings: np.ndarray | None = None) -> TagResult:
        """A :class:`TagResult` from scored windows: ``starts`` (W,) start samples, ``window_scores``
        (W, C), ``num_samples`` the input's length at the model rate, ``window_embeddings`` (W, D)
        or None; clip scores aggregated as this tagger does (for callers that score windows
        themselves, such as the archive job)."""
        sr = self.features.sample_rate
        clip = self.features.clip_samples
        starts = np.asarray(starts, dtype=np.int64)
        window_scores = np.asarray(window_scores).astype(np.float32)  # (W, C)
        scores = window_scores.max(0) if self.aggregate == "max" else window_scores.mean(0)
        win_emb = None if window_embeddings is None else np.asarray(window_embeddings).astype(np.float32)
        warning = None
        if num_samples < self.features.n_fft:
            # Less than one STFT window of signal: every frame is mostly padding.
            warning = (f"only {num_samples} samples ({1000 * num_samples / sr:.1f} ms), less than one "
                       f"{self.features.n_fft}-sample analysis window: its tags mean little")
        return TagResult(
            source=source,
            duration=num_samples / sr,
            starts=starts / sr,
            ends=np.minimum(starts + clip, num_samples) / sr,
            window_scores=window_scores,
            scores=scores,
            aggregate=self.aggregate,
            labels=self.labels,
            window_embeddings=win_emb,
            embedding=None if win_emb is None else win_emb.mean(0),
            warning=warning,
            hop_seconds=self.hop_seconds,
        )
