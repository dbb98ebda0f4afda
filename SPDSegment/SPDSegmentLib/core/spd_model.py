"""The SPD model file: one ``.spd.safetensors`` with the weights and a JSON header.

Weights: ``head.*`` (saliency head), ``lora.*`` (encoder adapters, LoRA mode only) and
``decoder.*`` (the stage-2 tuned mask decoder, stored as float16). The header (safetensors
metadata ``spd_header``) names the backbone and its SHA-256, LoRA rank, tau, n, the training data
summary, validation metrics and versions, and ``content_sha256``: a SHA-256 of the weights and the rest
of the header, written on every save. safetensors loads without executing code. Loading checks that
digest (a damaged file is refused; a file saved before digests existed loads with a warning), that
every weight is finite, and compatibility, and says exactly what does not match.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .. import __version__
from .distill import DEFAULT_NEIGHBOURS, DEFAULT_TAU
from .errors import CheckpointError
from .files import IncompleteOutput, atomic_write, register_verifier
from .models.registry import BUNDLED_SPD_MODELS, load_backbone
from .saliency import add_lora, build_head, lora_state

FORMAT = "spdsegment-model"
FORMAT_VERSION = 2  # 2: the header describes the saliency head ("head"); format 1 files load too
SUFFIX = ".spd.safetensors"
DIGEST_KEY = "content_sha256"  # header field: SHA-256 of the weights and the other header fields
# whole-number header and training settings and their ranges (far beyond any use: a value outside is an edited
# or damaged file, and one like a context of a billion slices would only hang)
LIMITS = {"lora_rank": (0, 1024), "head_hidden": (1, 4096), "head_blocks": (0, 64), "head_context": (0, 64),
          "head_upsample": (0, 4), "input_size": (1, 1 << 14), "embed_dim": (1, 1 << 14)}


@dataclass
class SPDModel:
    backbone: "object"  # models.backbone.Backbone, with LoRA and tuned decoder applied
    head: "torch.nn.Module"  # a saliency head (saliency.build_head)
    header: dict
    name: str = "SPD model"  # the bundled name or the file name without .spd.safetensors
    warnings: List[str] = field(default_factory=list)  # e.g. a file without a content digest

    @property
    def tau(self) -> float:
        return float(self.header.get("tau", DEFAULT_TAU))

    @property
    def neighbours(self) -> int:
        return int(self.header.get("neighbours", DEFAULT_NEIGHBOURS))

    @property
    def identity(self) -> str:
        """Cache key part: embeddings depend on the LoRA weights, not only the backbone."""
        if int(self.header.get("lora_rank", 0)) > 0:
            return f"{self.backbone.identity}+lora:{self.header.get('weights_sha', '')[:12]}"
        return self.backbone.identity

    def to(self, device):
        self.backbone.to(device)
        self.head.to(device)
        return self


def make_header(backbone, head, *, lora_rank: int, tau: float, neighbours: int,
                decoder_tuned: bool, **extra) -> dict:
    """The JSON header of a model file: format, backbone and its checksum, LoRA rank, tau, n, versions;
    ``extra`` adds training facts (cases, losses, ...)."""
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone": backbone.name,
        "backbone_sha256": backbone.checksum,
        "input_size": backbone.input_size,
        "embed_dim": backbone.embed_dim,
        "head": head.spec,
        "head_hidden": head.hidden,  # format 1 readers
        "lora_rank": int(lora_rank),
        "tau": float(tau),
        "neighbours": int(neighbours),
        "decoder_tuned": bool(decoder_tuned),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"spdsegment": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    header.update(extra)
    return header


def save(path: os.PathLike, backbone, head, header: dict) -> Path:
    path = Path(path)
    tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    if header.get("lora_rank", 0) > 0:
        tensors.update({f"lora.{k}": v.detach().cpu().contiguous()
                        for k, v in lora_state(backbone.image_encoder).items()})
    if header.get("decoder_tuned"):
        tensors.update({f"decoder.{k}": v.detach().cpu().half().contiguous()
                        for k, v in backbone.mask_decoder.state_dict().items()})
    bad = non_finite(tensors)
    if bad:  # a model that every load would call damaged: never written
        raise CheckpointError(f"Not saving {path.name}: {len(bad)} weight tensors hold NaN or infinite values (e.g. "
                              f"{bad[0]!r}), so training diverged. Lower the learning rates and train again; nothing "
                              "was written.")
    return _write(path, tensors, header)


def content_digest(tensors: dict, header: dict) -> str:
    """SHA-256 of every tensor (name, dtype, shape, bytes) and of the header without its digest field."""
    digest = hashlib.sha256()
    fields = {k: v for k, v in header.items() if k != DIGEST_KEY}
    digest.update(json.dumps(fields, sort_keys=True).encode())
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"|{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _write(path: Path, tensors: dict, header: dict) -> Path:
    """Atomic write (temporary name, read back, then rename) with the content digest in the header."""
    header = json.loads(json.dumps(header))  # exactly what a reader will see (tuples become lists, ...)
    header[DIGEST_KEY] = content_digest(tensors, header)
    data = safetensors_bytes(tensors, metadata={"spd_header": json.dumps(header, sort_keys=True)})
    with atomic_write(path, verify=lambda tmp: verify_file(tmp, header[DIGEST_KEY])) as tmp:
        tmp.write_bytes(data)  # safetensors' own file writer makes 0600 files; this one follows the umask (0644)
    return path


def verify_file(path: os.PathLike, digest: Optional[str] = None) -> None:
    """Read a written model file back (files.IncompleteOutput unless whole): its header parses, and its
    weights and header match the content digest (``digest``: the one meant to be written)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {})["spd_header"])
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a cut file
        raise IncompleteOutput(f"it is not a readable model file ({str(exc).splitlines()[0][:200]})") from None
    recorded = header.get(DIGEST_KEY) if isinstance(header, dict) else None
    if digest is not None and recorded != digest:
        raise IncompleteOutput("its header is not the one that was written")
    if recorded and content_digest(tensors, header) != recorded:
        raise IncompleteOutput("its weights do not match their digest")


