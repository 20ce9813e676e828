"""Training augmentations on normalised log-mel batches, on the device.

The reference augments the waveform (speed perturbation) and the linear spectrogram (random
erasing) before its log-mel; our shards store log-mel, so each has a mel-domain stand-in
(docs/method.md): time-stretch by linear interpolation along frames, erasing on
the normalised log-mel (filled with 0, the dataset mean). Order per batch: time stretch ->
time roll -> erasing / SpecAugment masks -> label smoothing -> mixup (mixup last, so that mixed
clips carry already-smoothed targets, as timm's Mixup does).

All randomness comes from one ``torch.Generator`` passed in, so a training step's augmentation
is a function of its seed alone (exact resume needs no hidden RNG state).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .config import AugmentConfig

__all__ = [
    "smooth_labels",
    "mixup",
    "time_roll",
    "time_stretch",
    "random_erase",
    "spec_masks",
    "augment_batch",
]


def smooth_labels(targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Multi-hot (B, C) -> y * (1 - e) + e / C (timm's on/off values for C classes)."""
    if smoothing <= 0:
        return targets
    return targets * (1.0 - smoothing) + smoothing / targets.shape[1]


def mixup(
    x: torch.Tensor, targets: torch.Tensor, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One lambda ~ Beta(alpha, alpha) per batch; clip i is mixed with clip B-1-i (timm).

    x (B, 1, M, T), targets (B, C) -> (mixed x, mixed targets, lambda).
    """
    if alpha <= 0 or x.shape[0] < 2:
        return x, targets, 1.0
    # torch.distributions takes no generator: draw a NumPy seed from the step's generator.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    x = x * lam + x.flip(0) * (1.0 - lam)
    targets = targets * lam + targets.flip(0) * (1.0 - lam)
    return x, targets, lam


def time_roll(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Circular shift of each clip by a uniform random number of frames. x (B, 1, M, T)."""
    b, t = x.shape[0], x.shape[-1]
    shifts = torch.randint(0, t, (b,), generator=generator, device=generator.device).to(x.device)
    idx = (torch.arange(t, device=x.device)[None, :] - shifts[:, None]) % t  # (B, T)
    return x.gather(-1, idx[:, None, None, :].expand_as(x))


def time_stretch(
    x: torch.Tensor, prob: float, rate_min: float, rate_max: float, generator: torch.Generator, pad_value: float
) -> torch.Tensor:
    """Stand-in for the reference's speed perturbation (DCLS-Audio ``SpeedPerturbation``): with
    probability ``prob`` a clip's length is multiplied by r ~ U(rate_min, rate_max) (r > 1 slows
    it down; linear interpolation along frames), then padded with ``pad_value`` (silence) or
    cropped back to T frames at a uniformly random offset, as the reference pads and crops its
    resampled waveform with ``align="random"``. Unlike resampling a waveform it does not shift
    pitch. x (B, 1, M, T) -> same shape.
    """
    if prob <= 0:
        return x
    b, t = x.shape[0], x.shape[-1]
    dev = generator.device
    apply = torch.rand(b, generator=generator, device=dev) < prob
    rate = rate_min + (rate_max - rate_min) * torch.rand(b, generator=generator, device=dev)
    rate = torch.where(apply, rate, torch.ones_like(rate)).to(x.device, torch.float32)
    # Where the stretched clip (t * rate frames) starts: in [0, t - n] when it is shorter than
    # the window (padding), in [t - n, 0] when longer (cropping); 0 when not stretched.
    offset = (torch.rand(b, generator=generator, device=dev).to(x.device) * (t - t * rate)).round()
    src = (torch.arange(t, device=x.device, dtype=torch.float32)[None, :] - offset[:, None]) / rate[:, None]
    valid = ((src >= 0) & (src <= t - 1))[:, None, None, :]
    lo = src.floor().clamp(0, t - 1).long()
    frac = (src - src.floor()).to(x.dtype)[:, None, None, :]
    hi = (lo + 1).clamp(max=t - 1)
    shape = (b, x.shape[1], x.shape[2], t)
    a = x.gather(-1, lo[:, None, None, :].expand(shape))
    c = x.gather(-1, hi[:, None, None, :].expand(shape))
    out = a + (c - a) * frac
    return torch.where(valid, out, torch.full_like(out, pad_value))


def random_erase(
    x: torch.Tensor, prob: float, generator: torch.Generator,
    area: tuple[float, float] = (0.02, 1 / 3), log_aspect: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3)),
) -> torch.Tensor:
    """timm-style random erasing, one rectangle per clip with probability ``prob``, filled with
    0 (the normalised mean). Area fraction ~ U(area), aspect ~ logU(0.3, 3.3). x (B, 1, M, T)."""
    if prob <= 0:
        return x
    b, _, m, t = x.shape
    dev = generator.device
    r = torch.rand(b, 5, generator=generator, device=dev).to(x.device)
    frac = area[0] + (area[1] - area[0]) * r[:, 1]
    aspect = torch.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * r[:, 2])
    h = (torch.sqrt(frac * m * t * aspect)).round().clamp(1, m)
    w = (torch.sqrt(frac * m * t / aspect)).round().clamp(1, t)
    top = ((m - h + 1) * r[:, 3]).floor()
    left = ((t - w + 1) * r[:, 4]).floor()
    rows = torch.arange(m, device=x.device)[None, :]
    cols = torch.arange(t, device=x.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])  # (B, M)
    in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])  # (B, T)
    mask = in_rows[:, :, None] & in_cols[:, None, :] & (r[:, 0] < prob)[:, None, None]
    return x.masked_fill(mask[:, None], 0.0)


