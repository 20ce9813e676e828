"""ONNX export: onnxruntime gives the PyTorch (baked) logits, any batch size, with and without
the normalisation in the graph; the .onnx file carries the checkpoint's description."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx (pip install 'audioset-dcls[export]')")
ort = pytest.importorskip("onnxruntime", reason="the export check needs onnxruntime (pip install 'audioset-dcls[export]')")

from audioset_dcls.hub.checkpoint import load_model  # noqa: E402
from audioset_dcls.tagging.export import export_onnx, main  # noqa: E402
from audioset_dcls.audio import load_audio  # noqa: E402
from audioset_dcls.features import compute_logmel  # noqa: E402
from audioset_dcls.tagging.tagger import Tagger  # noqa: E402
from helpers_tagging import LABELS, write_audio, write_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export")
    ckpt = write_checkpoint(root / "tiny.safetensors")
    assert main(["--checkpoint", str(ckpt), "--onnx", str(root / "tiny.onnx")]) == 0
    return ckpt, root / "tiny.onnx"


def test_onnxruntime_equals_pytorch_any_batch(exported):
    ckpt, path = exported
    model, info = load_model(ckpt, bake=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["logmel"] and sess.get_inputs()[0].shape[1:] == [1, 128, 1001]
    g = torch.Generator().manual_seed(1)
    for batch in (1, 3):  # exported with batch 2: the batch axis must be dynamic
        x = -18.0 + 30.0 * torch.randn(batch, 1, 128, 1001, generator=g)  # dB scale, like log-mels
        with torch.no_grad():
            ref = model(info.normalization.apply(x)).numpy()
        got = sess.run(["logits"], {"logmel": x.numpy()})[0]
        assert got.shape == (batch, 8)
        # fp32 through ~20 layers in two runtimes that fuse differently: 1e-4 on logits of
        # magnitude ~1 (observed ~1e-6)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)


def test_onnx_scores_equal_tagger_on_a_real_file(exported, tmp_path):
    ckpt, path = exported
    audio = write_audio(tmp_path / "clip.ogg", 9.0, sr=48000, channels=2, fmt="OGG", subtype="VORBIS")
    result = Tagger.from_checkpoint(ckpt, device="cpu").tag(audio)
    mel = compute_logmel(load_audio(audio, 32000))[None, None]  # (1, 1, 128, 1001), in dB
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores = 1 / (1 + np.exp(-sess.run(["logits"], {"logmel": mel})[0][0]))
    np.testing.assert_allclose(scores, result.scores, rtol=0, atol=1e-4)


def test_metadata_and_no_normalization(exported, tmp_path):
    ckpt, path = exported
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    desc = json.loads(meta["audioset_dcls"])
    assert desc["labels"] == LABELS and desc["onnx"]["includes_normalization"] is True
    bare = export_onnx(ckpt, tmp_path / "bare.onnx", include_normalization=False)
    model, info = load_model(ckpt, bake=True)
    x = torch.randn(2, 1, 128, 1001)
    with torch.no_grad():
        ref = model(x).numpy()
    got = ort.InferenceSession(str(bare), providers=["CPUExecutionProvider"]).run(["logits"], {"logmel": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