def read_header(path: os.PathLike) -> dict:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable SPD model file ({exc}).") from exc
    if "spd_header" not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not an SPD model (no spd_header).")
    try:
        header = json.loads(metadata["spd_header"])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} has a damaged SPD header (not JSON: {exc}).") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a damaged SPD header (a JSON {type(header).__name__}, not an object).")
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {header.get('format')!r}, expected {FORMAT!r}.")
    version = header.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path} has a damaged SPD header (format_version {version!r}).")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer SPDSegment (format {header['format_version']}); this one reads "
            f"format {FORMAT_VERSION}. Update SPDSegment."
        )
    problem = header_problem(header)
    if problem:
        field_name, why = problem
        raise CheckpointError(f"{path} has a header value out of range: {field_name} is "
                              f"{str(header.get(field_name, (header.get('head') or {}).get(field_name[5:])))[:80]!r} "
                              f"({why}). The file was edited or damaged: train or download it again.",
                              setting="model")
    return header


def whole_number_problem(name: str, value) -> Optional[str]:
    """Why ``value`` is not a whole number in ``LIMITS[name]``, or None."""
    low, high = LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
            or not low <= value <= high:
        return f"a whole number from {low} to {high}"
    return None


def header_problem(header: dict) -> Optional[tuple]:
    """(field, what it must be) for the first structural header value a model cannot be built or run with, or
    None. The inference settings (tau, neighbours, fusion, ...) are checked by ``pipeline.load_model`` with
    ``SegmentOptions.validate``, the one validation of the command line, the console API and the engine."""
    values = {name: header[name] for name in ("lora_rank", "head_hidden", "input_size", "embed_dim") if name in header}
    head = header.get("head")
    if head is not None:
        if not isinstance(head, dict) or head.get("type") not in ("context", "conv2"):
            return "head", "a saliency head of type context or conv2"
        values.update({f"head_{key}": head[key] for key in ("hidden", "blocks", "context", "upsample") if key in head})
    for name, value in values.items():
        why = whole_number_problem(name, value)
        if why:
            return name, why
    for name in ("decoder_tuned", "dense_prior", "local_only"):
        if name in header and not isinstance(header[name], bool):
            return name, "true or false"
    views = header.get("views", [])
    if not isinstance(views, list) or not all(isinstance(v, str) for v in views):
        return "views", "a list of view names"
    axes = header.get("axes", [])
    if not isinstance(axes, list) or any(a not in (0, 1, 2) or isinstance(a, bool) for a in axes):
        return "axes", "a list of array axes 0, 1, 2"
    return None


def update_header(path: os.PathLike, **fields) -> dict:
    """Add fields (e.g. evaluation metrics measured after training) to a model file's header."""
    path = Path(path)
    header = read_header(path)
    tensors = load_file(str(path), device="cpu")
    _verify_digest(path, tensors, header)  # never seal a damaged file with a fresh digest
    header.update(fields)
    _write(path, tensors, header)
    return read_header(path)


def _verify_digest(path: Path, tensors: dict, header: dict) -> Optional[str]:
    """CheckpointError if the recorded digest does not match; a warning (returned) if there is none."""
    recorded = header.get(DIGEST_KEY)
    if not recorded:
        return (f"{path.name} records no content digest (saved by an older SPDSegment), so damage to its weights "
                "cannot be detected. Re-save it to add one: python -c \"from SPDSegmentLib.core.spd_model import "
                f"update_header; update_header('{path}')\"")
    actual = content_digest(tensors, header)
    if actual != recorded:
        raise CheckpointError(
            f"{path} is damaged: its weights or header do not match the SHA-256 recorded when it was saved "
            f"({actual[:12]}... instead of {str(recorded)[:12]}...). Copy or download it again, or retrain it."
        )
    return None


