"""Load a backbone by catalogue name or checkpoint path; the catalogue drives everything.

Adding a backbone is one entry in ``catalogue.json`` (architecture, input size, URL, SHA-256,
licence). SPD model files (``*.spd.safetensors``) are recognised here and handed to ``spd_model``.
"""
from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Optional

from ..errors import CheckpointError, DeviceError
from . import download
from .compat import bundled_litemedsam_checkpoint, medsam_lite_modules, segment_anything_modules

# torch, and the modules built on it (backbone, litemedsam), are imported inside the functions that need
# them: the Slicer module and the effect read the catalogue at start-up, before PyTorch may be installed.

CATALOGUE_PATH = Path(__file__).with_name("catalogue.json")
DEFAULT_MODEL = "spd-hippocampus"  # the default model of every front end (`spd`, the module, the effect)
DEFAULT_BACKBONE = "litemedsam"  # the default backbone (raw mode, and what SPD models are trained on)
BUNDLED_SPD_MODELS = {DEFAULT_MODEL: Path(__file__).parent / "spd_hippocampus.spd.safetensors",
                      "spd-left-atrium": Path(__file__).parent / "spd_left_atrium.spd.safetensors"}
VIT_ARCHITECTURES = {"vit_b": 768, "vit_l": 1024, "vit_h": 1280}


@lru_cache(maxsize=1)
def catalogue() -> Dict[str, dict]:
    with open(CATALOGUE_PATH, encoding="utf-8") as handle:
        return json.load(handle)


DEVICES = re.compile(r"auto|cpu|cuda(:\d+)?|mps")  # the device names SPDSegment runs on


def check_device(device) -> str:
    """The device name, stripped; DeviceError (setting ``device``) unless it is auto, cpu, cuda, cuda:N or mps.
    Needs no torch: front ends check it before anything loads."""
    if not isinstance(device, str) or not DEVICES.fullmatch(device.strip()):
        raise DeviceError(f"Unknown device {device!r}: choose auto, cpu, cuda (cuda:N for the N-th GPU) or mps "
                          "(Apple GPUs).", setting="device")
    return device.strip()


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when PyTorch sees a CUDA GPU, else "cpu"; other names are checked and returned."""
    import torch

    device = check_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"The device {device!r} was asked for, but PyTorch sees no CUDA GPU; choose the cpu "
                          "device.", setting="device")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise DeviceError(f"The device {device!r} was asked for, but PyTorch sees {torch.cuda.device_count()} CUDA "
                          f"GPU(s), numbered from 0; choose one of them.", setting="device")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError("The device 'mps' was asked for, but PyTorch sees no Apple GPU; choose the cpu device.",
                          setting="device")
    return device


def cached_path(name: str) -> Optional[Path]:
    """Where a catalogue entry's checkpoint is (or would be) on disk."""
    entry = catalogue()[name]
    source = entry["source"]
    if source.startswith("package:"):
        try:
            return bundled_litemedsam_checkpoint()
        except CheckpointError:
            return None
    if source == "url":
        return download.cache_dir() / "checkpoints" / Path(entry["url"]).name
    return None


def is_available(name: str) -> bool:
    entry = catalogue()[name]
    if entry["source"].startswith("random:"):
        return True
    path = cached_path(name)
    return path is not None and path.exists()


def downloadable(name: str) -> bool:
    """Whether SPD downloads the entry's checkpoint itself: a URL with a published SHA-256 to check it by."""
    entry = catalogue()[name]
    return entry["source"] == "url" and bool(entry.get("sha256"))


def manual_download_message(name: str) -> str:
    """What to do for a checkpoint SPD does not download (no published SHA-256)."""
    entry = catalogue()[name]
    return (f"{name} has no published SHA-256, so SPDSegment does not download it (it could not check the file). "
            f"Download {entry['url']} yourself, check it with its publisher, and give the file as the model: its "
            "path on the command line (--model FILE.pth), or as 'Model file' in the SPDSegment module.")


