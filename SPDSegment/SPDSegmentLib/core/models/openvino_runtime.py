"""OpenVINO inference for the CPU: the same networks, converted once, cached on disk.

Why: on a 2-core CPU eager PyTorch runs the LiteMedSAM encoder at ~1 slice/s; OpenVINO runs the
same graph ~2x faster in fp32 (exact to 1e-5) and ~3.5x faster in bf16 where the CPU has
AVX512-BF16 (docs/performance.md, ``python scripts/runtime_sweep.py``). The mask decoder gains too.

The encoder and "prompt encoder + mask decoder" are converted from the loaded torch modules (LoRA
and a tuned decoder included) with ``openvino.convert_model`` and saved as OpenVINO IR under the
user cache, keyed by a digest of the weights, so conversion (~10 s) happens once per model.
Prompts reach the decoder graph as labelled points, a box as its two corners labelled 2 and 3 and
"no box" as one padding point labelled -1: exactly what SAM's prompt encoder builds internally
(segment-anything's own ONNX export uses the same convention).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..errors import CheckpointError, RuntimeChoiceError
from ..sample import sample_case
from ..volume import apply_range, get_slice, intensity_range, read
from .digest import weights_digest
from ..cache import cache_folder

# openvino and nncf are optional: imported where used, so that PyTorch alone still runs SPD.

# int8: part of the encoder in static int8 (INT8_SCOPE, calibrated once), the rest as bf16 where the
# CPU has it natively, else fp32. Opt-in: docs/performance.md has its speed and Dice.
PRECISIONS = ("fp32", "bf16", "int8")


@contextmanager
def _no_telemetry():
    """OpenVINO's model converter sends usage data to Intel unless a consent file it never asks for when it
    runs as a library says no (``openvino/tools/ovc/telemetry_utils.py``: no opt-in dialog, and no consent
    file counts as consent); ``import openvino`` itself reports (``openvino/tools/ovc/__init__.py``), and so
    does NNCF. SPDSegment sends nothing anywhere without the user's consent, so these run with the
    converter's own "in CI" switch on, which declines (``openvino_telemetry``'s OptInChecker)."""
    before = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = before


def openvino_module():
    """``import openvino``, with the usage report that importing it sends declined (:func:`_no_telemetry`)."""
    with _no_telemetry():
        import openvino
    return openvino


def available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def cpu_supports_bf16() -> bool:
    """True where OpenVINO can run bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 would be emulated."""
    ov = openvino_module()

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class PromptDecoder(nn.Module):
    """SAM's prompt encoder and mask decoder as one graph with tensor-only inputs (traceable)."""

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module, with_mask_input: bool):
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.with_mask_input = with_mask_input

    def forward(self, embeddings: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
                mask_input: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        pe = self.prompt_encoder
        sparse = pe.pe_layer.forward_with_coords(coords + 0.5, pe.input_image_size)
        lab = labels[..., None]
        sparse = sparse * (lab != -1) + pe.not_a_point_embed.weight * (lab == -1)
        for i, embedding in enumerate(pe.point_embeddings):
            sparse = sparse + embedding.weight * (lab == i)
        if self.with_mask_input:
            dense = pe.mask_downscaling(mask_input)
        else:
            h, w = pe.image_embedding_size
            dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(embeddings.shape[0], -1, h, w)
        logits, iou = self.mask_decoder(image_embeddings=embeddings, image_pe=pe.get_dense_pe(),
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=False)
        return logits, iou


def prompt_tokens(points: Optional[np.ndarray], labels: Optional[np.ndarray], box: Optional[np.ndarray]
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """One prompt set -> (1, K, 2) coordinates and (1, K) labels in the PromptDecoder convention.

    Padding points (label -1) of a batched call are dropped: one prompt set is decoded alone.
    """
    coords = np.zeros((0, 2), np.float32) if points is None else np.asarray(points, np.float32).reshape(-1, 2)
    labs = np.zeros(0, np.float32) if labels is None else np.asarray(labels, np.float32).reshape(-1)
    keep = labs != -1
    coords, labs = coords[keep], labs[keep]
    if box is not None:
        coords = np.concatenate([coords, np.asarray(box, np.float32).reshape(2, 2)])
        labs = np.concatenate([labs, np.array([2.0, 3.0], np.float32)])
    else:
        coords = np.concatenate([coords, np.zeros((1, 2), np.float32)])
        labs = np.concatenate([labs, np.array([-1.0], np.float32)])
    return coords[None], labs[None]


def _ir_cache_root() -> Path:
    return cache_folder("openvino")  # a temporary stand-in, with a warning, when the user cache is unusable


_conversions = 0  # networks converted by this process (a model's first use on this machine)


def conversions() -> int:
    """How many networks this process has converted to OpenVINO so far (0: every model came from the cache)."""
    return _conversions


def _convert(module: nn.Module, example: tuple, shapes: list, xml_path: Path) -> None:
    """torch module -> OpenVINO IR at ``xml_path``."""
    ov = openvino_module()

    global _conversions
    _conversions += 1
    with warnings.catch_warnings(), torch.no_grad(), _no_telemetry():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        model = ov.convert_model(module, example_input=example, input=shapes)
    _save(model, xml_path)


def _save(model, xml_path: Path) -> None:
    """Write an OpenVINO model atomically: into a staging folder, renamed into place."""
    ov = openvino_module()

    root = xml_path.parent.parent
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=root))
    try:
        ov.save_model(model, str(staging / xml_path.name), compress_to_fp16=False)
        if xml_path.parent.exists() and not xml_path.exists():
            shutil.rmtree(xml_path.parent)  # the remains of a broken conversion
        try:
            os.rename(staging, xml_path.parent)
        except OSError:  # another process converted the same module meanwhile
            if not xml_path.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _calibration_images(backbone) -> list:
    """Model inputs for int8 calibration: the slices of the bundled sample case (MR hippocampus)."""
    case = sample_case()
    volume = read(case.image)
    lo_hi = intensity_range(volume.array)
    return [backbone.prepare([apply_range(get_slice(volume.array, case.axis, t), *lo_hi)]).cpu().numpy()
            for t in range(volume.shape[case.axis])]


