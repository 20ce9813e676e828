"""What only a GPU can check: the DCLS layer, the paper models, training with resume, tagging and
evaluation on CUDA in bf16, against the CPU in fp32. Marked ``gpu``: skipped without CUDA, run by
``scripts/gpu_check.sh`` (``pytest -m gpu``). ``AUDIOSET_DCLS_GPU_TESTS_ON_CPU=1`` runs them on
the CPU instead, to check the tests themselves where no GPU is lent (the check's ``--quick`` mode);
there the models and training run in fp32 (bf16 is emulated on most CPUs: 10x slower).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from audioset_dcls.models import create_model, list_models, to_inference
from audioset_dcls.models.dcls import DclsConv2d
from train_shards import session_shards

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("AUDIOSET_DCLS_GPU_TESTS_ON_CPU") == "1":
        return torch.device("cpu")
    pytest.skip("needs a CUDA device (AUDIOSET_DCLS_GPU_TESTS_ON_CPU=1 runs it on the CPU)")


def _bf16(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; off on the CPU stand-in."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b.float().cpu()).abs().max() / b.float().abs().max().cpu()).item()


def test_dcls_layer_forward_and_gradients_match_the_cpu(device):
    torch.manual_seed(0)
    ref = DclsConv2d(32)
    dev = DclsConv2d(32).to(device)
    dev.load_state_dict(ref.state_dict())
    x = torch.randn(2, 32, 40, 60)
    out_ref = ref(x)
    out_ref.square().sum().backward()
    out = dev(x.to(device))
    out.square().sum().backward()
    assert _rel(out, out_ref) < 1e-4
    for (name, a), b in zip(dev.named_parameters(), ref.parameters()):
        assert _rel(a.grad, b.grad) < 1e-3, name
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out_bf16 = dev(x.to(device))
    assert _rel(out_bf16, out_ref) < 3e-2


@pytest.mark.parametrize("name", list_models(paper=True))
def test_paper_model_trains_in_bf16_and_bakes_on_the_device(name, device):
    """One bf16 forward + backward (finite, every parameter gets a gradient), then the baked
    inference form gives the training form's outputs on the device."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=527).to(device).train()
    x = torch.randn(2, 1, 128, 201, device=device)  # a 2 s clip: the shapes that matter, less time
    with _bf16(device):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), torch.zeros(2, 527, device=device))
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:5]
    model.eval()
    with torch.no_grad():
        trained_form = model(x)
        baked = to_inference(model)(x)
    assert _rel(baked, trained_form) < 1e-3


def _train(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def test_bf16_training_checkpoints_resumes_and_evaluates_on_the_device(device, tmp_path, tmp_path_factory):
    """train.py as users run it on one GPU: bf16, a checkpoint, --resume, the final evaluation,
    the exported model; then the evaluate command on the exported model gives the same mAP."""
    train_dir, eval_dir = session_shards(tmp_path_factory, 2.0)
    out = tmp_path / "run"
    common = ["--config", "configs/tiny.yaml", f"data.train={train_dir}", f"data.eval={eval_dir}",
              f"train.output_dir={out}", f"train.mixed_precision={'bf16' if device.type == 'cuda' else 'no'}",
              "schedule.epochs=1", "schedule.warmup_epochs=0", "data.samples_per_epoch=64",
              "train.checkpoint_every_steps=4", "train.progress_bar=false", "train.tracker=none", "data.num_workers=2"]
    first = _train(common + ["train.max_steps=4"])
    assert first.returncode == 0, first.stderr[-3000:]
    second = _train(common + ["--resume"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    assert "mixed precision bf16" in first.stderr or device.type == "cpu"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["step"] == 8 and summary["eval"]["num_clips"] > 0
    assert all(map(lambda v: v == v, [summary["loss_first"], summary["loss_last"]]))  # not NaN
    ev = subprocess.run([sys.executable, "-m", "audioset_dcls.training.evaluate", "--checkpoint", str(out / "model.safetensors"),
                         "--shards", str(eval_dir), "--output", str(tmp_path / "ev.json"), "--workers", "2"],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads((tmp_path / "ev.json").read_text())
    assert result["num_clips"] == summary["eval"]["num_clips"]
    assert abs(result["mAP"] - summary["eval"]["mAP"]) < 0.02  # bf16 on CUDA: close, not equal
    assert result["precision"] == ("bf16" if device.type == "cuda" else "fp32")