def checkpoint_for(name: str, allow_download: bool = True,
                   progress: Optional[Callable[[int, int], None]] = None) -> Optional[Path]:
    entry = catalogue()[name]
    if entry["source"].startswith("random:"):
        return None
    path = cached_path(name)
    if path is None and entry["source"].startswith("package:"):
        bundled_litemedsam_checkpoint()  # the package is missing: raises, saying what to install
    if path is None:
        raise CheckpointError(f"Model {name!r} has no checkpoint source; see catalogue.json.")
    if not path.exists():
        if entry["source"] == "url" and not downloadable(name):
            raise CheckpointError(manual_download_message(name), setting="model")
        if entry["source"] != "url" or not allow_download:
            raise CheckpointError(f"The checkpoint of {name!r} is not on this machine ({path}).")
        download.download(entry["url"], path, entry["sha256"], entry.get("size_bytes"), progress=progress)
    download.verify(path, entry["sha256"], entry.get("size_bytes"), what=f"{name} checkpoint")
    return path


def _load_state(path: Path) -> dict:
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, not a torch file
        # PyTorch's own message advises weights_only=False, which would run code from the file: not repeated
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint of weights ({_load_failure(exc)}). Check that the file "
            "is complete and is a SAM, MedSAM or LiteMedSAM checkpoint; SPDSegment loads weights only, never "
            "code from a file."
        ) from exc
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path} holds no model weights.")
    return state


def _load_failure(exc: Exception) -> str:
    """What went wrong reading a checkpoint, in our words (PyTorch's text suggests unsafe loading)."""
    text = str(exc)
    if "Weights only load failed" in text or "weights_only" in text:
        detail = text.split("WeightsUnpickler error:", 1)[-1]
        if "global" in detail.lower() or "GLOBAL" in detail:
            return "it holds Python objects besides tensors"
        return "not a PyTorch file (the unpickler found no weights)"
    if "zip" in text.lower() or "central directory" in text.lower():
        return "a damaged or truncated zip archive"
    if "load key" in text or "pickle" in text.lower() or type(exc).__name__ == "UnpicklingError":
        return "not a PyTorch file"
    if isinstance(exc, EOFError) or "ran out of input" in text.lower():
        return "the file ends early"
    return type(exc).__name__


def check_finite(state: dict, what: str) -> None:
    """CheckpointError if a weight tensor holds NaN or infinite values (a damaged file)."""
    import torch

    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{what} is damaged: weight {key!r} holds NaN or infinite values. Copy or download "
                                  "it again.")


def infer_architecture(state: dict) -> str:
    if any(k.startswith("image_encoder.layers.") for k in state):
        return "litemedsam"
    weight = state.get("image_encoder.patch_embed.proj.weight")
    if getattr(weight, "shape", None):
        for arch, dim in VIT_ARCHITECTURES.items():
            if weight.shape[0] == dim:
                return arch
    raise CheckpointError(
        "The checkpoint is not a SAM, MedSAM or LiteMedSAM model (no image_encoder weights of a known shape)."
    )


def build_network(architecture: str, input_size: int = 1024):
    """(image_encoder, prompt_encoder, mask_decoder) with random weights."""
    import torch

    _, MaskDecoder, PromptEncoder, TwoWayTransformer = medsam_lite_modules()

    if architecture == "litemedsam":
        from .litemedsam import build

        return build()
    if architecture == "tiny":
        modeling, _ = segment_anything_modules()
        torch.manual_seed(0)
        dim, size = 32, input_size
        encoder = modeling.ImageEncoderViT(img_size=size, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                                  mlp_ratio=2.0, out_chans=dim, window_size=0, global_attn_indexes=())
        embed = size // 8
    elif architecture in VIT_ARCHITECTURES:
        _, build_sam = segment_anything_modules()
        sam = build_sam.sam_model_registry[architecture](checkpoint=None)
        encoder, dim, embed = sam.image_encoder, 256, input_size // 16
    else:
        raise CheckpointError(f"Unknown architecture {architecture!r}.")
    prompt_encoder = PromptEncoder(embed_dim=dim, image_embedding_size=(embed, embed),
                                   input_image_size=(input_size, input_size), mask_in_chans=16)
    # the batch-aware decoder (one prompt set per image); same weights layout as segment-anything's
    decoder = MaskDecoder(num_multimask_outputs=3,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2048 if dim == 256 else 64,
                                                        num_heads=8 if dim == 256 else 2),
                          transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=256 if dim == 256 else 32)
    return encoder, prompt_encoder, decoder


