"""Convert a DCLS-Audio reference checkpoint (K-H-Ismail/DCLS-Audio) into our inference checkpoint.

    python -m audioset_dcls convert CKPT.pth OUT_DIR [--model NAME]
        [--labels class_labels_indices.csv] [--use-ema]

The authors' published weights (Zenodo record 8370979) and anything saved by their training code
are torch pickles ``{"model": state_dict, "optimizer", "epoch", "scaler", "args":
argparse.Namespace[, "model_ema"]}``; a bare state_dict works too. The file is read with
``torch.load(weights_only=True)`` and only ``argparse.Namespace`` and numpy scalars allow-listed,
so a checkpoint can never run code here.

Every reference tensor is mapped onto our timm-based model (the reference uses the original
ConvNeXt / MetaFormer / ml-fastvit layouts; timm's ``checkpoint_filter_fn`` functions document the
same renaming). The conversion is strict: every reference key must be used, every shape must fit
(up to singleton dimensions: Linear <-> 1x1 conv, (C, 1, 1) <-> (C,) layer scales), and every
tensor of our model must be filled. DCLS positions (``P``) and widths (``SIG``) are shared by all
DCLS layers of a stage; the reference stores a copy under every layer's key, so the copies are
checked to be equal and loaded once.

Label names are not in the reference checkpoint. A 527-class checkpoint gets AudioSet's names
from the ``class_labels_indices.csv`` that ships with the package (``labels.audioset_label_set``);
``--labels`` reads another class index instead. A checkpoint with another number of classes and
no ``--labels`` is still written, with an empty label list: taggers then show ``class_<i>``
instead of names, and the summary says so.

The published files (Zenodo record 8370979) are listed in :mod:`audioset_dcls.hub.pretrained`, which
downloads and converts them by name.
"""

from __future__ import annotations

import argparse
import bisect
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..features import REFERENCE_NORMALIZATION, FeatureConfig
from ..files import sha256_file
from ..labels import audioset_label_set, read_label_set
from ..models import create_model
from .checkpoint import CheckpointInfo, save_inference_checkpoint
from .published import PUBLISHED_MODELS

__all__ = [
    "REFERENCE_MODELS",
    "REFERENCE_PARAMETER_COUNTS",
    "ConversionError",
    "ConversionReport",
    "read_reference_checkpoint",
    "detect_reference_model",
    "reference_key_to_ours",
    "convert_state_dict",
    "convert_reference_checkpoint",
    "main",
]

# reference model name (their timm registry) -> ours
REFERENCE_MODELS: dict[str, str] = {
    "convnext_audio_tiny": "convnext_tiny",
    "convnext_dcls_audio_tiny": "convnext_tiny_dcls",
    "convformer_audio_s18": "convformer_s18",
    "convformer_dcls_audio_s18": "convformer_s18_dcls",
    "fastvit_audio_sa24": "fastvit_sa24",
    "fastvit_dcls_audio_sa24": "fastvit_sa24_dcls",
}

# sum(p.numel() for p in model.parameters()) of the reference models at 527 classes (shared DCLS
# positions / widths counted once), measured on the reference code.
REFERENCE_PARAMETER_COUNTS: dict[str, int] = {
    "convnext_audio_tiny": 28_223_855,
    "convnext_dcls_audio_tiny": 28_221_263,
    "convformer_audio_s18": 25_797_847,
    "convformer_dcls_audio_s18": 25_781_207,
    "fastvit_audio_sa24": 21_064_015,
    "fastvit_dcls_audio_sa24": 21_016_655,
}


class ConversionError(ValueError):
    """The input is not a reference checkpoint we can convert exactly. One line, naming the file."""


# --------------------------------------------------------------------------------------------
# Reading the pickle safely


