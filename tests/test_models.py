"""The model registry: shapes, surgery counts, parameter counts vs the reference audio models,
shared DCLS positions, baking, checkpoints, optimiser groups, ImageNet init from a local file.

Big models run at batch 1 on a short input (128 x 200); the heavier checks use the tiny ones.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from audioset_dcls.hub.checkpoint import CheckpointInfo, load_model, save_inference_checkpoint
from audioset_dcls.models import (
    DclsConv2d,
    create_model,
    dcls_layers,
    find_depthwise_convs,
    list_models,
    model_info,
    param_groups,
    shared_dcls_parameters,
    to_inference,
)

# Parameter counts of the reference audio models (527 classes, 1-channel (2, 16) stem), measured on
# the reference code (K-H-Ismail/DCLS-Audio at e139018; docs/method.md).
REFERENCE_PARAMS = {
    "convnext_tiny": 28_223_855,
    "convnext_tiny_dcls": 28_221_263,
    "convformer_s18": 25_797_847,
    "convformer_s18_dcls": 25_781_207,
    "fastvit_sa24": 21_064_015,
    "fastvit_sa24_dcls": 21_016_655,
}
REPLACED = {"convnext_tiny_dcls": 18, "convformer_s18_dcls": 18, "fastvit_sa24_dcls": 25, "convnext_atto_dcls": 12}
TINY = "convnext_atto_dcls"
DCLS_MODELS = sorted(REPLACED)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared Parameters counted once


def _input(batch: int = 1, frames: int = 200, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, 128, frames, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _perturb_(model: nn.Module, seed: int = 0) -> None:
    # Fresh models have zero biases, unit norms and identical widths; perturbing every tensor makes
    # state-dict and baking checks sensitive to a misplaced tensor.
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)


def test_registry_has_the_paper_models_and_tiny_ones():
    names = set(list_models())
    assert set(list_models(paper=True)) == set(REFERENCE_PARAMS)
    assert model_info("convnext_tiny_dcls").paper_map == "45.52 ± 0.05"
    assert not model_info("convnext_atto_dcls").in_paper
    assert set(REFERENCE_PARAMS) <= names
    assert {"convnext_atto", "convnext_atto_dcls"} <= names
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet50")


@pytest.mark.parametrize("name", list_models())
def test_forward_shape_params_replacements_and_baking(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=527).eval()
    _perturb_(model)
    # oneDNN's NCHW depthwise path for 23x23 kernels is 10-50x slower than its NHWC one
    channels_last = []
    for _, layer in dcls_layers(model):
        layer.register_forward_pre_hook(
            lambda mod, args: channels_last.append(
                args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()
            )
        )
    batch = 2 if "atto" in name else 1
    x = _input(batch, 160)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (batch, 527) and torch.isfinite(y).all()
    assert all(channels_last) and len(channels_last) == REPLACED.get(name, 0)

    if name in REFERENCE_PARAMS:
        assert _n_params(model) == REFERENCE_PARAMS[name]
    n_dcls = len(dcls_layers(model))
    assert n_dcls == REPLACED.get(name, 0)
    if not n_dcls:
        assert len(find_depthwise_convs(model, 7)) == REPLACED.get(name + "_dcls", 12)
        return
    assert find_depthwise_convs(model, 7) == []  # no 7x7 depthwise conv is left behind
    with torch.no_grad():
        baked = to_inference(model)
        out = baked(x)
    assert baked is model and dcls_layers(baked) == []
    assert len(find_depthwise_convs(baked, 23)) == n_dcls
    torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-5 * y.abs().max().item())


@pytest.mark.parametrize(
    "name, stem_path, bias",
    [("convnext_atto", "stem.0", True), ("convformer_s18", "stem.conv", False), ("fastvit_sa24", "stem", False)],
)
def test_patch_stem_maps_10s_clip_to_64x62(name, stem_path, bias):
    model = create_model(name)
    stem = model.get_submodule(stem_path)
    assert isinstance(stem, nn.Conv2d)
    assert stem.in_channels == 1 and stem.kernel_size == (2, 16) and stem.stride == (2, 16)
    assert (stem.bias is not None) == bias
    with torch.no_grad():
        assert stem(torch.zeros(1, 1, 128, 1001)).shape[-2:] == (64, 62)


def test_layer_scale_and_head_match_reference_choices():
    convformer = create_model("convformer_s18")
    assert convformer.get_submodule("head.fc.norm").eps == 1e-5  # reference MlpHead: nn.LayerNorm default
    assert convformer.get_submodule("stem.norm").eps == 1e-6
    convnext = create_model("convnext_atto", layer_scale_init_value=1e-6)
    assert torch.all(convnext.stages[0].blocks[0].gamma == 1e-6)


@pytest.mark.parametrize("name", DCLS_MODELS)
def test_positions_shared_per_stage(name):
    model = create_model(name)
    layers = dcls_layers(model)
    by_stage: dict[str, set[int]] = {}
    for path, layer in layers:
        by_stage.setdefault(".".join(path.split(".")[:2]), set()).add(id(layer.positions))
        assert layer.positions.shape == layer.widths.shape == (2, layer.channels, 1, 26)
    assert len(by_stage) == 4 and all(len(ids) == 1 for ids in by_stage.values())
    assert len(shared_dcls_parameters(model)) == 8  # positions + widths, 4 stages
    # reference checkpoint layout: the shared tensor under every layer's key
    keys = model.state_dict().keys()
    assert sum(k.endswith(".positions") for k in keys) == len(layers)
    if name == "fastvit_sa24_dcls":  # RepCPE shares with the blocks of stage 4
        pe = model.get_submodule("stages.3.pos_emb.pos_enc")
        assert isinstance(pe, DclsConv2d) and pe.bias is not None
        assert pe.positions is model.get_submodule("stages.3.blocks.0.mlp.conv.conv").positions


def test_shared_gradients_accumulate_from_every_layer():
    torch.manual_seed(0)
    shared = create_model(TINY).eval()
    _perturb_(shared)
    untied = copy.deepcopy(shared)
    for _, layer in dcls_layers(untied):  # each layer its own copy of the stage's tensors
        layer.positions = nn.Parameter(layer.positions.detach().clone())
        layer.widths = nn.Parameter(layer.widths.detach().clone())
    x = _input(1, 160)
    shared(x).square().mean().backward()
    untied(x).square().mean().backward()
    for (path, a), (_, b) in zip(dcls_layers(shared), dcls_layers(untied)):
        stage = ".".join(path.split(".")[:2])
        summed = sum(m.positions.grad for p, m in dcls_layers(untied) if p.startswith(stage + "."))
        torch.testing.assert_close(a.positions.grad, summed, rtol=1e-4, atol=1e-7)
        assert not torch.allclose(b.positions.grad, summed)  # one layer alone is not the stage's gradient


def test_sharing_survives_dtype_and_deepcopy():
    model = create_model(TINY).to(torch.float64)
    copied = copy.deepcopy(model)
    for m in (model, copied):
        assert len(shared_dcls_parameters(m)) == 8
        assert all(p.dtype == torch.float64 for p in m.parameters())
    with torch.no_grad():
        assert model(_input(1, 160).double()).dtype == torch.float64


@pytest.mark.parametrize("name", [TINY, "fastvit_sa24_dcls"])
def test_inference_checkpoint_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name).eval()
    _perturb_(model)
    path = save_inference_checkpoint(tmp_path / "m.safetensors", model.state_dict(), CheckpointInfo(name, 527))
    x = _input(1, 160)
    with torch.no_grad():
        ref = model(x)
        unbaked, _ = load_model(path, bake=False)
        torch.testing.assert_close(unbaked(x), ref, rtol=0, atol=0)
        assert len(shared_dcls_parameters(unbaked)) == 8  # loading copies into the shared tensors
        baked = to_inference(unbaked)  # what load_model(path) does by default
        assert dcls_layers(baked) == []
        torch.testing.assert_close(baked(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_param_groups_split():
    model = create_model(TINY)
    groups = param_groups(model, lr=1e-3, weight_decay=0.05, dcls_lr_scale=5.0)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"decay", "no_decay", "dcls"}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    dcls = by_name["dcls"]
    assert {id(p) for p in dcls["params"]} == {id(p) for p in shared_dcls_parameters(model)}
    assert dcls["lr"] == pytest.approx(5e-3) and dcls["weight_decay"] == 0.0
    named = dict(model.named_parameters())
    no_decay = {id(p) for p in by_name["no_decay"]["params"]}
    assert id(named["stem.1.weight"]) in no_decay and id(named["stem.0.bias"]) in no_decay
    assert id(named["stages.0.blocks.0.gamma"]) in no_decay
    decay = {id(p) for p in by_name["decay"]["params"]}
    assert id(named["stages.0.blocks.0.conv_dw.weight"]) in decay  # DCLS element weights decay
    assert id(named["stem.0.weight"]) in decay
    # the training step moves the positions
    opt = torch.optim.AdamW(groups)
    before = dcls["params"][0].detach().clone()
    model(_input(2)).mean().backward()
    opt.step()
    assert not torch.equal(before, dcls["params"][0])


def test_param_groups_fastvit_decays_its_layer_scales_like_the_reference():
    # DCLS-Audio exempts only 1-D tensors and biases, so FastViT's (C, 1, 1) layer scales decay.
    model = create_model("fastvit_sa24")
    groups = {g["name"]: g for g in param_groups(model, 1e-3, 0.05)}
    assert "dcls" not in groups
    gamma = model.get_submodule("stages.0.blocks.0.layer_scale").gamma
    assert gamma.shape == (64, 1, 1)
    assert any(p is gamma for p in groups["decay"]["params"])
    assert all(p.ndim <= 1 for p in groups["no_decay"]["params"])


def test_fastvit_channels_last_and_never_reparameterised():
    from timm.utils.model import reparameterize_model

    model = create_model("fastvit_sa24_dcls").eval()
    assert model.stem.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        feats = model.forward_features(_input(1, 160))
    assert feats.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="never reparameterised"):
        reparameterize_model(model, inplace=True)
    with pytest.raises(RuntimeError, match="never reparameterised"):
        model.get_submodule("stages.0.blocks.0.token_mixer").reparameterize()


def test_autocast_bf16_forward_and_backward():
    model = create_model(TINY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(_input(2))
    assert y.dtype == torch.bfloat16
    y.float().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in shared_dcls_parameters(model))


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    model = create_model(TINY).eval()
    compiled = torch.compile(model, backend="aot_eager")
    x = _input(1, 160)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    compiled(x).mean().backward()
    assert all(p.grad is not None for p in shared_dcls_parameters(model))


def test_baked_model_exports_to_torchscript_and_onnx(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = to_inference(create_model(TINY).eval())
    x = _input(1, 160)
    with torch.no_grad():
        ref = model(x)
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), ref, rtol=1e-5, atol=1e-6)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["mel"], output_names=["logits"])
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"mel": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "name, timm_name, block_key",
    [
        ("convnext_atto", "convnext_atto", "stages.1.blocks.0.mlp.fc1.weight"),
        ("convformer_s18", "convformer_s18", "stages.2.blocks.3.mlp.fc1.weight"),
        ("fastvit_sa24", "fastvit_sa24", "stages.2.blocks.0.mlp.fc1.weight"),
    ],
)
def test_imagenet_init_from_local_timm_checkpoint(name, timm_name, block_key, tmp_path):
    torch.manual_seed(1)
    imagenet = timm.create_model(timm_name, pretrained=False)  # 3 channels, 1000 classes
    path = tmp_path / "imagenet.pth"
    torch.save({"state_dict": imagenet.state_dict()}, path)
    torch.manual_seed(2)
    model = create_model(name, pretrained_path=str(path))
    ours = model.state_dict()
    torch.testing.assert_close(ours[block_key], imagenet.state_dict()[block_key], rtol=0, atol=0)
    assert ours[block_key].shape == imagenet.state_dict()[block_key].shape
    head_weight = [k for k in ours if k.startswith("head.") and k.endswith("weight")][-1]
    assert ours[head_weight].shape[0] == 527
    with torch.no_grad():
        assert model(_input(1)).shape == (1, 527)


def test_imagenet_init_refuses_a_checkpoint_of_another_model(tmp_path):
    other = timm.create_model("convnext_femto", pretrained=False)
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(ValueError, match="does not fit"):
        create_model("convnext_atto", pretrained_path=str(path))
