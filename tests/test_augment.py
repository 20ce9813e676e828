"""Augmentations on log-mel batches: each does what it says, each can be switched off, and a
step's augmentation is a function of its generator seed alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from audioset_dcls.augment import augment_batch, mixup, random_erase, smooth_labels, spec_masks, time_roll, time_stretch
from audioset_dcls.config import AugmentConfig


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(b=6, m=16, t=40, c=5):
    x = torch.randn(b, 1, m, t, generator=gen(123))
    y = (torch.rand(b, c, generator=gen(7)) < 0.4).float()
    return x, y


OFF = AugmentConfig(label_smoothing=0.0, mixup_alpha=0.0, time_roll=False, time_stretch_prob=0.0, erase_prob=0.0)


def test_everything_off_is_identity():
    x, y = batch()
    x2, y2 = augment_batch(x, y, OFF, gen())
    assert torch.equal(x2, x) and torch.equal(y2, y)


def test_full_recipe_is_deterministic_per_seed_and_keeps_shapes():
    x, y = batch()
    cfg = AugmentConfig()
    a = augment_batch(x, y, cfg, gen(5))
    b = augment_batch(x, y, cfg, gen(5))
    c = augment_batch(x, y, cfg, gen(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == x.shape and a[1].shape == y.shape
    assert float(a[1].min()) >= 0.0 and float(a[1].max()) <= 1.0


def test_label_smoothing_values():
    y = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    s = smooth_labels(y, 0.1)
    assert s[0, 0].item() == pytest.approx(0.9 + 0.1 / 4) and s[0, 1].item() == pytest.approx(0.1 / 4)


def test_mixup_mixes_with_the_flipped_batch_using_one_lambda():
    x, y = batch()
    xm, ym, lam = mixup(x, y, 0.8, gen(3))
    assert 0.0 <= lam <= 1.0 and lam != 1.0
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(ym, lam * y + (1 - lam) * y.flip(0))


def test_time_roll_is_a_circular_shift_of_each_clip():
    x, _ = batch()
    r = time_roll(x, gen(1))
    for i in range(x.shape[0]):
        assert any(torch.equal(torch.roll(x[i], s, dims=-1), r[i]) for s in range(x.shape[-1]))


def _lerp_frames(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """x (..., T) read at fractional frame positions src (K,) -> (..., K)."""
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=x.shape[-1] - 1)
    f = src - lo
    return x[..., lo] * (1 - f) + x[..., hi] * f


def test_time_stretch_halves_or_doubles_the_length_at_a_random_offset_like_the_reference():
    x, _ = batch(b=8, t=40)
    # rate 0.5: the clip becomes 20 frames (every other frame), padded to 40 at a random offset
    short = time_stretch(x, prob=1.0, rate_min=0.5, rate_max=0.5, generator=gen(), pad_value=-9.0)
    starts = []
    for i in range(8):
        real = (short[i] != -9.0).all(dim=(0, 1)).nonzero().ravel()
        o = int(real[0])
        assert real.tolist() == list(range(o, o + 20))
        torch.testing.assert_close(short[i, ..., o:o + 20], x[i, ..., 0:40:2])
        starts.append(o)
    assert len(set(starts)) > 1  # the offset is random per clip, not always the start
    # rate 2: the clip becomes 80 frames (each frame twice), cropped to a random 40 of them
    long = time_stretch(x, prob=1.0, rate_min=2.0, rate_max=2.0, generator=gen(), pad_value=-9.0)
    assert not (long == -9.0).any()
    crops = []
    for i in range(8):
        fits = [c for c in range(41) if torch.allclose(
            long[i], _lerp_frames(x[i], (torch.arange(40.0) + c) / 2.0), atol=1e-5)]
        assert fits, f"clip {i} is not a 40-frame crop of the twice-as-long clip"
        crops.append(fits[0])
    assert len(set(crops)) > 1
    same = time_stretch(x, prob=1.0, rate_min=1.0, rate_max=1.0, generator=gen(), pad_value=-9.0)
    torch.testing.assert_close(same, x)
    assert torch.equal(time_stretch(x, prob=0.0, rate_min=0.5, rate_max=1.5, generator=gen(), pad_value=-9.0), x)


def test_random_erase_zeroes_one_rectangle_per_clip():
    x = torch.randn(8, 1, 32, 64, generator=gen(9)) + 5.0  # no exact zeros before erasing
    e = random_erase(x, 1.0, gen(2))
    for i in range(8):
        zero = e[i, 0] == 0
        rows, cols = zero.any(1).nonzero().ravel(), zero.any(0).nonzero().ravel()
        assert rows.numel() and cols.numel()
        assert zero[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a full rectangle
        frac = zero.float().mean().item()
        assert 0.005 <= frac <= 0.5
    assert torch.equal(random_erase(x, 0.0, gen(2)), x)


def test_spec_masks_respect_widths():
    x = torch.randn(4, 1, 32, 64, generator=gen(1)) + 5.0
    m = spec_masks(x, freq_masks=1, freq_width=5, time_masks=2, time_width=7, generator=gen(4))
    for i in range(4):
        zero = m[i, 0] == 0
        full_rows = zero.all(1).sum().item()
        full_cols = zero.all(0).sum().item()
        assert full_rows <= 5 and full_cols <= 14
    assert torch.equal(spec_masks(x, 0, 5, 0, 7, gen()), x)


def test_each_switch_changes_only_its_part():
    x, y = batch()
    only_smooth = dataclasses.replace(OFF, label_smoothing=0.1)
    x2, y2 = augment_batch(x, y, only_smooth, gen())
    assert torch.equal(x2, x) and not torch.equal(y2, y)
    only_roll = dataclasses.replace(OFF, time_roll=True)
    x3, y3 = augment_batch(x, y, only_roll, gen())
    assert not torch.equal(x3, x) and torch.equal(y3, y)