def _band_mask(b: int, size: int, count: int, width: int, generator: torch.Generator, device) -> torch.Tensor:
    """(B, size) bool: union of ``count`` bands of width U{0..width} at uniform positions."""
    mask = torch.zeros(b, size, dtype=torch.bool, device=device)
    pos = torch.arange(size, device=device)[None, :]
    for _ in range(count):
        r = torch.rand(b, 2, generator=generator, device=generator.device).to(device)
        w = (r[:, 0] * (width + 1)).floor()
        start = ((size - w + 1) * r[:, 1]).floor()
        mask |= (pos >= start[:, None]) & (pos < (start + w)[:, None])
    return mask


def spec_masks(
    x: torch.Tensor, freq_masks: int, freq_width: int, time_masks: int, time_width: int, generator: torch.Generator
) -> torch.Tensor:
    """SpecAugment frequency and time masks (filled with 0). x (B, 1, M, T)."""
    b, _, m, t = x.shape
    if freq_masks > 0 and freq_width > 0:
        fm = _band_mask(b, m, freq_masks, freq_width, generator, x.device)
        x = x.masked_fill(fm[:, None, :, None], 0.0)
    if time_masks > 0 and time_width > 0:
        tm = _band_mask(b, t, time_masks, time_width, generator, x.device)
        x = x.masked_fill(tm[:, None, None, :], 0.0)
    return x


def augment_batch(
    x: torch.Tensor, targets: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator, pad_value: float = 0.0,
    mix_also: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Apply every augmentation ``cfg`` switches on.

    Args:
        x: (B, 1, n_mels, T) normalised log-mel, float.
        targets: (B, num_classes) multi-hot float.
        generator: the step's generator (on x's device, or the CPU).
        pad_value: normalised value of silence, used where time-stretching runs past the clip.
        mix_also: (B, K) per-clip values that mixup mixes with the same lambda and partner as the
            targets, and nothing else touches (the teacher's targets, distillation); draws no
            randomness of its own, so a step's augmentation is the same with or without it.

    Returns:
        (x, soft targets), same shapes; with ``mix_also``, (x, soft targets, mixed mix_also).
    """
    if cfg.time_stretch_prob > 0:
        x = time_stretch(x, cfg.time_stretch_prob, cfg.time_stretch_min, cfg.time_stretch_max, generator, pad_value)
    if cfg.time_roll:
        x = time_roll(x, generator)
    if cfg.erase_prob > 0:
        x = random_erase(x, cfg.erase_prob, generator)
    x = spec_masks(x, cfg.freq_masks, cfg.freq_mask_width, cfg.time_masks, cfg.time_mask_width, generator)
    targets = smooth_labels(targets, cfg.label_smoothing)
    x, targets, lam = mixup(x, targets, cfg.mixup_alpha, generator)
    if mix_also is None:
        return x, targets
    if lam != 1.0:
        mix_also = mix_also * lam + mix_also.flip(0) * (1.0 - lam)
    return x, targets, mix_also
