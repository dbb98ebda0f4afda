"""The OpenVINO CPU runtime: the same numbers as eager PyTorch in fp32, a safe cache, a clean fallback."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

from SPDSegmentLib.core.cache import EmbeddingCache  # noqa: E402
from SPDSegmentLib.core.errors import CheckpointError, RuntimeChoiceError  # noqa: E402
from SPDSegmentLib.core.models import openvino_runtime as ovr  # noqa: E402
from SPDSegmentLib.core.models.registry import load_backbone  # noqa: E402
from SPDSegmentLib.core.pipeline import SegmentOptions, segment  # noqa: E402


@pytest.fixture()
def pair():
    """Two copies of the tiny SAM: eager PyTorch and OpenVINO fp32."""
    torch_model = load_backbone("tiny_sam_test", device="cpu")
    ov_model = load_backbone("tiny_sam_test", device="cpu").set_runtime("openvino", "fp32")
    return torch_model, ov_model


def _prompt_sets(size):
    points = torch.tensor([[[10.0, 20.0], [30.0, 40.0]]])
    labels = torch.tensor([[1.0, 0.0]])
    box = torch.tensor([[5.0, 5.0, size - 10.0, size - 20.0]])
    return [(points, labels, None), (points, labels, box), (None, None, box), (points[:, :1], labels[:, :1], box)]


def test_fp32_runtime_matches_eager_pytorch(pair):
    torch_model, ov_model = pair
    size = torch_model.input_size
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = torch_model.encode(images)
        embeddings = ov_model.encode(images)
        assert ov_model.runtime_name == "openvino-fp32" and torch_model.runtime_name == "torch-fp32"
        assert torch.allclose(embeddings, reference, rtol=1e-4, atol=1e-5)
        for points, labels, box in _prompt_sets(size):
            expected, expected_iou = torch_model.decode(reference[:1], points, labels, box)
            logits, iou = ov_model.decode(reference[:1], points, labels, box)
            assert logits.shape == expected.shape
            assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-4)
            assert torch.allclose(iou, expected_iou, atol=1e-5)


def test_padding_points_of_a_batch_are_dropped_like_a_single_decode(pair):
    torch_model, ov_model = pair
    size = torch_model.input_size
    embeddings = torch.randn(2, torch_model.embed_dim, *torch_model.prompt_encoder.image_embedding_size)
    points = torch.tensor([[[10.0, 20.0], [30.0, 40.0]], [[50.0, 60.0], [0.0, 0.0]]])
    labels = torch.tensor([[1.0, 1.0], [1.0, -1.0]])  # the second set was padded by pad_points
    box = torch.tensor([[5.0, 5.0, 60.0, 70.0], [20.0, 25.0, size - 1.0, size - 1.0]])
    with torch.inference_mode():
        batched, _ = ov_model.decode(embeddings, points, labels, box)
        alone, _ = torch_model.decode(embeddings[1:], points[1:, :1], labels[1:, :1], box[1:])
    assert torch.allclose(batched[1:], alone, rtol=1e-4, atol=1e-4)


def test_dense_mask_prompt_matches(pair):
    torch_model, ov_model = pair
    size = torch_model.input_size
    embeddings = torch.randn(1, torch_model.embed_dim, *torch_model.prompt_encoder.image_embedding_size)
    mask = torch.randn(1, 1, *(4 * s for s in torch_model.prompt_encoder.image_embedding_size))
    points, labels, box = _prompt_sets(size)[1]
    with torch.inference_mode():
        expected, _ = torch_model.decode(embeddings, points, labels, box, mask)
        logits, _ = ov_model.decode(embeddings, points, labels, box, mask)
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_segment_gives_the_same_mask_on_both_runtimes(pair, sample_paths):
    from SPDSegmentLib.core import prompts, volume

    torch_model, ov_model = pair
    vol = volume.read(sample_paths["image"])
    clicks = prompts.to_voxels(prompts.read(sample_paths["points"]), vol, axis=1)
    options = SegmentOptions(mode="raw")
    expected = segment(vol, clicks, torch_model, options, cache=EmbeddingCache())
    result = segment(vol, clicks, ov_model, options, cache=EmbeddingCache())
    assert expected.voxels > 0
    assert (result.mask != expected.mask).mean() < 1e-3  # a voxel exactly at logit 0 may flip


def test_conversion_happens_once_and_the_cache_is_reused(monkeypatch):
    load_backbone("tiny_sam_test", device="cpu").set_runtime("openvino", "fp32")

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the converted model is cached")

    monkeypatch.setattr(ovr, "_convert", no_conversion)
    backbone = load_backbone("tiny_sam_test", device="cpu").set_runtime("openvino", "fp32")
    with torch.inference_mode():
        backbone.encode(torch.rand(1, 3, backbone.input_size, backbone.input_size))


def test_a_corrupt_cached_model_is_converted_again(user_cache):
    from SPDSegmentLib.core.models.digest import weights_digest

    backbone = load_backbone("tiny_sam_test", device="cpu").set_runtime("openvino", "fp32")
    xml = list((user_cache / "openvino").glob(f"encoder-{weights_digest(backbone.image_encoder)[:24]}-*/model.xml"))
    assert len(xml) == 1
    xml[0].write_text("<not a model")
    backbone = load_backbone("tiny_sam_test", device="cpu").set_runtime("openvino", "fp32")
    assert xml[0].read_text().startswith("<?xml")  # repaired in place
    with torch.inference_mode():
        assert backbone.encode(torch.rand(1, 3, backbone.input_size, backbone.input_size)).isfinite().all()


def test_a_model_openvino_cannot_load_is_a_clear_error(monkeypatch):
    import openvino as ov

    def refuse(self, *args, **kwargs):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(ov.Core, "compile_model", refuse)
    with pytest.raises(CheckpointError, match="choose the torch runtime") as caught:
        load_backbone("tiny_sam_test", device="cpu").set_runtime("openvino", "fp32")
    assert caught.value.setting == "runtime"


def test_training_with_gradients_never_uses_the_runtime():
    backbone = load_backbone("tiny_sam_test", device="cpu").set_runtime("openvino", "fp32")
    images = torch.rand(1, 3, backbone.input_size, backbone.input_size)
    embeddings = backbone.encode(images)  # gradients enabled: eager PyTorch
    assert embeddings.requires_grad


def test_auto_choices_and_bad_requests(monkeypatch):
    backbone = load_backbone("tiny_sam_test", device="cpu")
    monkeypatch.setattr(ovr, "cpu_supports_bf16", lambda: False)
    assert backbone.set_runtime("auto", "auto").runtime_name == "openvino-fp32"  # no native bf16: fp32
    monkeypatch.setattr(ovr, "cpu_supports_bf16", lambda: True)
    assert backbone.set_runtime("auto", "auto").runtime_name == "openvino-bf16"
    assert backbone.identity.endswith("+bf16")  # bf16 embeddings are cached apart from fp32 ones
    assert backbone.set_runtime("torch", "auto").runtime_name == "torch-fp32"
    assert not backbone.identity.endswith("+bf16")
    with pytest.raises(ValueError, match="runtime must be one of"):
        backbone.set_runtime("tensorrt")
    with pytest.raises(ValueError, match="int8 precision runs on the CPU with OpenVINO"):
        backbone.set_runtime("torch", "int8")
    monkeypatch.setattr(ovr, "available", lambda: False)
    assert backbone.set_runtime("auto", "auto").runtime_name == "torch-fp32"  # falls back to PyTorch
    with pytest.raises(RuntimeChoiceError, match="pip install openvino"):
        backbone.set_runtime("openvino")


def test_bf16_runtime_stays_close_to_fp32(pair):
    torch_model, _ = pair
    bf16 = load_backbone("tiny_sam_test", device="cpu").set_runtime("openvino", "bf16")
    images = torch.rand(1, 3, torch_model.input_size, torch_model.input_size)
    with torch.inference_mode():
        reference = torch_model.encode(images)
        embeddings = bf16.encode(images)
    assert embeddings.dtype == torch.float32
    relative = float((embeddings - reference).norm() / reference.norm())
    assert relative < 0.05  # bf16 keeps ~3 significant digits; its Dice cost: scripts/precision_check.py


def test_prompt_tokens_follow_sam_conventions():
    coords, labels = ovr.prompt_tokens(np.array([[1.0, 2.0]]), np.array([1.0]), None)
    np.testing.assert_array_equal(labels, [[1.0, -1.0]])  # no box: SAM appends one padding point
    coords, labels = ovr.prompt_tokens(np.array([[1.0, 2.0], [0.0, 0.0]]), np.array([0.0, -1.0]),
                                       np.array([3.0, 4.0, 5.0, 6.0]))
    np.testing.assert_array_equal(labels, [[0.0, 2.0, 3.0]])  # padding dropped, box corners 2 and 3
    np.testing.assert_array_equal(coords[0, 1:], [[3.0, 4.0], [5.0, 6.0]])


def test_environment_replaces_auto(monkeypatch):
    backbone = load_backbone("tiny_sam_test", device="cpu")
    monkeypatch.setenv("SPDSEGMENT_RUNTIME", "torch")
    assert backbone.set_runtime().runtime_name == "torch-fp32"
    monkeypatch.setenv("SPDSEGMENT_RUNTIME", "openvino")
    monkeypatch.setenv("SPDSEGMENT_PRECISION", "fp32")
    assert backbone.set_runtime().runtime_name == "openvino-fp32"
    assert backbone.set_runtime("torch", "bf16").runtime_name == "torch-bf16"  # explicit choices win


def test_inference_failures_become_actionable_errors(monkeypatch):
    backbone = load_backbone("tiny_sam_test", device="cpu").set_runtime("openvino", "fp32")

    class Failing:
        def __init__(self, message):
            self.message = message

        def infer(self, inputs):
            raise RuntimeError(self.message)

    images = torch.rand(1, 3, backbone.input_size, backbone.input_size)
    monkeypatch.setattr(backbone.runtime, "_encoder", Failing("Cannot allocate 4 GB"))
    with torch.inference_mode(), pytest.raises(MemoryError, match="out of memory"):
        backbone.encode(images)
    monkeypatch.setattr(backbone.runtime, "_encoder", Failing("unexpected node"))
    with torch.inference_mode(), pytest.raises(CheckpointError, match="torch runtime"):
        backbone.encode(images)


def test_int8_calibrates_on_the_sample_case_and_needs_nncf(monkeypatch):
    import builtins

    backbone = load_backbone("tiny_sam_test", device="cpu")
    images = ovr._calibration_images(backbone)
    assert len(images) > 10 and images[0].shape == (1, 3, backbone.input_size, backbone.input_size)
    real_import = builtins.__import__

    def no_nncf(name, *args, **kwargs):
        if name == "nncf":
            raise ImportError("No module named 'nncf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nncf)
    with pytest.raises(RuntimeChoiceError, match="pip install nncf"):
        backbone.set_runtime("openvino", "int8")


def test_int8_quantises_only_the_layers_of_its_scope(monkeypatch, tmp_path):
    """Inputs of qkv, fc1 (lin1 in SAM's ViT) and the neck get int8; fc2, proj and the rest stay float."""
    pytest.importorskip("nncf")
    monkeypatch.setenv("SPDSEGMENT_CACHE", str(tmp_path))
    backbone = load_backbone("tiny_sam_test", device="cpu")
    monkeypatch.setattr(ovr, "_calibration_images", lambda b: [
        np.random.default_rng(i).random((1, 3, b.input_size, b.input_size), np.float32) for i in range(3)])
    backbone.set_runtime("openvino", "int8")
    assert backbone.runtime_name == "openvino-int8"
    import openvino as ov

    [xml] = tmp_path.glob(f"openvino/encoder-int8-{ovr.INT8_SCOPE}-*/model.xml")
    quantised = set()
    for op in ov.Core().read_model(str(xml)).get_ordered_ops():
        if op.get_type_name() in ("MatMul", "Convolution"):
            source = op.input_value(0).get_node()
            if source.get_type_name() == "FakeQuantize":
                quantised.add(op.get_friendly_name())
    layers = {name.split("/")[0].replace("__module.", "") for name in quantised}
    assert any(".attn.qkv" in n for n in layers) and any(".mlp.lin1" in n for n in layers)
    assert any(n.startswith("neck") for n in layers)
    assert not any(".mlp.lin2" in n or ".attn.proj" in n or "patch_embed" in n for n in layers), layers
    with torch.inference_mode():  # and it runs
        embeddings = backbone.encode(torch.rand(1, 3, backbone.input_size, backbone.input_size))
    assert embeddings.shape[1] == backbone.embed_dim and torch.isfinite(embeddings).all()