# int8 scope: the matrix products whose inputs come out of a normalisation (attention qkv, MLP fc1,
# the neck). Left in bf16/fp32: MLP fc2 (its GELU input has outliers) and attention proj, which
# doubled the embedding error on left-atrium slices, and the MBConv convolutions (35 % error when
# everything was int8). Measured with scripts/int8_scope.py; docs/performance.md.
INT8_SCOPE = "qkv-fc1-neck"  # part of the cache folder name: a new scope is quantised afresh
INT8_SKIPPED_PATTERNS = [r".*mlp\.fc2.*", r".*mlp\.lin2.*", r".*attn\.proj.*"]  # lin2: fc2 in SAM's ViT


def _int8_ignored_scope(model):
    """NNCF's ignored scope for INT8_SCOPE: every convolution but the neck's, fc2 and proj."""
    import nncf

    convolutions = [op.get_friendly_name() for op in model.get_ordered_ops()
                    if op.get_type_name() == "Convolution" and "neck" not in op.get_friendly_name()]
    return nncf.IgnoredScope(names=convolutions, types=["GroupConvolution"], patterns=INT8_SKIPPED_PATTERNS,
                             validate=False)


def _quantise(model, images: list):
    """Static int8 (NNCF, calibrated on ``images``) for the layers of INT8_SCOPE; the rest stays bf16/fp32."""
    with _no_telemetry():
        try:
            import nncf
        except ImportError as exc:
            raise RuntimeChoiceError("The int8 precision needs NNCF (pip install nncf); or choose bf16 or fp32.",
                                     setting="precision") from exc
        return nncf.quantize(model, nncf.Dataset(images), model_type=nncf.ModelType.TRANSFORMER,
                             subset_size=len(images), ignored_scope=_int8_ignored_scope(model))


