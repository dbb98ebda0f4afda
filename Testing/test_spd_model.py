"""The .spd.safetensors model file: round trips, LoRA, and every way a file is refused."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from SPDSegmentLib.core import spd_model
from SPDSegmentLib.core.errors import CheckpointError
from SPDSegmentLib.core.models import load_backbone
from SPDSegmentLib.core.saliency import LoRALinear, SaliencyHead, add_lora, lora_state

HIDDEN = 8


def fresh_backbone():
    """A new tiny backbone (the session fixture must not be changed by these tests)."""
    return load_backbone("tiny_sam_test", device="cpu")


def random_head(backbone, seed=0):
    torch.manual_seed(seed)
    head = SaliencyHead(backbone.embed_dim, HIDDEN)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # also GroupNorm's affine weights, not only the convs
    return head.eval()


def perturb(module, seed=1, scale=0.05):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def images(backbone, seed=0):
    torch.manual_seed(seed)
    return torch.rand(2, 3, backbone.input_size, backbone.input_size)


# ---------------------------------------------------------------- round trip

def test_save_load_round_trip(tmp_path):
    backbone = fresh_backbone()
    head = random_head(backbone)
    perturb(backbone.mask_decoder)  # a "tuned" decoder
    header = spd_model.make_header(backbone, head, lora_rank=0, tau=0.4, neighbours=3, decoder_tuned=True,
                                   training={"cases": ["a", "b"]})
    path = spd_model.save(tmp_path / "m.spd.safetensors", backbone, head, header)
    assert path.exists() and not list(tmp_path.glob("*.partial"))

    stored = spd_model.read_header(path)
    for key in ("format", "format_version", "backbone", "backbone_sha256", "lora_rank", "tau", "neighbours",
                "versions", "decoder_tuned", "head_hidden", "input_size", "embed_dim", "created"):
        assert key in stored, key
    assert stored["format"] == spd_model.FORMAT and stored["format_version"] == spd_model.FORMAT_VERSION
    assert stored["backbone"] == "tiny_sam_test" and stored["backbone_sha256"] == backbone.checksum
    assert stored["lora_rank"] == 0 and stored["tau"] == 0.4 and stored["neighbours"] == 3
    assert {"spdsegment", "torch", "python"} <= set(stored["versions"])
    assert stored["training"] == {"cases": ["a", "b"]}

    model = spd_model.load(path)  # the backbone comes from the header's catalogue name
    assert isinstance(model, spd_model.SPDModel)
    assert model.tau == 0.4 and model.neighbours == 3
    assert not model.head.training and not model.backbone.training
    for key, value in head.state_dict().items():
        assert torch.equal(model.head.state_dict()[key], value), key
    untouched = fresh_backbone().mask_decoder.state_dict()
    loaded = model.backbone.mask_decoder.state_dict()
    for key, value in backbone.mask_decoder.state_dict().items():
        if not value.is_floating_point():
            continue
        torch.testing.assert_close(loaded[key], value, atol=2e-3, rtol=1e-3)  # stored as float16
        assert loaded[key].dtype == value.dtype
    moved = [k for k, v in untouched.items() if v.is_floating_point() and not torch.allclose(loaded[k], v)]
    assert moved  # the tuned decoder was loaded, not the catalogue's


def test_without_decoder_tuning_no_decoder_weights_are_stored(tmp_path):
    backbone = fresh_backbone()
    head = random_head(backbone)
    perturb(backbone.mask_decoder)
    header = spd_model.make_header(backbone, head, lora_rank=0, tau=0.5, neighbours=2, decoder_tuned=False)
    path = spd_model.save(tmp_path / "m.spd.safetensors", backbone, head, header)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all(k.startswith("head.") for k in keys)
    model = spd_model.load(path)
    reference = fresh_backbone().mask_decoder.state_dict()
    for key, value in model.backbone.mask_decoder.state_dict().items():
        assert torch.equal(value, reference[key])


def test_head_predicts_the_same_after_loading(tmp_path, tiny_backbone):
    backbone = fresh_backbone()
    head = random_head(backbone, seed=5)
    path = spd_model.save(tmp_path / "m.spd.safetensors", backbone, head,
                          spd_model.make_header(backbone, head, lora_rank=0, tau=0.5, neighbours=2,
                                                decoder_tuned=False))
    model = spd_model.load(path, backbone=fresh_backbone())
    with torch.no_grad():
        emb = tiny_backbone.encode(images(tiny_backbone))
        torch.testing.assert_close(model.head(emb), head(emb), atol=0, rtol=0)


# ---------------------------------------------------------------- LoRA

def test_add_lora_wraps_qkv_and_starts_from_the_backbone():
    backbone = fresh_backbone()
    encoder = backbone.image_encoder
    x = images(backbone)
    with torch.no_grad():
        before = encoder(x)
    wrapped = add_lora(encoder, 4)
    qkv = {name: m for name, m in encoder.named_modules() if name.endswith("qkv")}
    assert wrapped == len(qkv) == 2  # the tiny encoder has two blocks
    assert all(isinstance(m, LoRALinear) and m.rank == 4 for m in qkv.values())
    assert all(torch.count_nonzero(m.lora_b) == 0 for m in qkv.values())
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), before, atol=0, rtol=0)  # B = 0: the same network
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert {n for n in trainable if ".qkv." in n} == {f"{n}.lora_{ab}" for n in qkv for ab in "ab"}
    assert set(lora_state(encoder)) == {f"{n}.lora_{ab}" for n in qkv for ab in "ab"}
    assert add_lora(fresh_backbone().image_encoder, 0) == 0


def lora_model(tmp_path, seed, name="m.spd.safetensors"):
    backbone = fresh_backbone()
    add_lora(backbone.image_encoder, 4)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in backbone.image_encoder.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    head = random_head(backbone, seed)
    header = spd_model.make_header(backbone, head, lora_rank=4, tau=0.5, neighbours=2, decoder_tuned=False)
    return backbone, spd_model.save(tmp_path / name, backbone, head, header)


def test_lora_save_load_reproduces_the_encoder(tmp_path):
    backbone, path = lora_model(tmp_path, seed=2)
    x = images(backbone)
    with torch.no_grad():
        expected = backbone.image_encoder(x)
        plain = fresh_backbone().image_encoder(x)
    assert not torch.allclose(expected, plain, atol=1e-4)  # the adapters change the features
    assert spd_model.read_header(path)["lora_rank"] == 4
    model = spd_model.load(path)
    assert sum(isinstance(m, LoRALinear) for m in model.backbone.image_encoder.modules()) == 2
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.image_encoder(x), expected, atol=1e-6, rtol=1e-6)
    assert "+lora:" in model.identity and model.identity != model.backbone.identity


def test_lora_models_of_equal_size_have_different_cache_identities(tmp_path):
    """The embedding cache keys on the identity: two adapters must never share embeddings."""
    _, path_a = lora_model(tmp_path, seed=2, name="a.spd.safetensors")
    _, path_b = lora_model(tmp_path, seed=3, name="b.spd.safetensors")
    a, b = spd_model.load(path_a), spd_model.load(path_b)
    assert a.identity != b.identity
    assert spd_model.load(path_a).identity == a.identity  # and stable for one file
    # without LoRA the embeddings are the backbone's: the identity is the backbone's
    backbone = fresh_backbone()
    head = random_head(backbone)
    plain = spd_model.save(tmp_path / "plain.spd.safetensors", backbone, head,
                           spd_model.make_header(backbone, head, lora_rank=0, tau=0.5, neighbours=2,
                                                 decoder_tuned=False))
    assert spd_model.load(plain).identity == backbone.identity


# ---------------------------------------------------------------- refusals

def saved(tmp_path, name="m.spd.safetensors", **changes):
    backbone = fresh_backbone()
    head = random_head(backbone)
    header = spd_model.make_header(backbone, head, lora_rank=0, tau=0.5, neighbours=2, decoder_tuned=False)
    header.update(changes)
    return spd_model.save(tmp_path / name, backbone, head, header)


def test_safetensors_without_spd_header_is_refused(tmp_path):
    path = tmp_path / "plain.spd.safetensors"
    save_file({"head.net.0.weight": torch.zeros(2, 2)}, str(path), metadata={"other": "x"})
    with pytest.raises(CheckpointError, match="not an SPD model"):
        spd_model.load(path)
    save_file({"w": torch.zeros(1)}, str(path))  # no metadata at all
    with pytest.raises(CheckpointError, match="spd_header"):
        spd_model.read_header(path)


def test_wrong_format_name_is_refused(tmp_path):
    path = saved(tmp_path, format="something-else")
    with pytest.raises(CheckpointError, match="something-else"):
        spd_model.load(path)


def test_newer_format_version_asks_for_an_update(tmp_path):
    path = saved(tmp_path, format_version=spd_model.FORMAT_VERSION + 1)
    with pytest.raises(CheckpointError, match="(?i)update") as info:
        spd_model.load(path)
    assert str(spd_model.FORMAT_VERSION + 1) in str(info.value)


def test_backbone_checksum_mismatch_names_both(tmp_path):
    path = saved(tmp_path, backbone_sha256="ab" * 32)
    other = fresh_backbone()
    other.name, other.checksum = "other_backbone", "cd" * 32
    with pytest.raises(CheckpointError) as info:
        spd_model.load(path, backbone=other)
    message = str(info.value)
    assert "tiny_sam_test" in message and "other_backbone" in message
    assert "abababababab" in message and "cdcdcdcdcdcd" in message
    assert "m.spd.safetensors" in message


def test_backbone_shape_mismatch_is_refused(tmp_path):
    path = saved(tmp_path, embed_dim=256, input_size=1024)
    with pytest.raises(CheckpointError, match="embed_dim") as info:
        spd_model.load(path)
    assert "input_size" in str(info.value)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    path = saved(tmp_path, head={"type": "conv2", "hidden": HIDDEN * 2})  # the header's head, not the weights'
    with pytest.raises(CheckpointError, match="do not fit"):
        spd_model.load(path)
    # head_hidden is kept for format-1 readers only: the head spec decides
    spd_model.load(saved(tmp_path, "legacy.spd.safetensors", head_hidden=HIDDEN * 2))


def test_unexpected_weight_group_is_refused(tmp_path):
    backbone = fresh_backbone()
    head = random_head(backbone)
    header = spd_model.make_header(backbone, head, lora_rank=0, tau=0.5, neighbours=2, decoder_tuned=False)
    tensors = {f"head.{k}": v.contiguous() for k, v in head.state_dict().items()}
    tensors["evil.x"] = torch.zeros(1)
    path = tmp_path / "m.spd.safetensors"
    save_file(tensors, str(path), metadata={"spd_header": json.dumps(header)})
    with pytest.raises(CheckpointError, match="evil.x"):
        spd_model.load(path)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", bytes(range(256)) * 8,
                                     (10 ** 6).to_bytes(8, "little") + b"{}"])
def test_garbage_file_is_refused(tmp_path, content):
    path = tmp_path / "garbage.spd.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        spd_model.load(path)


@pytest.mark.parametrize("header_text", ["{not json", "[1, 2]", '"a string"'])
def test_unreadable_header_is_refused(tmp_path, header_text):
    path = tmp_path / "m.spd.safetensors"
    save_file({"head.x": torch.zeros(1)}, str(path), metadata={"spd_header": header_text})
    with pytest.raises(CheckpointError):
        spd_model.load(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        spd_model.load(tmp_path / "nope.spd.safetensors")


def test_resolve():
    assert spd_model.resolve("tiny_sam_test") is None  # a backbone name, not an SPD model
    assert spd_model.resolve("x/model.spd.safetensors").name == "model.spd.safetensors"
    path = spd_model.BUNDLED_SPD_MODELS["spd-hippocampus"]
    if path.exists():
        assert spd_model.resolve("spd-hippocampus") == path
    else:
        with pytest.raises(CheckpointError, match="missing"):
            spd_model.resolve("spd-hippocampus")


def test_update_header_keeps_weights(tmp_path, tiny_backbone):
    from safetensors.torch import load_file

    from SPDSegmentLib.core.saliency import SaliencyHead

    head = SaliencyHead(tiny_backbone.embed_dim, 8)
    path = spd_model.save(tmp_path / "m.spd.safetensors", tiny_backbone, head,
                   spd_model.make_header(tiny_backbone, head, lora_rank=0, tau=0.5, neighbours=2,
                                         decoder_tuned=False))
    before = load_file(str(path))
    header = spd_model.update_header(path, evaluation={"dice": {"moderate": 0.8}})
    assert spd_model.read_header(path)["evaluation"] == {"dice": {"moderate": 0.8}} == header["evaluation"]
    after = load_file(str(path))
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)
