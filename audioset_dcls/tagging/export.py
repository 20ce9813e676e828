"""Export an inference checkpoint to ONNX: the baked model (DCLS layers as plain depthwise
convolutions), dynamic batch axis.

Graph: input ``logmel`` (B, 1, n_mels, num_frames) float32 -> output ``logits`` (B, num_classes).
By default the checkpoint's normalisation ``(x - mean) / std`` is part of the graph, so the input
is the log-mel in dB exactly as ``features.compute_logmel`` returns it (one 10 s window: (128,
1001)); ``--no-normalization`` leaves it out (the input is then the normalised log-mel). The
front end (decode, resample, STFT) stays in Python: it is ``features.py``. Scores are
``sigmoid(logits)``, or ``softmax(logits)`` when the description's ``task`` is ``singlelabel``.

The checkpoint's description (model, features, normalisation, labels) and whether the
normalisation is included are stored in the ONNX model's ``metadata_props``
(``audioset_dcls`` key, JSON), so the .onnx file describes itself like the checkpoint does.

Uses the TorchScript-based exporter (``dynamo=False``, opset 17, the first with LayerNormalization
and well supported by onnxruntime >= 1.14): it needs no extra package (the dynamo exporter needs
``onnxscript``).

    python -m audioset_dcls export --checkpoint model.safetensors --onnx model.onnx [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from ..features import Normalization
from ..hub.checkpoint import load_model
from ..hub.references import resolve_reference

__all__ = ["NormalizedModel", "export_onnx", "main"]

OPSET = 17


class NormalizedModel(nn.Module):
    """``model((x - mean) / std)``: log-mel in dB (B, 1, n_mels, T) -> logits (B, C)."""

    def __init__(self, model: nn.Module, normalization: Normalization):
        super().__init__()
        self.model = model
        self.mean = float(normalization.mean)
        self.std = float(normalization.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def export_onnx(checkpoint: str | Path, out: str | Path, *, include_normalization: bool = True,
                opset: int = OPSET) -> Path:
    """Write the baked model of ``checkpoint`` to ``out`` (.onnx) and return the path.

    Input ``logmel`` (B, 1, n_mels, num_frames), output ``logits`` (B, num_classes); B is dynamic.
    """
    try:  # the optional [export] extra
        import onnx
    except ImportError:
        raise RuntimeError("ONNX export needs onnx: pip install onnx onnxruntime (or the project's [export] extra)") from None
    model, info = load_model(checkpoint, bake=True, device="cpu")
    graph_model = NormalizedModel(model, info.normalization) if include_normalization else model
    graph_model.eval()
    cfg = info.features
    example = torch.zeros(2, 1, cfg.n_mels, cfg.num_frames)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (no onnxscript dependency); its deprecation
        # notice would only confuse users of this command.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            graph_model, (example,), str(out), dynamo=False, opset_version=opset,
            input_names=["logmel"], output_names=["logits"],
            dynamic_axes={"logmel": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )
    proto = onnx.load(str(out))
    description = info.to_dict()
    description["onnx"] = {"input": "logmel", "output": "logits", "includes_normalization": include_normalization,
                           "input_shape": ["batch", 1, cfg.n_mels, cfg.num_frames], "opset": opset}
    entry = proto.metadata_props.add()
    entry.key, entry.value = "audioset_dcls", json.dumps(description)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    return out


def check_onnx(checkpoint: str | Path, onnx_path: str | Path, *, include_normalization: bool = True,
               batch: int = 3, seed: int = 0) -> float:
    """Max |onnxruntime logits - PyTorch logits| on random log-mel-like inputs (B, 1, n_mels, T)."""
    import onnxruntime as ort  # the optional [export] extra

    model, info = load_model(checkpoint, bake=True, device="cpu")
    cfg = info.features
    g = torch.Generator().manual_seed(seed)
    # dB-scale inputs around the dataset statistics, as real log-mels are
    x = info.normalization.mean + info.normalization.std * torch.randn(batch, 1, cfg.n_mels, cfg.num_frames, generator=g)
    with torch.no_grad():
        ref = model(info.normalization.apply(x) if include_normalization else x).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"logmel": x.numpy()})[0]
    return float(abs(got - ref).max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="audioset-dcls export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a .safetensors inference checkpoint, a finished run folder or a published name")
    p.add_argument("--onnx", required=True, type=Path, help="output .onnx file")
    p.add_argument("--no-normalization", action="store_true",
                   help="leave the (x - mean) / std step out of the graph (input = normalised log-mel)")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default: {OPSET})")
    p.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch on random inputs")
    args = p.parse_args(argv)
    try:
        checkpoint = resolve_reference(args.checkpoint).path
        out = export_onnx(checkpoint, args.onnx, include_normalization=not args.no_normalization,
                          opset=args.opset)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): logmel (batch, 1, n_mels, frames) -> logits; "
          f"normalisation {'included' if not args.no_normalization else 'not included'}")
    if args.check:
        diff = check_onnx(checkpoint, out, include_normalization=not args.no_normalization)
        print(f"onnxruntime vs PyTorch: max |logit difference| = {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