class OpenVINORuntime:
    """Compiled encoder and decoder for one backbone; inputs and outputs are torch tensors on the CPU."""

    def __init__(self, backbone, precision: str = "fp32"):
        ov = openvino_module()

        if precision not in PRECISIONS:
            raise RuntimeChoiceError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.precision = precision
        self.input_size = backbone.input_size
        self.embedding_size = tuple(backbone.prompt_encoder.image_embedding_size)
        self.mask_size = tuple(4 * s for s in self.embedding_size)
        hint = "f32" if precision == "fp32" or (precision == "int8" and not cpu_supports_bf16()) else "bf16"
        self._config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                        "INFERENCE_NUM_THREADS": int(torch.get_num_threads())}  # as torch, e.g. set by the tests
        self._core = ov.Core()
        self._backbone = backbone
        self._decoders = {}
        self._lock = threading.Lock()  # an infer request serves one call at a time (GUI runs share models)
        size = self.input_size
        self._encoder = self._compile("encoder", backbone.image_encoder, (torch.zeros(1, 3, size, size),),
                                      [(1, 3, size, size)], int8=precision == "int8")
        self._decoder(with_mask=False)  # at load time, so that a first run never waits for a conversion

    def _compile(self, kind: str, module: nn.Module, example: tuple, shapes: list, int8: bool = False):
        """The IR of ``module`` from the cache (converted first if missing), compiled for this CPU."""
        ov = openvino_module()

        version = ov.__version__.split("-")[0]
        digest = weights_digest(module)[:24]
        fp_path = _ir_cache_root() / f"{kind}-{digest}-ov{version}" / "model.xml"
        xml_path = (_ir_cache_root() / f"{kind}-int8-{INT8_SCOPE}-{digest}-ov{version}" / "model.xml" if int8
                    else fp_path)
        for attempt in (1, 2):
            if not fp_path.exists():
                was_training = module.training
                module.eval()
                try:
                    _convert(module, example, shapes, fp_path)
                finally:
                    module.train(was_training)
            if not xml_path.exists():  # int8: quantised from the converted model, once
                _save(_quantise(self._core.read_model(str(fp_path)),
                                                _calibration_images(self._backbone)), xml_path)
            try:
                model = self._core.read_model(str(xml_path))
                return self._core.compile_model(model, "CPU", self._config).create_infer_request()
            except Exception as exc:  # a truncated or foreign file in the cache: convert once more
                if attempt == 2:
                    raise CheckpointError(f"OpenVINO cannot load the model converted into {xml_path.parent} "
                                          f"({str(exc)[:200]}); choose the torch runtime.", setting="runtime") from exc
                shutil.rmtree(xml_path.parent, ignore_errors=True)
                shutil.rmtree(fp_path.parent, ignore_errors=True)

    def _decoder(self, with_mask: bool):
        """The decoder graph, converted and compiled on first use (the mask-input variant is rarely needed)."""
        if with_mask not in self._decoders:
            backbone = self._backbone
            dim = backbone.embed_dim
            h, w = self.embedding_size
            module = PromptDecoder(backbone.prompt_encoder, backbone.mask_decoder, with_mask)
            example = [torch.zeros(1, dim, h, w), torch.zeros(1, 3, 2), torch.tensor([[1.0, 2.0, 3.0]])]
            shapes = [(1, dim, h, w), (1, -1, 2), (1, -1)]
            if with_mask:
                example.append(torch.zeros(1, 1, *self.mask_size))
                shapes.append((1, 1, *self.mask_size))
            kind = "decoder-mask" if with_mask else "decoder"
            self._decoders[with_mask] = self._compile(kind, module, tuple(example), shapes)
        return self._decoders[with_mask]

    def _infer(self, request, inputs: dict):
        with self._lock:
            try:
                return request.infer(inputs)
            except RuntimeError as exc:  # OpenVINO reports allocation failures as RuntimeError
                if "alloc" in str(exc).lower() or "memory" in str(exc).lower():
                    raise MemoryError(f"OpenVINO ran out of memory: {str(exc)[:200]}") from exc
                raise CheckpointError(f"OpenVINO inference failed ({str(exc)[:200]}); run again with the torch "
                                      "runtime (or set SPDSEGMENT_RUNTIME=torch).", setting="runtime") from exc

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        out = [torch.from_numpy(self._infer(self._encoder, {0: image[None].float().numpy()})[0].copy())
               for image in images.cpu()]
        return torch.cat(out)

    def decode(self, embeddings: torch.Tensor, points, labels, boxes, mask_input) -> Tuple[torch.Tensor, torch.Tensor]:
        logits, scores = [], []
        for b in range(embeddings.shape[0]):
            coords, labs = prompt_tokens(None if points is None else points[b].cpu().numpy(),
                                         None if labels is None else labels[b].cpu().numpy(),
                                         None if boxes is None else boxes[b].cpu().numpy())
            inputs = [embeddings[b:b + 1].float().cpu().numpy(), coords, labs]
            if mask_input is not None:
                inputs.append(mask_input[b:b + 1].float().cpu().numpy())
            result = self._infer(self._decoder(mask_input is not None), dict(enumerate(inputs)))
            logits.append(torch.from_numpy(result[0].copy()))
            scores.append(torch.from_numpy(result[1].copy()).reshape(-1)[:1])
        return torch.cat(logits), torch.cat(scores)
