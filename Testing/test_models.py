"""models: catalogue, backbone loading and checks, downloads."""
from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

from SPDSegmentLib.core.errors import CheckpointError, DownloadError
from SPDSegmentLib.core.models.backbone import pad_points
from SPDSegmentLib.core.models import catalogue, load_backbone
from SPDSegmentLib.core.models import compat, download, registry

REQUIRED = ("title", "architecture", "input_size", "pixel_normalisation", "source", "url", "sha256", "size_bytes",
            "licence")


@pytest.fixture(scope="module")
def litemedsam():
    return load_backbone("litemedsam", "cpu")


# ---------------------------------------------------------------- catalogue

def test_catalogue_entries_are_complete():
    entries = catalogue()
    assert registry.DEFAULT_BACKBONE in entries and registry.DEFAULT_MODEL in registry.BUNDLED_SPD_MODELS
    for name, entry in entries.items():
        missing = [key for key in REQUIRED if key not in entry]
        assert not missing, f"{name} lacks {missing}"
        assert entry["pixel_normalisation"] in ("unit", "imagenet255")
        assert isinstance(entry["input_size"], int) and entry["input_size"] > 0
        assert entry["architecture"] in ("litemedsam", "tiny", *registry.VIT_ARCHITECTURES)
        assert entry["source"] == "url" or entry["source"].startswith(("package:", "random:"))
        if entry["source"] == "url":
            assert entry["url"].startswith("https://") and isinstance(entry["size_bytes"], int)
        if entry["sha256"] is not None:
            assert len(entry["sha256"]) == 64 and int(entry["sha256"], 16) >= 0


# ---------------------------------------------------------------- backbones

def test_tiny_backbone_shapes(tiny_backbone):
    assert tiny_backbone.input_size == 64 and not tiny_backbone.training
    slices = [np.random.default_rng(0).random((40, 50)).astype(np.float32), np.zeros((64, 30), np.float32)]
    images = tiny_backbone.prepare(slices)
    assert images.shape == (2, 3, 64, 64)
    assert torch.all(images[0, :, 52:, :] == 0)  # 40 x 50 -> 51 x 64, padded below
    with torch.no_grad():
        embeddings = tiny_backbone.encode(images)
        assert embeddings.shape == (2, tiny_backbone.embed_dim, 8, 8)
        points, labels = pad_points([np.array([[10.0, 12.0], [20.0, 5.0]]), np.array([[3.0, 4.0]])],
                                       [np.array([1, 0]), np.array([1])])
        assert points.shape == (2, 2, 2) and labels.tolist() == [[1, 0], [1, -1]]
        logits, iou = tiny_backbone.decode(embeddings, points, labels)
        assert logits.shape == (2, 1, 32, 32) and iou.shape == (2,)
        logits, iou = tiny_backbone.decode(embeddings, boxes=torch.tensor([[1.0, 2, 30, 40], [0, 0, 10, 10]]))
        assert logits.shape == (2, 1, 32, 32)
        assert tiny_backbone.to_slice(logits, 40, 50).shape == (2, 40, 50)
    with pytest.raises(ValueError):
        tiny_backbone.decode(embeddings)


def test_litemedsam_bundled_checkpoint(litemedsam):
    entry = catalogue()["litemedsam"]
    assert litemedsam.input_size == 256 and litemedsam.checksum == entry["sha256"]
    assert litemedsam.identity.startswith("litemedsam@")
    images = litemedsam.prepare([np.ones((100, 80), np.float32)])
    assert images.shape == (1, 3, 256, 256) and float(images[0, 0, 0, 210]) == 0.0  # padding right of 205 px
    with torch.no_grad():  # decode only: an encode is too slow for the unit tests
        embeddings = torch.zeros(1, 256, 64, 64)
        logits, iou = litemedsam.decode(embeddings, *pad_points([np.array([[100.0, 120.0]])]))
    assert logits.shape == (1, 1, 256, 256) and iou.shape == (1,)


def test_checkpoint_path_with_catalogue_checksum_keeps_settings():
    backbone = load_backbone(str(compat.bundled_litemedsam_checkpoint()), "cpu")
    assert backbone.name == "litemedsam" and backbone.pixel_normalisation == "unit"


