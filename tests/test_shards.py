"""The sample schema's log-mel encodings: uint8 (levels + zstd) and float16, both read by decode_sample."""

from __future__ import annotations

import io

import numpy as np
import pytest
import zstandard

from audioset_dcls.shards.format import (
    LOGMEL_EXT,
    LOGMEL_U8_EXT,
    LogmelEncoding,
    decode_sample,
    encode_logmel,
    encode_sample,
    manifest_encoding,
)


def _logmel(seed: int = 0, shape=(128, 1001)) -> np.ndarray:
    """Log-mel-like float32 dB values: a smooth spectral envelope, frame-to-frame changes, noise,
    and stretches at the -100 dB floor (digital silence), as real clips have."""
    rng = np.random.default_rng(seed)
    m, t = shape
    envelope = np.linspace(0, -40, m)[:, None] + 10 * np.sin(np.arange(t) / 37.0)[None]
    x = envelope + 6 * rng.standard_normal(shape)
    x[:, : t // 10] = -100.0
    return x.astype(np.float32)


def test_uint8_round_trip_error_bound_and_clipping():
    x = _logmel()
    x[3, 5:9] = [59.5, 59.68, 60.0, 80.0]  # within half a step of the top level, then beyond it
    x[4, 5:8] = [-100.31, -100.4, -130.0]  # within half a step of the bottom, then below it
    enc = LogmelEncoding()
    assert (enc.min_db, enc.max_db, enc.step_db / 2) == (-100.0, 59.375, 0.3125)
    encoded = encode_logmel(x, enc)
    assert encoded.member == LOGMEL_U8_EXT and encoded.clipped == 4  # 60, 80, -100.4, -130
    s = decode_sample(encode_sample("yt_0", encoded, [3, 1], {"ytid": "yt"}))
    assert s.logmel.dtype == np.float32 and s.logmel.shape == x.shape
    assert np.array_equal(s.logmel, encoded.values.numpy())  # what the builder's statistics saw
    err = np.abs(s.logmel - x)
    inside = (x >= enc.min_db - enc.step_db / 2) & (x <= enc.max_db + enc.step_db / 2)
    assert err[inside].max() <= enc.step_db / 2 + 1e-5  # 0.3125 dB (the bound: 0.35)
    assert s.logmel.max() == enc.max_db and s.logmel.min() == enc.min_db  # the rest is clipped to the range
    levels = (s.logmel - enc.min_db) / enc.step_db
    assert np.array_equal(levels, np.round(levels))  # exactly on the 0.625 dB grid
    assert s.labels == [1, 3] and s.meta == {"ytid": "yt"}
    assert len(encoded.data) < x.size * 0.8  # the difference + zstd stage compresses, even on noise


def test_float16_round_trip_and_both_decode_to_float32():
    x = _logmel(1)
    s16 = decode_sample(encode_sample("a_0", x, [0], {}, "float16"))
    assert set(encode_sample("a_0", x, [0], {}, "float16")) == {"__key__", LOGMEL_EXT, "json"}
    assert s16.logmel.dtype == np.float32
    assert np.array_equal(s16.logmel, x.astype(np.float16).astype(np.float32))
    s8 = decode_sample(encode_sample("a_0", x, [0], {}))  # default: uint8
    assert np.abs(s8.logmel - s16.logmel).max() <= 0.3125 + 0.05


def test_a_sample_written_before_encodings_existed_still_decodes():
    x = _logmel(2, (16, 20))
    buf = io.BytesIO()
    np.save(buf, x.astype(np.float16))  # what encode_sample wrote before encodings existed
    s = decode_sample({"__key__": "old_0", LOGMEL_EXT: buf.getvalue(), "json": b'{"labels": [2]}'})
    assert np.array_equal(s.logmel, x.astype(np.float16).astype(np.float32)) and s.labels == [2]
    assert manifest_encoding({"format": "audioset_dcls.shards.format/1"}) == LogmelEncoding("float16")


def test_malformed_uint8_members_are_one_line_errors():
    good = encode_sample("k_0", _logmel(3, (8, 30)), [0], {})
    raw = zstandard.decompress(good[LOGMEL_U8_EXT])
    cases = {
        "not zstd": b"not a zstd frame",
        "truncated": zstandard.compress(raw[:-5]),
        "other magic": zstandard.compress(b"XXXX" + raw[4:]),
        "newer version": zstandard.compress(raw[:4] + bytes([9]) + raw[5:]),
    }
    for what, data in cases.items():
        with pytest.raises(ValueError) as err:
            decode_sample({**good, LOGMEL_U8_EXT: data, "__url__": "x.tar"})
        assert str(err.value).startswith("sample k_0 in x.tar: malformed") and "\n" not in str(err.value), what
    with pytest.raises(ValueError, match="missing member"):
        decode_sample({"__key__": "k_0", "json": b"{}"})


def test_encoding_names_and_records():
    with pytest.raises(ValueError, match="NaN"):
        encode_logmel(np.full((2, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="unknown log-mel encoding 'int4'"):
        LogmelEncoding("int4")
    for name in ("uint8", "float16"):
        enc = LogmelEncoding(name)
        assert LogmelEncoding.from_dict(enc.to_dict()) == enc
        assert enc.to_dict()["member"] == enc.member