def _allowed_globals() -> list[Any]:
    """What a reference checkpoint legitimately pickles besides tensors and containers: the
    training ``args`` (argparse.Namespace) and, possibly inside it, numpy scalars / dtypes."""
    allowed: list[Any] = [argparse.Namespace]
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core -> numpy._core
    scalar = core.multiarray.scalar
    # pickles written under numpy 1.x name it numpy.core.multiarray.scalar
    allowed += [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    allowed.append(np.dtype)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def _load_pickle_safely(path: Path) -> Any:
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        try:  # name what it wanted; this scan reads the pickle opcodes without executing them
            wanted = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # noqa: BLE001 - not a torch.save file at all
            wanted = []
        if wanted:
            raise ConversionError(
                f"{path}: refused to load: it pickles objects other than tensors, containers and "
                f"argparse.Namespace ({', '.join(wanted)}); not a plain reference checkpoint"
            ) from None
        # torch's message is a paragraph; its cause is the line after "WeightsUnpickler error:"
        cause = [ln.strip() for ln in str(err).split("WeightsUnpickler error:")[-1].splitlines() if ln.strip()]
        raise ConversionError(
            f"{path}: not a readable torch checkpoint, or one that needs objects we do not allow "
            f"({cause[0][:200] if cause else type(err).__name__})"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ConversionError(f"{path}: not a readable torch checkpoint ({first})") from None


@dataclass
class ReferenceCheckpoint:
    """The tensors of one reference model plus what the container said about them."""

    state_dict: dict[str, torch.Tensor]
    source: str  # "model", "model_ema" or "bare state_dict"
    epoch: int | None = None
    args_model: str | None = None  # args.model of the training run, if stored


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def read_reference_checkpoint(path: str | Path, use_ema: bool = False) -> ReferenceCheckpoint:
    """Read a reference training checkpoint (or a bare state_dict) without executing code.

    ``use_ema`` picks ``model_ema`` instead of ``model``. A ``module.`` prefix (DDP) is removed.
    """
    path = Path(path)
    obj = _load_pickle_safely(path)
    epoch = args_model = None
    if _is_state_dict(obj):
        if use_ema:
            raise ConversionError(f"{path}: a bare state_dict has no EMA weights (drop --use-ema)")
        sd, source = obj, "bare state_dict"
    elif isinstance(obj, dict) and "model" in obj:
        key = "model_ema" if use_ema else "model"
        if key not in obj:
            raise ConversionError(f"{path}: no {key!r} entry (has {sorted(map(str, obj))})")
        sd, source = obj[key], key
        if not _is_state_dict(sd):
            raise ConversionError(f"{path}: {key!r} is not a state_dict of tensors")
        if isinstance(obj.get("epoch"), int):
            epoch = obj["epoch"]
        args = obj.get("args")
        if isinstance(getattr(args, "model", None), str):
            args_model = args.model
    else:
        kind = f"dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else type(obj).__name__
        raise ConversionError(f"{path}: expected a reference checkpoint {{'model': state_dict, ...}} or a state_dict, got a {kind}")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return ReferenceCheckpoint(sd, source, epoch, args_model)


# --------------------------------------------------------------------------------------------
# Which model, and where each tensor goes


def detect_reference_model(state_dict: dict[str, torch.Tensor]) -> str:
    """The reference model name (a key of :data:`REFERENCE_MODELS`) from the stem key of each
    family and the presence of DCLS positions (``*.P``). Depth and widths are checked later, key
    by key, against the model built."""
    dcls = any(k.endswith(".P") for k in state_dict)
    if "downsample_layers.0.0.weight" in state_dict:
        return "convnext_dcls_audio_tiny" if dcls else "convnext_audio_tiny"
    if "downsample_layers.0.conv.weight" in state_dict:
        return "convformer_dcls_audio_s18" if dcls else "convformer_audio_s18"
    if "patch_embed.weight" in state_dict and any(k.startswith("network.") for k in state_dict):
        return "fastvit_dcls_audio_sa24" if dcls else "fastvit_audio_sa24"
    first = sorted(state_dict)[:3]
    raise ConversionError(
        "not a DCLS-Audio reference model: none of the ConvNeXt / ConvFormer / FastViT stem keys "
        f"(downsample_layers.0.0.weight, downsample_layers.0.conv.weight, patch_embed.weight) found; first keys {first}"
    )


def _family(reference_name: str) -> str:
    return reference_name.split("_", 1)[0]  # convnext / convformer / fastvit


def _dcls_names(k: str) -> str:
    # Dcls2d.P / .SIG -> DclsConv2d.positions / .widths (same (2, C, 1, K) layout, index 0 = width)
    return re.sub(r"\.SIG$", ".widths", re.sub(r"\.P$", ".positions", k))


def _convnext_key(k: str, _: list[int]) -> str:
    k = re.sub(r"^downsample_layers\.0\.", "stem.", k)
    k = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", k)
    k = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
    k = k.replace(".dwconv.", ".conv_dw.").replace(".pwconv1.", ".mlp.fc1.").replace(".pwconv2.", ".mlp.fc2.")
    k = re.sub(r"^head\.", "head.fc.", k)
    k = re.sub(r"^norm\.", "head.norm.", k)
    return _dcls_names(k)


def _convformer_key(k: str, _: list[int]) -> str:
    k = re.sub(r"^downsample_layers\.0\.conv\.", "stem.conv.", k)
    k = re.sub(r"^downsample_layers\.0\.post_norm\.", "stem.norm.", k)
    k = re.sub(r"^downsample_layers\.(\d+)\.pre_norm\.", r"stages.\1.downsample.norm.", k)
    k = re.sub(r"^downsample_layers\.(\d+)\.conv\.", r"stages.\1.downsample.conv.", k)
    k = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
    k = re.sub(r"^head\.", "head.fc.", k)  # MlpHead: head.fc1 -> head.fc.fc1 ...
    k = re.sub(r"^norm\.", "head.norm.", k)
    return _dcls_names(k)


def _fastvit_key(k: str, stage_ends: list[int]) -> str:
    k = re.sub(r"^patch_embed\.", "stem.", k)
    for old, new in (
        ("rbr_conv", "conv_kxk"), ("rbr_scale", "conv_scale"), ("rbr_skip", "identity"),
        ("conv_exp", "final_conv"), ("lkb_origin", "large_conv"), ("convffn", "mlp"),
        ("se.reduce", "se.fc1"), ("se.expand", "se.fc2"),
    ):
        k = k.replace(old, new)
    k = re.sub(r"layer_scale(_[12])?$", r"layer_scale\1.gamma", k)
    k = re.sub(r"^head\.", "head.fc.", k)
    m = re.match(r"^network\.(\d+)\.(.*)$", k)
    if m:
        # the reference's flat `network` list -> timm stages: PatchEmbed entries (network.N.proj)
        # open a stage; RepCPE (network.N.pe) belongs to the stage whose blocks follow it
        net, rest = int(m.group(1)), m.group(2)
        stage = bisect.bisect_right(stage_ends, net)
        if rest.startswith("proj."):
            k = f"stages.{stage}.downsample.{rest}"
        elif rest.startswith("pe."):
            k = f"stages.{stage}.pos_emb.pos_enc.{rest[3:]}"
        else:
            k = f"stages.{stage}.blocks.{rest}"
    return _dcls_names(k)


_KEY_MAPS: dict[str, Callable[[str, list[int]], str]] = {
    "convnext": _convnext_key,
    "convformer": _convformer_key,
    "fastvit": _fastvit_key,
}


def reference_key_to_ours(reference_name: str, state_dict_keys: list[str]) -> dict[str, str]:
    """{reference key: our key} for every key of a reference state_dict of ``reference_name``."""
    family = _family(reference_name)
    stage_ends = sorted({int(m.group(1)) for k in state_dict_keys for m in [re.match(r"^network\.(\d+)\.proj\.", k)] if m})
    fn = _KEY_MAPS[family]
    return {k: fn(k, stage_ends) for k in state_dict_keys}


def _num_classes(reference_name: str, sd: dict[str, torch.Tensor]) -> int:
    key = "head.fc2.weight" if _family(reference_name) == "convformer" else "head.weight"
    if key not in sd:
        raise ConversionError(f"no classifier {key!r} in the reference state_dict")
    return int(sd[key].shape[0])


def _fit_shape(value: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """``value`` reshaped to ``shape`` when they differ only by singleton dimensions (Linear
    (O, I) vs 1x1 conv (O, I, 1, 1); layer scale (C, 1, 1) vs (C,)); else None."""
    if value.shape == shape:
        return value
    squeeze = lambda s: [d for d in s if d != 1]  # noqa: E731
    if value.numel() == shape.numel() and squeeze(value.shape) == squeeze(shape):
        return value.reshape(shape)
    return None


@dataclass
class ConversionReport:
    """What :func:`convert_state_dict` did."""

    reference_keys: int  # tensors in the reference state_dict
    model_keys: int  # keys of our model's state_dict
    distinct_tensors: int  # distinct tensors of our model filled (shared DCLS pairs once)
    shared_copies_checked: int  # reference copies of shared positions/widths found equal
    reshaped: list[str] = field(default_factory=list)  # reference keys reshaped (singleton dims)


def _short(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


@torch.no_grad()
def convert_state_dict(reference_name: str, reference_sd: dict[str, torch.Tensor], model: nn.Module) -> ConversionReport:
    """Load a reference-layout state_dict into our ``model`` in place, strictly.

    Raises :class:`ConversionError` if a reference key has no place in our model, a shape does
    not fit, a tensor of ours stays unfilled, or the reference's copies of a shared DCLS tensor
    differ. Values are cast to our dtypes (float32 parameters, int64 BatchNorm counters).
    """
    key_map = reference_key_to_ours(reference_name, list(reference_sd))
    own = model.state_dict(keep_vars=True)  # Parameters / buffers themselves, to see sharing
    unexpected, mismatched, reshaped = [], [], []
    filled: dict[str, tuple[str, torch.Tensor]] = {}
    for ref_key, ours in key_map.items():
        if ours not in own:
            unexpected.append(f"{ref_key} (-> {ours})")
            continue
        value = _fit_shape(reference_sd[ref_key], own[ours].shape)
        if value is None:
            mismatched.append(f"{ref_key} {tuple(reference_sd[ref_key].shape)} vs {ours} {tuple(own[ours].shape)}")
            continue
        if value.shape != reference_sd[ref_key].shape:
            reshaped.append(ref_key)
        filled[ours] = (ref_key, value)
    missing = [k for k in own if k not in filled]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} reference tensors have no place in {type(model).__name__}: {_short(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shapes differ: {_short(mismatched)}")
    if missing:
        problems.append(f"{len(missing)} tensors of our model not in the checkpoint: {_short(missing)}")
    if problems:
        raise ConversionError(f"{reference_name} does not map exactly: " + "; ".join(problems))

    # Our DCLS layers of one stage hold the same positions/widths Parameter under several keys:
    # the reference's per-layer copies must agree, then the tensor is loaded once.
    groups: dict[int, list[str]] = {}
    for k, t in own.items():
        groups.setdefault(id(t), []).append(k)
    shared_checked = 0
    for keys in groups.values():
        first_ref, first_val = filled[keys[0]]
        for k in keys[1:]:
            ref_key, val = filled[k]
            if not torch.equal(val, first_val):
                raise ConversionError(
                    f"{reference_name}: {ref_key} differs from {first_ref}, but our model shares one "
                    "tensor between them (DCLS positions/widths are shared per stage)"
                )
            shared_checked += 1
        own[keys[0]].copy_(first_val)
    return ConversionReport(len(reference_sd), len(own), len(groups), shared_checked, reshaped)


# --------------------------------------------------------------------------------------------
# The whole conversion


def _read_labels(path: str | Path | None, num_classes: int) -> list[dict[str, Any]]:
    """[{index, mid, name}] in class order from ``class_labels_indices.csv``; with ``path`` None,
    AudioSet's bundled names for a 527-class checkpoint and none otherwise."""
    if path is None:
        label_set = audioset_label_set()
        return label_set.to_records() if len(label_set) == num_classes else []
    try:
        label_set = read_label_set(path)
    except ValueError as err:  # LabelError: one line naming the file and line
        raise ConversionError(str(err)) from None
    if len(label_set) != num_classes:
        raise ConversionError(f"{path}: {len(label_set)} classes, but the checkpoint has {num_classes} outputs")
    return label_set.to_records()


@dataclass
class ConversionResult:
    """Where the converted checkpoint went and what went into it."""

    path: Path
    reference_name: str
    model_name: str
    num_classes: int
    num_parameters: int
    report: ConversionReport
    source: ReferenceCheckpoint
    labels: int  # number of label names written (0 = none)
    labels_source: str = ""  # the class index they came from

    def summary(self) -> str:
        ref_params = REFERENCE_PARAMETER_COUNTS.get(self.reference_name) if self.num_classes == 527 else None
        r = self.report
        src = self.source
        lines = [
            f"reference model  {self.reference_name}"
            + (f"  (args.model {src.args_model})" if src.args_model and src.args_model != self.reference_name else "")
            + f"; weights from {src.source}" + (f", epoch {src.epoch}" if src.epoch is not None else ""),
            f"our model        {self.model_name}, {self.num_classes} classes",
            f"tensors mapped   {r.reference_keys} reference tensors -> {r.distinct_tensors} distinct tensors"
            + (f" ({r.shared_copies_checked} copies of shared DCLS positions/widths checked equal)" if r.shared_copies_checked else "")
            + (f"; {len(r.reshaped)} reshaped (singleton dims only)" if r.reshaped else ""),
            f"parameters       {self.num_parameters:,}"
            + (f" (reference {ref_params:,})" if ref_params else ""),
            f"front end        reference log-mel (32 kHz, 128 mel, 1001 frames), normalisation ({REFERENCE_NORMALIZATION.mean}, {REFERENCE_NORMALIZATION.std})",
            f"labels           {self.labels} names ({self.labels_source})" if self.labels else
            "labels           NONE: tags will read class_0 .. class_N; rerun with --labels class_labels_indices.csv to name them",
            f"wrote            {self.path}",
        ]
        return "\n".join(lines)


def _build_and_convert(ref: ReferenceCheckpoint, model_name: str | None) -> tuple[str, nn.Module, ConversionReport]:
    """Pick the reference model (given or detected), build ours, load the tensors into it."""
    if model_name is None:
        reference_name = detect_reference_model(ref.state_dict)
    else:
        by_ours = {v: k for k, v in REFERENCE_MODELS.items()}
        if model_name in REFERENCE_MODELS:
            reference_name = model_name
        elif model_name in by_ours:
            reference_name = by_ours[model_name]
        else:
            raise ConversionError(f"--model {model_name!r}: choose from {sorted(REFERENCE_MODELS) + sorted(by_ours)}")
    model = create_model(REFERENCE_MODELS[reference_name], num_classes=_num_classes(reference_name, ref.state_dict))
    return reference_name, model, convert_state_dict(reference_name, ref.state_dict, model)


def convert_reference_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    model_name: str | None = None,
    labels_path: str | Path | None = None,
    use_ema: bool = False,
    source_url: str | None = None,
) -> ConversionResult:
    """Convert a reference checkpoint file into ``out_dir/<checkpoint stem>.safetensors``.

    ``model_name``: a reference name (``convnext_dcls_audio_tiny``) or ours (``convnext_tiny_dcls``);
    detected from the keys when None. ``labels_path``: a ``class_labels_indices.csv``; None =
    AudioSet's bundled names (527-class checkpoints). ``source_url``: where the file was
    downloaded from, recorded beside its SHA-256. Raises :class:`ConversionError` on anything inexact.
    """
    checkpoint = Path(checkpoint)
    ref = read_reference_checkpoint(checkpoint, use_ema=use_ema)
    try:
        reference_name, model, report = _build_and_convert(ref, model_name)
    except ConversionError as err:
        raise ConversionError(f"{checkpoint}: {err}") from None
    num_classes = _num_classes(reference_name, ref.state_dict)
    ours = REFERENCE_MODELS[reference_name]
    labels = _read_labels(labels_path, num_classes)
    labels_source = str(labels_path) if labels_path is not None else "AudioSet class_labels_indices.csv, bundled"

    info = CheckpointInfo(
        model_name=ours,
        num_classes=num_classes,
        features=FeatureConfig(),
        normalization=REFERENCE_NORMALIZATION,
        labels=labels,
        extra={
            "converted_from": {
                "file": checkpoint.name,
                "url": source_url,
                "sha256": sha256_file(checkpoint),
                "reference_model": reference_name,
                "weights": ref.source,
                "epoch": ref.epoch,
                "published_map": next((m.paper_map for m in PUBLISHED_MODELS.values() if m.file == checkpoint.name), None),
            }
        },
    )
    out = Path(out_dir) / f"{checkpoint.stem}.safetensors"
    save_inference_checkpoint(out, model.state_dict(), info)
    num_parameters = sum(p.numel() for p in model.parameters())  # shared Parameters once
    return ConversionResult(out, reference_name, ours, num_classes, num_parameters, report, ref, len(labels),
                            labels_source)


def main(argv: list[str] | None = None) -> int:
    """Command line: convert one reference checkpoint, print a summary; exit 1 with a one-line
    error if it cannot be converted exactly."""
    p = argparse.ArgumentParser(
        prog="audioset-dcls convert",
        description="Convert a DCLS-Audio reference checkpoint (.pth) into an audioset_dcls inference checkpoint.",
    )
    p.add_argument("checkpoint", type=Path, help="reference .pth (training checkpoint or bare state_dict)")
    p.add_argument("out_dir", type=Path, help="folder for <checkpoint stem>.safetensors")
    p.add_argument("--model", default=None, help=f"skip detection: one of {', '.join(REFERENCE_MODELS)} (or our names)")
    p.add_argument("--labels", type=Path, default=None,
                   help="a class_labels_indices.csv whose names are stored in the checkpoint (default: "
                        "AudioSet's 527 names, shipped with the package, for 527-class checkpoints)")
    p.add_argument("--use-ema", action="store_true", help="convert the model_ema weights instead of model")
    args = p.parse_args(argv)
    try:
        result = convert_reference_checkpoint(args.checkpoint, args.out_dir, args.model, args.labels, args.use_ema)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