def corrupted_copy(tmp_path):
    source = compat.bundled_litemedsam_checkpoint()
    target = tmp_path / "lite_medsam.pth"
    shutil.copyfile(source, target)
    with open(target, "r+b") as handle:
        handle.seek(source.stat().st_size // 2)
        block = handle.read(64)
        handle.seek(-64, 1)
        handle.write(bytes(b ^ 0xFF for b in block))
    return target


def test_corrupted_checkpoint_is_rejected(tmp_path, monkeypatch):
    entry = catalogue()["litemedsam"]
    path = corrupted_copy(tmp_path)
    with pytest.raises(CheckpointError, match="corrupt"):
        download.verify(path, entry["sha256"], entry["size_bytes"])
    with open(path, "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(CheckpointError, match="1000 bytes"):
        download.verify(path, entry["sha256"], entry["size_bytes"])
    # the catalogue route verifies the bundled file before loading it
    monkeypatch.setattr(registry, "cached_path", lambda name: path)
    with pytest.raises(CheckpointError, match="litemedsam checkpoint"):
        load_backbone("litemedsam", "cpu")


def test_garbage_file_is_rejected(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_backbone(str(path), "cpu")
    with pytest.raises(CheckpointError, match="not a known model nor an existing file"):
        load_backbone(str(tmp_path / "absent.pth"), "cpu")


def test_wrong_weights_are_rejected(tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a SAM"):
        load_backbone(str(tmp_path / "other.pth"), "cpu")
    torch.save({"model": {"image_encoder.layers.0.weight": torch.zeros(2)}}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_backbone(str(tmp_path / "partial.pth"), "cpu")
    torch.save({}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="no model weights"):
        load_backbone(str(tmp_path / "empty.pth"), "cpu")


def test_checkpoint_with_code_is_not_executed(tmp_path):
    torch.save({"weights": torch.zeros(2), "config": argparse.Namespace(a=1)}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_backbone(str(tmp_path / "pickled.pth"), "cpu")


def test_no_stand_in_timm_left_behind(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(registry.Path(registry.__file__).parents[3])!r})
        try:
            import timm  # noqa: F401
            importable = True
        except ImportError:
            importable = False
        from SPDSegmentLib.core.models import load_backbone
        load_backbone("litemedsam", "cpu")
        if not importable:
            assert "timm" not in sys.modules and "timm.models" not in sys.modules, "stand-in timm left"
            assert "timm.models.layers" not in sys.modules, "stand-in timm.models.layers left"
            assert all(getattr(m, "__file__", None) for k, m in sys.modules.items() if k.startswith("timm.")), \\
                "module without a file"
            try:
                import timm  # noqa: F401,F811
                raise AssertionError("import timm succeeds after loading: a stand-in is visible")
            except ImportError:
                pass
        print("ok", importable)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")


# ---------------------------------------------------------------- downloads

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture()
def file_server(tmp_path):
    """A local HTTP server over tmp_path/served: (base URL, folder)."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
    server.server_close()


def test_download_verified(tmp_path, file_server):
    url, folder = file_server
    payload = np.random.default_rng(3).bytes(3 * (1 << 20) + 17)
    (folder / "weights.pth").write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    seen = []
    target = tmp_path / "cache" / "weights.pth"
    path = download.download(f"{url}/weights.pth", target, sha, len(payload), progress=lambda d, t: seen.append((d, t)))
    assert path == target and path.read_bytes() == payload
    assert seen[-1] == (len(payload), len(payload))
    assert sorted(p.name for p in target.parent.iterdir()) == ["weights.pth"]
    assert download.download(f"{url}/gone.pth", target, sha) == target  # already there: verified, not fetched


def test_download_wrong_checksum_keeps_nothing(tmp_path, file_server):
    url, folder = file_server
    (folder / "weights.pth").write_bytes(b"not the published file")
    target = tmp_path / "cache" / "weights.pth"
    with pytest.raises(DownloadError, match="discarded"):
        download.download(f"{url}/weights.pth", target, "0" * 64)
    assert list(target.parent.iterdir()) == []
    with pytest.raises(DownloadError):
        download.download(f"{url}/missing.pth", target, "0" * 64)  # HTTP 404
    assert list(target.parent.iterdir()) == []


def test_download_unverified_needs_consent(tmp_path, file_server):
    url, folder = file_server
    (folder / "weights.pth").write_bytes(b"weights")
    target = tmp_path / "weights.pth"
    with pytest.raises(DownloadError, match="No SHA-256"):
        download.download(f"{url}/weights.pth", target, None)
    assert not target.exists()
    assert download.download(f"{url}/weights.pth", target, None, allow_unverified=True).read_bytes() == b"weights"


def test_download_without_network(tmp_path):
    target = tmp_path / "cache" / "x.pth"
    with pytest.raises(DownloadError, match="network"):
        download.download("http://127.0.0.1:9/x.pth", target, "0" * 64, timeout=5)
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SPDSEGMENT_CACHE", str(tmp_path))
    assert download.cache_dir() == tmp_path
    assert registry.cached_path("sam_vit_b") == tmp_path / "checkpoints" / "sam_vit_b_01ec64.pth"
    assert not registry.is_available("sam_vit_b") and registry.is_available("tiny_sam_test")
    with pytest.raises(CheckpointError, match="not on this machine"):
        registry.checkpoint_for("sam_vit_b", allow_download=False)


def test_torch_bf16_autocast_returns_float32_close_to_fp32():
    from SPDSegmentLib.core.models.registry import load_backbone

    reference = load_backbone("tiny_sam_test", device="cpu").set_runtime("torch", "fp32")
    mixed = load_backbone("tiny_sam_test", device="cpu").set_runtime("torch", "bf16")
    assert mixed.runtime_name == "torch-bf16" and mixed.identity.endswith("+bf16")
    images = torch.rand(1, 3, reference.input_size, reference.input_size)
    points, labels = torch.tensor([[[12.0, 20.0]]]), torch.tensor([[1.0]])
    with torch.inference_mode():
        expected = reference.encode(images)
        embeddings = mixed.encode(images)
        logits, iou = mixed.decode(embeddings, points, labels)
        expected_logits, _ = reference.decode(expected, points, labels)
    assert embeddings.dtype == torch.float32 and logits.dtype == torch.float32 and iou.dtype == torch.float32
    assert float((embeddings - expected).norm() / expected.norm()) < 0.05
    assert float((logits - expected_logits).norm() / expected_logits.norm()) < 0.1


def test_a_missing_gpu_is_a_device_error(monkeypatch):
    import torch

    from SPDSegmentLib.core.errors import DeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert registry.resolve_device("auto") == "cpu"
    with pytest.raises(DeviceError, match="no CUDA GPU") as caught:
        registry.resolve_device("cuda:0")
    assert caught.value.setting == "device" and "--" not in str(caught.value)