def non_finite(tensors: dict) -> List[str]:
    """Names of the floating-point tensors holding NaN or infinite values."""
    return [key for key, value in sorted(tensors.items())
            if value.is_floating_point() and not bool(torch.isfinite(value).all())]


def _check_finite(path: Path, tensors: dict) -> None:
    bad = non_finite(tensors)
    if bad:
        raise CheckpointError(f"{path.name} is damaged: {len(bad)} weight tensors hold NaN or infinite values "
                              f"(e.g. {bad[0]!r}). Copy or download it again, or retrain it.")


register_verifier([SUFFIX], verify_file)


def is_spd_file(path: os.PathLike) -> bool:
    return str(path).endswith(SUFFIX) or str(path).endswith(".safetensors")


def load(path: os.PathLike, device: str = "cpu", backbone=None) -> SPDModel:
    """Load an SPD model; ``backbone`` (optional) must be the one it was trained on."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"SPD model file not found: {path}")
    header = read_header(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path} is not a readable SPD model file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else 'damaged'}).") from exc
    warning = _verify_digest(path, tensors, header)
    _check_finite(path, tensors)
    if not isinstance(header.get("backbone"), str):
        raise CheckpointError(f"{path} has a damaged SPD header (no backbone name).")
    if backbone is None:
        backbone = load_backbone(header["backbone"], device=device)
    problems = []
    if header.get("backbone_sha256") and backbone.checksum != header["backbone_sha256"]:
        problems.append(f"backbone weights: the model was trained on {header['backbone']} "
                        f"(SHA-256 {str(header['backbone_sha256'])[:12]}...), given {backbone.name} "
                        f"(SHA-256 {str(backbone.checksum)[:12]}...)")
    for key, actual in (("input_size", backbone.input_size), ("embed_dim", backbone.embed_dim)):
        if key in header and int(header[key]) != int(actual):
            problems.append(f"{key}: model {header[key]}, backbone {actual}")
    if problems:
        raise CheckpointError(f"{path.name} does not fit this backbone: " + "; ".join(problems) + ".")
    try:
        head = build_head(header.get("head"), backbone.embed_dim, int(header.get("head_hidden", 64)))
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path.name}: its saliency head is not one this SPDSegment knows ({exc}).") from exc
    groups = {"head": {}, "lora": {}, "decoder": {}}
    for key, value in tensors.items():
        group, _, name = key.partition(".")
        if group not in groups:
            raise CheckpointError(f"{path.name}: unexpected weight {key!r}.")
        groups[group][name] = value
    try:
        head.load_state_dict(groups["head"])
        if header.get("lora_rank", 0) > 0:
            add_lora(backbone.image_encoder, int(header["lora_rank"]))
            missing = backbone.image_encoder.load_state_dict(groups["lora"], strict=False)
            if missing.unexpected_keys:
                raise RuntimeError(f"unexpected LoRA weights {missing.unexpected_keys[:3]}")
        if groups["decoder"]:
            backbone.mask_decoder.load_state_dict({k: v.float() for k, v in groups["decoder"].items()})
    except RuntimeError as exc:
        raise CheckpointError(f"{path.name}: weights do not fit ({str(exc).splitlines()[0]}).") from exc
    if not header.get("weights_sha"):  # the cache identity of LoRA embeddings: a digest of the adapters
        digest = hashlib.sha256()
        for key in sorted(groups["lora"]):
            digest.update(key.encode())
            digest.update(groups["lora"][key].float().contiguous().numpy().tobytes())
        header["weights_sha"] = digest.hexdigest()
    name = next((n for n, p in BUNDLED_SPD_MODELS.items() if Path(p) == path), path.name[: -len(SUFFIX)]
                if path.name.endswith(SUFFIX) else path.stem)
    return SPDModel(backbone.to(device).eval(), head.to(device).eval(), header, name=name,
                    warnings=[warning] if warning else [])


def resolve(name_or_path: str) -> Optional[Path]:
    """Path of an SPD model given a bundled name or a file path; None if it is not an SPD model."""
    if name_or_path in BUNDLED_SPD_MODELS:
        path = BUNDLED_SPD_MODELS[name_or_path]
        if not path.exists():
            raise CheckpointError(f"The bundled model {name_or_path} is missing from this installation ({path}).")
        return path
    if is_spd_file(name_or_path):
        return Path(os.path.expanduser(name_or_path))
    return None