def assemble(name: str, architecture: str, input_size: int, normalisation: str, state: Optional[dict],
             checksum: Optional[str], device: str):
    from .backbone import Backbone

    encoder, prompt_encoder, decoder = build_network(architecture, input_size)
    backbone = Backbone(name, encoder, prompt_encoder, decoder, input_size, normalisation, checksum)
    if state is not None:
        try:
            result = backbone.load_state_dict(state, strict=False)
        except (RuntimeError, TypeError, ValueError, AttributeError) as exc:  # shapes or values that do not fit
            raise CheckpointError(f"The checkpoint does not fit the {architecture} network "
                                  f"({str(exc).strip().splitlines()[0][:200]}). Choose the matching model type.") from exc
        missing = [k for k in result.missing_keys if not k.endswith("attention_bias_idxs")]
        if missing or result.unexpected_keys:
            raise CheckpointError(
                f"The checkpoint does not fit the {architecture} network: {len(missing)} missing weights "
                f"(e.g. {missing[:2]}) and {len(result.unexpected_keys)} unexpected "
                f"(e.g. {result.unexpected_keys[:2]}). Choose the matching model type."
            )
    backbone = backbone.to(device).eval()
    return backbone.use_channels_last() if device == "cpu" else backbone


def load_backbone(name_or_path: str = DEFAULT_BACKBONE, device: str = "auto", allow_download: bool = True,
                  progress: Optional[Callable[[int, int], None]] = None):
    """A ready Backbone in eval mode. Accepts a catalogue name, or a local .pth/.pt checkpoint."""
    device = resolve_device(device)
    entries = catalogue()
    if name_or_path in entries:
        entry = entries[name_or_path]
        path = checkpoint_for(name_or_path, allow_download, progress)
        state = None if path is None else _load_state(path)
        return assemble(name_or_path, entry["architecture"], entry["input_size"], entry["pixel_normalisation"],
                        state, entry["sha256"], device)
    path = Path(os.path.expanduser(name_or_path))
    if not path.exists():
        raise CheckpointError(
            f"Model {name_or_path!r} is not a known model nor an existing file. SPD models: "
            f"{', '.join(BUNDLED_SPD_MODELS)}, or the path of a .spd.safetensors file (spd train makes one); "
            f"backbones for raw mode: {', '.join(entries)}, or the path of a SAM-family .pth checkpoint. "
            "spd models lists them."
        )
    if path.is_dir():
        raise CheckpointError(f"Model {name_or_path!r} is a folder; give a .spd.safetensors or .pth file.")
    checksum = download.sha256_of(path)
    for name, entry in entries.items():  # a known file under another name keeps its catalogue settings
        if entry.get("sha256") == checksum:
            return assemble(name, entry["architecture"], entry["input_size"], entry["pixel_normalisation"],
                            _load_state(path), checksum, device)
    state = _load_state(path)
    check_finite(state, str(path))  # no checksum to compare with: at least no NaN weights
    architecture = infer_architecture(state)
    size = 256 if architecture == "litemedsam" else 1024
    return assemble(path.stem, architecture, size, "unit" if architecture == "litemedsam" else "imagenet255",
                    state, checksum, device)
