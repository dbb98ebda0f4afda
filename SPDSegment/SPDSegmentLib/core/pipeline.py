"""One run: volume + voxel prompts + model -> 3D mask, saliency, prompt audit, timings.

Steps (docs/architecture.md): encode only the slices the prompts and their n neighbours need,
through the embedding cache; SPD: saliency maps -> Contextual Prompt Distillation -> consensus
points plus the saliency box; raw: the points as they are (optionally with a box around them);
batched decoding; slices stacked into a mask on the original grid. The caller's arrays are never
modified, and nothing is written here: callers write only after success.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import corrections as corrections_
from . import distill
from .cache import default_cache
from .distill import DEFAULT_NEIGHBOURS, DEFAULT_TAU
from .errors import CheckpointError, InputError
from .models.registry import DEFAULT_MODEL, load_backbone, resolve_device
from .progress import Progress
from .prompts import axis_from_name, axis_name, axis_note
from .volume import (CT_WINDOWS, Volume, apply_range, fingerprint_key, get_slice, intensity_range, put_slice,
                     validate_array)

# torch and the modules built on it (spd_model, models.backbone, models.digest) are imported inside the
# functions that need them: Slicer imports this module when it builds the module widget and the effect,
# before PyTorch may even be installed.

MODES = ("auto", "spd", "raw")
MODALITIES = ("auto", "mr", "ct")
EMPTY_SLICE_CHOICES = ("skip", "saliency")
DECODER_PROMPTS = ("points+box", "box")
COMPONENTS = ("all", "clicked")


@dataclass
class SegmentOptions:
    """How :func:`segment` runs. Every field has a default; ``SegmentOptions()`` is the standard SPD run.

    Attributes:
      mode: "spd" (saliency-guided prompt distillation; needs an SPD model), "raw" (the prompts as
        they are, any backbone) or "auto" (spd for an SPD model, raw for a plain backbone).
      tau: saliency a click must exceed to be kept or borrowed; None uses the SPD model's own
        (:data:`distill.DEFAULT_TAU` unless it was trained with another).
      neighbours: n, how many slices on each side a click is borrowed into; None uses the SPD model's own.
      use_box: raw mode: add a box around the points (LiteMedSAM was trained with boxes).
      box_margin_mm: raw mode: the margin of that box, in millimetres.
      local_only: the ablation "local validation only": keep or reject clicks, borrow none.
      empty_slice: a target slice (between the first and last slice with a foreground click) that distillation leaves
        without a prompt: "saliency" decodes it from the box of its saliency map, "skip" leaves it
        empty. "saliency" was measured better at every noise level (docs/benchmarks.md); readers skip
        slices, and a hole in a tubular structure is worse than a guess.
      slice_range: (first, last), inclusive: segment only these slices; None: wherever there are prompts.
      modality: "auto", "mr" or "ct" (CT without a window uses the soft-tissue window).
      window: CT (level, width) in HU, or a preset name of :data:`volume.CT_WINDOWS`.
      batch_size: slices per encoder and decoder call; None: :func:`default_batch_size` of the device.
      return_saliency: also return the saliency volume (SPD mode).
      decoder_prompt: SPD mode: what the decoder is given, "points+box" (the consensus points and the box
        of the saliency component holding them) or "box" (that box alone: the points choose the component
        and the slices); None uses the SPD model's own ("points+box" unless it was trained otherwise).
      fusion: SPD mode: the weight of the saliency probability averaged with the decoder's (0: the
        decoder alone, 1: the saliency map alone); None uses the SPD model's own (0 unless set).
      components: SPD mode: "all" keeps every part of the mask, "clicked" keeps the 3D connected parts
        that hold a kept or borrowed click; None uses the SPD model's own ("all" unless set).
    """

    mode: str = "auto"
    tau: Optional[float] = None
    neighbours: Optional[int] = None
    use_box: bool = True
    box_margin_mm: float = 5.0
    local_only: bool = False
    empty_slice: str = "saliency"
    slice_range: Optional[Tuple[int, int]] = None
    modality: str = "auto"
    window: object = None
    batch_size: Optional[int] = None
    return_saliency: bool = False
    decoder_prompt: Optional[str] = None
    fusion: Optional[float] = None
    components: Optional[str] = None

    def validate(self) -> "SegmentOptions":
        """Check every option before any work; a checked copy (a window "LEVEL,WIDTH" becomes a tuple).

        Raises InputError saying which setting is wrong and what it accepts (``setting`` names it). The
        CLI, the console API and :func:`segment` call it, so a bad value is refused before a model loads.
        """
        def refuse(setting, message):
            raise InputError(message, setting=setting)

        for setting, allowed in (("mode", MODES), ("modality", MODALITIES), ("empty_slice", EMPTY_SLICE_CHOICES)):
            value = getattr(self, setting)
            if value not in allowed:
                refuse(setting, f"The {setting.replace('_', ' ')} {value!r} is not one of {', '.join(allowed)}.")
        for setting, allowed in (("decoder_prompt", DECODER_PROMPTS), ("components", COMPONENTS)):
            value = getattr(self, setting)
            if value is not None and value not in allowed:
                refuse(setting, f"The {setting.replace('_', ' ')} {value!r} is not one of {', '.join(allowed)}.")
        if self.fusion is not None and (not _is_number(self.fusion) or not 0.0 <= float(self.fusion) <= 1.0):
            refuse("fusion", f"fusion is {self.fusion!r}; it is the weight of the saliency map, from 0 to 1.")
        if self.tau is not None and (not _is_number(self.tau) or not 0.0 < float(self.tau) < 1.0):
            refuse("tau", f"tau is {self.tau!r}; it is a saliency probability threshold strictly between 0 and 1 "
                          f"(usually {DEFAULT_TAU}).")
        if self.neighbours is not None and (not _is_integer(self.neighbours) or int(self.neighbours) < 0):
            refuse("neighbours", f"The number of neighbour slices n is {self.neighbours!r}; it is a whole number "
                                 f">= 0 on each side (0: no borrowing; usually {DEFAULT_NEIGHBOURS}).")
        if self.batch_size is not None and (not _is_integer(self.batch_size) or int(self.batch_size) < 1):
            refuse("batch_size", f"The batch size is {self.batch_size!r}; it is the number of slices per network "
                                 "call, a whole number >= 1.")
        if not _is_number(self.box_margin_mm) or float(self.box_margin_mm) < 0:
            refuse("box_margin_mm", f"The box margin is {self.box_margin_mm!r} mm; it must be a number >= 0.")
        slice_range = self.slice_range
        if slice_range is not None:
            if len(tuple(slice_range)) != 2 or not all(_is_integer(v) for v in slice_range):
                refuse("slice_range", f"The slice range is {slice_range!r}; give two slice numbers FIRST LAST.")
            first, last = (int(v) for v in slice_range)
            if first < 0:
                refuse("slice_range", f"The slice range starts at {first}; slice numbers start at 0.")
            if first > last:
                refuse("slice_range", f"The slice range {first} {last} has FIRST > LAST; give the lower slice number "
                                      f"first: {last} {first}.")
            slice_range = (first, last)
        return dataclasses.replace(self, window=parse_window(self.window), slice_range=slice_range)


def _is_number(value) -> bool:
    try:
        return not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _is_integer(value) -> bool:
    return _is_number(value) and float(value) == int(float(value))


def parse_window(window):
    """None, a CT preset name, or (level, width) from a tuple or a "LEVEL,WIDTH" string; InputError otherwise."""
    if window is None or (isinstance(window, str) and not window.strip()):
        return None
    presets = ", ".join(sorted(CT_WINDOWS))
    if isinstance(window, str):
        text = window.strip()
        if text.lower() in CT_WINDOWS:
            return text.lower()
        if "," not in text:
            raise InputError(f"Unknown window preset {window!r}; choose one of {presets}, or give LEVEL,WIDTH in "
                             "Hounsfield units, e.g. 40,400.", setting="window")
        window = text.split(",")
    try:
        level, width = window
    except (TypeError, ValueError):
        raise InputError(f"The window {window!r} is neither a preset ({presets}) nor LEVEL,WIDTH.",
                         setting="window") from None
    if not (_is_number(level) and _is_number(width)) or float(width) <= 0:
        raise InputError(f"The window {window!r}: LEVEL,WIDTH must be two numbers with WIDTH > 0 (e.g. 40,400), or "
                         f"a preset ({presets}).", setting="window")
    return float(level), float(width)


@dataclass
class Result:
    """What :func:`segment` returns; the caller writes it (nothing is written during a run)."""

    mask: np.ndarray  # uint8 (k, j, i), 1 inside the segment
    axis: int  # the slicing axis (array axis)
    slices: List[int]  # the slices that were decoded
    audit: List[distill.AuditEntry] = field(default_factory=list)  # SPD: every click kept/rejected/borrowed
    saliency: Optional[np.ndarray] = None  # float32 (k, j, i), SPD mode with return_saliency
    timings: Dict[str, float] = field(default_factory=dict)  # seconds per stage
    mode: str = "raw"  # "spd" or "raw", as run
    # what looks wrong although the run succeeded (a blank image, no voxels, every click rejected, a model
    # file that could not be checked): each says what to try. The CLI prints them (and fails under --strict);
    # the GUIs show them in their status line.
    warnings: List[str] = field(default_factory=list)
    decoder: str = ""  # which mask decoder ran, e.g. "litemedsam" or "the tuned decoder of spd-hippocampus"
    axis_note: str = ""  # one line: the slicing axis by name and array axis, and where it came from

    @property
    def voxels(self) -> int:
        return int(self.mask.sum())

    def audit_counts(self) -> Dict[str, int]:
        """{"kept": .., "rejected": .., "borrowed": ..} of the audit (zeros in raw mode)."""
        return distill.DistillResult(audit=self.audit).counts()

    def summary(self) -> str:
        """One line for people: mode, slices, voxels and, in SPD mode, the prompt audit counts.

        For example ``spd: 31 slices, 1520 voxels, prompts kept 25 rejected 7 borrowed 48``; the command
        line prints it, and the module and the effect can show it."""
        line = f"{self.mode}: {len(self.slices)} slices, {self.voxels} voxels"
        if self.audit:
            line += ", prompts " + " ".join(f"{status} {count}" for status, count in self.audit_counts().items())
        return line


def default_batch_size(device) -> int:
    """Slices per encoder/decoder call: 1 on a CPU (the fastest for both networks on a 2-core CPU,
    scripts/encoder_sweep.py, docs/performance.md), 16 on a GPU."""
    return 1 if str(getattr(device, "type", device)) == "cpu" else 16


def load_model(name_or_path: str = DEFAULT_MODEL, device: str = "auto", runtime: str = "auto",
               precision: str = "auto"):
    """A Backbone (catalogue name or .pth) or an SPDModel (bundled name or .spd.safetensors), ready for
    inference with the chosen runtime and precision (``Backbone.set_runtime``)."""
    from . import spd_model  # torch

    device = resolve_device(device)
    path = spd_model.resolve(name_or_path)
    model = spd_model.load(path, device=device) if path is not None else load_backbone(name_or_path, device=device)
    backbone = model.backbone if path is not None else model
    check_model_settings(model)
    backbone.set_runtime(runtime, precision)
    return model


MODEL_SETTINGS = ("tau", "neighbours", "fusion", "decoder_prompt", "components")  # what an SPD header may set


def check_model_settings(model) -> None:
    """CheckpointError naming the header field when an SPD model's own settings (tau, n, fusion, decoder prompt,
    components) are out of range: the header goes through ``SegmentOptions.validate`` like every option."""
    header = getattr(model, "header", None) or {}
    try:
        SegmentOptions(**{name: header.get(name) for name in MODEL_SETTINGS}).validate()
    except InputError as exc:
        raise CheckpointError(f"The model {getattr(model, 'name', '')} has a header value out of range: {exc} The "
                              "file was edited or damaged: train or download it again.", setting="model") from None


def trained_axes(model, volume: Volume) -> Tuple[int, ...]:
    """The array axes of ``volume`` along which ``model`` was trained to slice: ``choose_axis``'s preference.

    ``model`` is a loaded model, an SPD model header (dict), or a name / path (None or "": the default
    model); only the header is read. An SPD header's ``"views"`` (anatomical names such as "axial",
    "coronal") are mapped through the image direction (``prompts.axis_from_name``); without them its
    ``"axis"`` (the array axis of the training slices) is taken as it is. A plain backbone, or a model file
    that cannot be read here (loading it reports that), gives no preference.
    """
    header = getattr(model, "header", model)
    if header is None or isinstance(header, str):
        from . import spd_model  # torch

        try:
            path = spd_model.resolve(header or DEFAULT_MODEL)
            header = spd_model.read_header(path) if path is not None and path.is_file() else {}
        except CheckpointError:
            header = {}
    if not isinstance(header, dict):
        return ()  # a plain backbone
    axes: List[int] = []
    views = header.get("views")
    if isinstance(views, (list, tuple)) and views:
        for view in views:
            try:
                axes.append(axis_from_name(view, volume))
            except InputError:
                continue  # a name this version does not know: no preference from it
    elif str(header.get("axis", "")).strip() in ("0", "1", "2"):
        axes.append(int(header["axis"]))
    return tuple(dict.fromkeys(axes))


def encode_slices(backbone, volume: Volume, axis: int, slices: List[int], intensity: Tuple[float, float], *,
                  cache=None, progress: Optional[Progress] = None, batch_size: int = 8,
                  key: Optional[str] = None) -> Dict[int, "object"]:
    """Embeddings (C, E, E) of the given slices; cached ones are not recomputed.

    ``key`` is the cache key of this volume, axis, model and intensity (``Plan.key``); without it, the
    key of ``backbone``'s own weights.
    """
    import torch

    cache = default_cache() if cache is None else cache
    key = key or fingerprint_key(volume, axis, backbone.identity, intensity)
    out, todo = {}, []
    for t in slices:
        hit = cache.get(key, t)
        if hit is None:
            todo.append(t)
        else:
            out[t] = hit
    for start in range(0, len(todo), batch_size):
        if progress is not None:
            progress.step("encode", start, len(todo))
        batch = todo[start:start + batch_size]
        images = [apply_range(get_slice(volume.array, axis, t), *intensity) for t in batch]
        with torch.inference_mode():
            embeddings = backbone.encode(backbone.prepare(images)).float().cpu()
        for t, emb in zip(batch, embeddings):
            cache.put(key, t, emb)
            out[t] = emb
    if progress is not None and todo:
        progress.step("encode", len(todo), len(todo))
    return out


def weights_tag(owner, *modules) -> str:
    """A digest of ``modules``' weights, computed once per loaded model (results are memoised on it)."""
    from .models.digest import weights_digest  # torch

    name = "_weights_tag_" + "_".join(type(m).__name__ for m in modules)
    if getattr(owner, name, None) is None:
        setattr(owner, name, weights_digest(*modules)[:16])
    return getattr(owner, name)


def slice_pixels(backbone, array: np.ndarray, axis: int, slices, intensity: Tuple[float, float]) -> Dict[int, "object"]:
    """Each slice's pixels in the model frame ((S, S) float16, channel 0 of ``Backbone.prepare``): what a
    saliency head that refines with pixels reads. Training and inference both call this (float16 halves
    what training keeps in memory; the pixels are in [0, 1])."""
    import torch

    out = {}
    with torch.inference_mode():
        for t in slices:
            out[t] = backbone.prepare([apply_range(get_slice(array, axis, t), *intensity)])[0, 0].cpu().half()
    return out


def head_logits(model, embeddings: Dict[int, "object"], ts: List[int], pixels: Optional[Dict[int, "object"]] = None):
    """Saliency logits in the model frame (B, 1, L, L) of slices ``ts``, reading neighbours (2.5D heads)
    from ``embeddings`` and pixels (heads that refine with them) from ``pixels``. With gradients when
    the caller has them on: training calls this too."""
    from .saliency import head_input

    device = model.backbone.device
    available = sorted(embeddings)
    emb, image = head_input(model.head, ts, embeddings.__getitem__, available,
                            None if pixels is None else pixels.__getitem__)
    return model.head(emb.to(device), None if image is None else image.to(device))


def saliency_maps(model, embeddings: Dict[int, "object"], targets: List[int], shape_hw: Tuple[int, int],
                  pixels: Optional[Dict[int, "object"]] = None, batch_size: int = 32, dense: Optional[dict] = None,
                  cache=None, key: Optional[str] = None) -> Dict[int, np.ndarray]:
    """Per-slice saliency probabilities on the slice grid, for the ``targets`` slices.

    Args:
      model: an ``SPDModel``.
      embeddings: t -> (C, E, E) for the targets and, for a 2.5D head, their encoded neighbours.
      targets: the slices to map.
      shape_hw: the slice grid (h, w).
      pixels: t -> model-frame pixels (:func:`slice_pixels`), for a head that refines with pixels.
      dense: if a dict, it receives each slice's saliency logits at the decoder's mask-prompt
        resolution (for models trained with the dense prior).
      cache, key: with the embedding cache and the embeddings' key, maps computed by an earlier run
        are recalled instead of recomputed.
    """
    import torch

    maps = {}
    memo_key = None
    if cache is not None and key is not None and dense is None:
        memo_key = _saliency_memo_key(model, key)
        for t in targets:
            hit = cache.recall(memo_key, t)
            if hit is not None:
                maps[t] = hit
    ts = sorted(t for t in targets if t not in maps)
    with torch.inference_mode():
        for start in range(0, len(ts), batch_size):
            batch = ts[start:start + batch_size]
            logits_model = head_logits(model, embeddings, batch, pixels)
            logits = model.backbone.to_slice(logits_model.float(), *shape_hw)
            for t, prob in zip(batch, torch.sigmoid(logits).float().cpu().numpy()):
                maps[t] = prob
                if memo_key is not None:
                    cache.remember(memo_key, t, prob)
            if dense is not None:
                for t, low in zip(batch, model.backbone.mask_prompt(logits_model)):
                    dense[t] = low
    return maps


def _saliency_memo_key(model, key: str) -> str:
    return f"{key}|saliency|{weights_tag(model, model.head)}"


def unmapped_slices(model, targets: List[int], cache=None, key: Optional[str] = None, dense=None) -> List[int]:
    """The targets whose saliency map :func:`saliency_maps` will compute (not remembered from an earlier run):
    the only slices whose pixels a head that refines with them needs (a correction reads none)."""
    if cache is None or key is None or dense is not None:
        return list(targets)
    memo_key = _saliency_memo_key(model, key)
    return [t for t in targets if cache.recall(memo_key, t) is None]


def box_margin_px(spacing_kji, axis: int, margin_mm: float) -> float:
    """A box margin in millimetres as slice pixels (the finer in-plane spacing)."""
    spacing_rc = [float(spacing_kji[a]) for a in range(3) if a != axis]
    return margin_mm / min(spacing_rc)


def spd_jobs(by_slice, maps: Dict[int, np.ndarray], targets: List[int], transform, tau: float, neighbours: int,
             empty_slice: str = "saliency", local_only: bool = False, decoder_prompt: str = "points+box",
             trusted=None, margin_px: float = 5.0):
    """SPD's decoder prompts: (jobs, DistillResult). The one place that turns clicks and saliency maps into
    what the decoder sees, for inference (:func:`segment`) and for stage-2 training alike.

    Each job is (t, points_xy (n, 2) in the model frame, labels (n,), box (4,) in the model frame): the
    consensus points of slice t plus the box of the saliency component holding them; a target slice
    between the first and last slice with a foreground click that is left without points gets the box of its own
    saliency map when ``empty_slice`` is "saliency". With ``decoder_prompt`` "box" the points choose the
    component and the slices, and the decoder is given the box alone. ``trusted`` (slice -> bool beside
    ``by_slice``'s points) marks the user's corrections: never rejected; a trusted foreground point where
    the saliency map has nothing above tau gets a box around the consensus points grown by ``margin_px``.
    """
    distilled = distill.distill(by_slice, maps, tau=tau, neighbours=neighbours, targets=targets,
                                local_only=local_only, trusted=trusted)
    prompted = foreground_slices(by_slice)
    jobs = []
    for t in targets:
        consensus = distilled.consensus.get(t)
        if consensus is not None and len(consensus.positives):
            box = _consensus_box(maps[t], consensus.positives, tau, margin_px)
            if decoder_prompt == "box":
                jobs.append((t, np.zeros((0, 2)), np.zeros(0), transform.box_rc_to_model(*box)))
            else:
                jobs.append((t, transform.rc_to_model_xy(consensus.rc), consensus.labels,
                             transform.box_rc_to_model(*box)))
        elif empty_slice == "saliency" and prompted and prompted[0] <= t <= prompted[-1]:
            box = distill.saliency_box(maps[t], np.zeros((0, 2)), tau=tau)
            if box is not None:
                jobs.append((t, np.zeros((0, 2)), np.zeros(0), transform.box_rc_to_model(*box)))
    return jobs, distilled


def foreground_slices(by_slice) -> List[int]:
    """The slices holding at least one foreground point, in order. Only these reach out to their neighbours: a
    background click removes what it sits in and never makes SPD segment slices it would not have segmented."""
    return sorted(t for t, (_, labels) in by_slice.items() if np.any(np.asarray(labels) > 0))


def _consensus_box(saliency: np.ndarray, positives: np.ndarray, tau: float, margin_px: float):
    """The box of the saliency components holding the consensus points, stretched to hold every one of them (a
    trusted correction may lie where the map is below tau); a box around them grown by ``margin_px`` when the
    map has nothing above tau."""
    box = distill.saliency_box(saliency, positives, tau=tau)
    if box is None:
        return distill.points_box(positives, margin_px, saliency.shape)
    upper = np.array(saliency.shape) - 1
    pixels = np.clip(np.rint(positives).astype(int), 0, upper)  # the pixels distillation sampled
    return np.minimum(box[0], pixels.min(axis=0)), np.maximum(box[1], pixels.max(axis=0))


def raw_jobs(by_slice, targets: List[int], transform, shape_hw: Tuple[int, int], margin_px: float,
             use_box: bool = True):
    """Raw mode's decoder prompts (the clicks as they are, plus a box around them grown by ``margin_px``):
    the same job format as :func:`spd_jobs`, for inference and for the SAM-Tuning baseline's training."""
    jobs = []
    for t in targets:
        if t not in by_slice:
            continue
        rc, labels = by_slice[t]
        positives = np.asarray(rc)[np.asarray(labels) > 0]
        box = None
        if use_box:
            if not len(positives):
                continue  # a box needs a foreground point
            box = transform.box_rc_to_model(*distill.points_box(positives, margin=margin_px, shape=shape_hw))
        jobs.append((t, transform.rc_to_model_xy(rc), np.asarray(labels), box))
    return jobs


def _job_digest(job) -> str:
    _, points, labels, box = job
    digest = hashlib.sha1(np.asarray(points, np.float32).tobytes())
    digest.update(np.asarray(labels, np.float32).tobytes())
    digest.update(b"-" if box is None else np.asarray(box, np.float32).tobytes())
    return digest.hexdigest()[:20]


def prompt_groups(jobs) -> List[List[int]]:
    """Indices of the jobs with points, then of the box-only jobs: each group is decoded as its own batch
    (padding a box-only prompt with a "not a point" token would change what the decoder sees)."""
    with_points = [k for k, job in enumerate(jobs) if len(job[1])]
    box_only = [k for k, job in enumerate(jobs) if not len(job[1])]
    return [group for group in (with_points, box_only) if group]


def job_tensors(jobs):
    """(points (B, N, 2), labels (B, N), boxes (B, 4)) of a batch of jobs from one :func:`prompt_groups`
    group, as the decoder takes them: points padded with label -1, None where the batch has none."""
    import torch

    from .models.backbone import pad_points  # torch

    points = labels = boxes = None
    if any(len(job[1]) for job in jobs):
        points, labels = pad_points([job[1] for job in jobs], [job[2] for job in jobs])
    if jobs[0][3] is not None:
        boxes = torch.as_tensor(np.stack([job[3] for job in jobs]), dtype=torch.float32)
    return points, labels, boxes


def _decode(backbone, embeddings, jobs, shape_hw, *, batch_size, progress, dense=None, cache=None,
            key: Optional[str] = None) -> Dict[int, np.ndarray]:
    """jobs: list of (t, points_xy (n,2), labels (n,), box (4,) or None); dense: t -> mask prompt.

    Returns t -> foreground probability (float16) on the slice grid. With a ``cache`` and the embeddings'
    ``key``, a slice decoded before with exactly the same prompt is recalled (re-prompting decodes only
    what changed).
    """
    import torch

    masks = {}
    memo_keys = {}  # slice -> its memo key (one job per slice)
    if cache is not None and key is not None and not dense:
        tag = weights_tag(backbone, backbone.prompt_encoder, backbone.mask_decoder)
        memo_key = f"{key}|mask|{tag}|{backbone.runtime_name}|{batch_size}"
        memo_keys = {job[0]: f"{memo_key}|{_job_digest(job)}" for job in jobs}
        todo = []
        for job in jobs:
            hit = cache.recall(memo_keys[job[0]], job[0])
            if hit is None:
                todo.append(job)
            else:
                masks[job[0]] = hit
        jobs = todo
    device = backbone.device
    for start in range(0, len(jobs), batch_size):
        if progress is not None:
            progress.step("decode", start, len(jobs))
        batch = jobs[start:start + batch_size]
        emb = torch.stack([embeddings[t] for t, *_ in batch]).to(device)
        points, labels, boxes = job_tensors(batch)
        mask_input = None
        if dense:
            mask_input = torch.stack([dense[t] for t, *_ in batch]).to(device)
        with torch.inference_mode():
            low_res, _ = backbone.decode(emb, points, labels, boxes, mask_input)
            logits = backbone.to_slice(low_res.float(), *shape_hw).cpu().numpy()
        for job, lg in zip(batch, logits):
            masks[job[0]] = (1.0 / (1.0 + np.exp(-np.clip(lg, -30, 30)))).astype(np.float16)
            if memo_keys:
                cache.remember(memo_keys[job[0]], job[0], masks[job[0]])
    if progress is not None and jobs:
        progress.step("decode", len(jobs), len(jobs))
    return masks


@dataclass
class Plan:
    """What a run will do before any network runs: its slices, thresholds and cache key."""
    mode: str
    backbone: "object"
    axis: int
    by_slice: dict
    targets: List[int]  # the slices to segment (prompted slices; in SPD mode the slices with a foreground click and their n neighbours)
    encode: List[int]  # the slices to encode: the targets and, for a 2.5D saliency head, their neighbours
    shape_hw: Tuple[int, int]
    intensity: Tuple[float, float]
    tau: float
    neighbours: int
    batch_size: int
    key: str  # embedding-cache key of this volume, axis, model and intensity range
    decoder_prompt: str = "points+box"  # SPD: what the decoder is given (SegmentOptions.decoder_prompt)
    fusion: float = 0.0  # SPD: weight of the saliency map in the final probability
    components: str = "all"  # SPD: which 3D parts of the mask are kept
    trusted: dict = field(default_factory=dict)  # slice -> bool beside by_slice's points: the user's corrections
    corrections: list = field(default_factory=list)  # SPD: corrections.Correction of each correction click


def plan(volume: Volume, prompts, model, options: SegmentOptions) -> Plan:
    """Decide what a run of :func:`segment` will do, before any network runs.

    Args:
      volume: the image (``Volume``: voxels (k, j, i) and ijk_to_lps); validated here.
      prompts: ``prompts.VoxelPrompts`` on this volume (clicks in continuous ijk, and the slicing axis).
      model: an ``SPDModel`` or a plain ``Backbone`` (``load_model``).
      options: the run's ``SegmentOptions``.

    Returns:
      A ``Plan``: the mode, the slices to encode, tau and n, the intensity range, the batch size and the
      embedding-cache key. The engine's work ahead (``EncodeAhead``) uses it to encode while the user still clicks.

    Raises:
      InputError: SPD mode with a plain backbone, no prompts inside the volume or slice range, or a bad
        image or window.
    """
    from .spd_model import SPDModel  # torch

    options = options.validate()
    validate_array(volume.array)
    is_spd = isinstance(model, SPDModel)
    mode = ("spd" if is_spd else "raw") if options.mode == "auto" else options.mode
    if mode == "spd" and not is_spd:
        raise InputError(f"SPD mode needs an SPD model (for example {DEFAULT_MODEL} or a .spd.safetensors file); "
                         "with a plain backbone use raw mode.")
    backbone = model.backbone if is_spd else model
    axis = int(prompts.axis)
    by_slice, trusted = prompts.by_slice(), prompts.corrections_by_slice()
    corrections = corrections_.corrections_of(prompts) if mode == "spd" else []
    if options.slice_range is not None:
        lo, hi = options.slice_range
        by_slice = {t: v for t, v in by_slice.items() if lo <= t <= hi}
        corrections = [c for c in corrections if lo <= c.slice <= hi]
    if not by_slice:
        raise InputError("No prompts to segment from (none inside the volume or the chosen slice range). "
                         "Place at least one point on the structure.")
    tau = options.tau if options.tau is not None else (model.tau if is_spd else distill.DEFAULT_TAU)
    n = options.neighbours if options.neighbours is not None else (
        model.neighbours if is_spd else distill.DEFAULT_NEIGHBOURS)
    n = min(int(n), volume.shape[axis] - 1)  # beyond the volume's slices n changes nothing, and would loop long
    targets = distill.target_slices(foreground_slices(by_slice) or by_slice, n, volume.shape[axis]) \
        if mode == "spd" else sorted(by_slice)
    if options.slice_range is not None:
        targets = [t for t in targets if options.slice_range[0] <= t <= options.slice_range[1]]
    intensity = intensity_range(volume.array, options.modality, options.window)
    context = getattr(model.head, "context", 0) if mode == "spd" else 0
    encode = distill.target_slices(targets, context, volume.shape[axis]) if targets else []
    return Plan(mode=mode, backbone=backbone, axis=axis, by_slice=by_slice, targets=targets, encode=encode,
                shape_hw=tuple(s for a, s in enumerate(volume.shape) if a != axis), intensity=intensity,
                tau=tau, neighbours=n,
                batch_size=options.batch_size or default_batch_size(backbone.device),
                key=fingerprint_key(volume, axis, model.identity, intensity),
                decoder_prompt=_model_setting(options, model, "decoder_prompt", "points+box"),
                fusion=float(_model_setting(options, model, "fusion", 0.0)),
                components=_model_setting(options, model, "components", "all"),
                trusted={t: trusted[t] for t in by_slice}, corrections=corrections)


def _model_setting(options: SegmentOptions, model, name: str, default):
    """An option as given, else the SPD model's own (its header), else ``default``: one rule for tau-like
    settings that a model is trained or tuned with."""
    value = getattr(options, name)
    if value is not None:
        return value
    header = getattr(model, "header", None) or {}
    return header.get(name, default)


def segment(volume: Volume, prompts, model, options: Optional[SegmentOptions] = None,
            progress: Optional[Progress] = None, cache=None) -> Result:
    """Segment one structure of ``volume`` from point prompts: the whole run, no file written.

    Args:
      volume: the image (``Volume``); never modified.
      prompts: ``prompts.VoxelPrompts`` on this volume (``prompts.to_voxels`` of a point file or markups).
      model: an ``SPDModel`` (SPD mode) or a ``Backbone`` (raw mode), from ``load_model``.
      options: ``SegmentOptions``; None is ``SegmentOptions()``.
      progress: a ``Progress`` that receives (stage, done, total) and can cancel; None: silent.
      cache: the ``EmbeddingCache`` (embeddings, saliency maps and decoded slices are remembered there,
        so prompting the same volume again recomputes only what changed); None: the process-wide one.

    Returns:
      A ``Result``: the mask on the volume's grid, the decoded slices, the prompt audit (SPD mode), the
      saliency volume (when asked) and timings.

    Raises:
      InputError: a bad option (``SegmentOptions.validate``), or as :func:`plan`.
      Cancelled: ``progress`` was cancelled; checked between slices.
    """
    options = (options or SegmentOptions()).validate()
    progress = progress or Progress()
    cache = default_cache() if cache is None else cache
    timings: Dict[str, float] = {}
    t_start = time.perf_counter()
    p = plan(volume, prompts, model, options)
    t0 = time.perf_counter()
    embeddings = encode_slices(p.backbone, volume, p.axis, p.encode, p.intensity, cache=cache, progress=progress,
                               batch_size=p.batch_size, key=p.key)
    timings["encode_s"] = time.perf_counter() - t0
    progress.check()

    transform = p.backbone.transform(*p.shape_hw)
    audit: List[distill.AuditEntry] = []
    saliency = dense = None
    if p.mode == "spd":
        t0 = time.perf_counter()
        dense = {} if model.header.get("dense_prior") else None
        pixels = slice_pixels(p.backbone, volume.array, p.axis, unmapped_slices(model, p.targets, cache, p.key, dense),
                              p.intensity) if getattr(model.head, "uses_image", False) else None
        maps = saliency_maps(model, embeddings, p.targets, p.shape_hw, pixels=pixels, dense=dense, cache=cache,
                             key=p.key)
        jobs, distilled = spd_jobs(p.by_slice, maps, p.targets, transform, p.tau, p.neighbours,
                                   empty_slice=options.empty_slice, local_only=options.local_only,
                                   decoder_prompt=p.decoder_prompt, trusted=p.trusted,
                                   margin_px=box_margin_px(volume.spacing[::-1], p.axis, options.box_margin_mm))
        audit = distilled.audit
        timings["saliency_distill_s"] = time.perf_counter() - t0
        if options.return_saliency:
            saliency = np.zeros(volume.shape, np.float32)
            for t, prob in maps.items():
                put_slice(saliency, p.axis, t, prob)
    else:
        jobs = raw_jobs(p.by_slice, p.targets, transform, p.shape_hw,
                        box_margin_px(volume.spacing[::-1], p.axis, options.box_margin_mm), options.use_box)
    progress.check()

    t0 = time.perf_counter()
    slice_masks = {}
    for group in prompt_groups(jobs):
        slice_masks.update(_decode(p.backbone, embeddings, [jobs[k] for k in group], p.shape_hw,
                                   batch_size=p.batch_size, progress=progress, dense=dense, cache=cache, key=p.key))
    timings["decode_s"] = time.perf_counter() - t0
    progress.check()

    probabilities = {t: (1.0 - p.fusion) * prob.astype(np.float32) + p.fusion * maps[t]
                     if p.mode == "spd" and p.fusion else prob for t, prob in slice_masks.items()}
    t0 = time.perf_counter()
    thresholds = corrections_.threshold_field(probabilities, p.corrections, *correction_spacing(volume, p.axis))
    timings["correct_s"] = time.perf_counter() - t0
    mask = np.zeros(volume.shape, np.uint8)
    for t, prob in probabilities.items():
        put_slice(mask, p.axis, t, (prob > thresholds[t]).astype(np.uint8))
    if p.mode == "spd" and p.components == "clicked":
        mask = clicked_components(mask, distilled, p.axis)
    timings["total_s"] = time.perf_counter() - t_start
    result = Result(mask=mask, axis=p.axis, slices=sorted(slice_masks), audit=audit, saliency=saliency,
                    timings=timings, mode=p.mode, decoder=decoder_description(model),
                    axis_note=axis_note(prompts, volume))
    result.warnings = plausibility_warnings(volume, p, model, result, getattr(prompts, "axis_source", ""))
    return result


def correction_spacing(volume: Volume, axis: int) -> Tuple[Tuple[float, float], float]:
    """((row, col) pixel size, slice spacing) in mm of slices along ``axis``: what corrections are measured in."""
    spacing_kji = [float(v) for v in volume.spacing[::-1]]
    row_axis, col_axis = (a for a in range(3) if a != axis)
    return (spacing_kji[row_axis], spacing_kji[col_axis]), spacing_kji[axis]


def clicked_components(mask: np.ndarray, distilled, axis: int) -> np.ndarray:
    """The 3D connected parts of ``mask`` (26-connected) that hold a kept or borrowed click; the mask as it
    is when no click falls inside it."""
    from scipy import ndimage

    parts, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return mask
    hit = set()
    for t, consensus in distilled.consensus.items():
        for r, c in np.rint(consensus.positives).astype(int):
            index = [0, 0, 0]
            index[axis] = t
            index[[a for a in range(3) if a != axis][0]] = r
            index[[a for a in range(3) if a != axis][1]] = c
            if all(0 <= i < n for i, n in zip(index, mask.shape)):
                hit.add(int(parts[tuple(index)]))
    hit.discard(0)
    return np.isin(parts, list(hit)).astype(np.uint8) if hit else mask


def decoder_description(model) -> str:
    """Which mask decoder a run with ``model`` uses: an SPD model's tuned decoder, or the backbone's own."""
    from .spd_model import SPDModel  # torch

    if isinstance(model, SPDModel):
        if model.header.get("decoder_tuned"):
            return f"the tuned decoder of {model.name} (on {model.backbone.name})"
        return f"the {model.backbone.name} decoder (via {model.name})"
    return f"the {getattr(model, 'name', 'backbone')} decoder"


def plausibility_warnings(volume: Volume, p: Plan, model, result: Result, axis_source: str = "") -> List[str]:
    """What makes a finished result implausible, each with what to try (Result.warnings). ``axis_source``:
    where the slicing axis came from (``VoxelPrompts.axis_source``; "given" when the user chose it)."""
    warnings = list(getattr(model, "warnings", []) or [])
    lo, hi = p.intensity
    raw_blank = bool(p.targets) and all(np.ptp(get_slice(volume.array, p.axis, t)) == 0 for t in p.targets)
    if raw_blank:
        warnings.append("The image is blank: every slice to segment has one constant value, so there is nothing to "
                        "segment. Check that this is the right image (and that it was read completely).")
    elif p.targets and all(np.ptp(apply_range(get_slice(volume.array, p.axis, t), lo, hi)) == 0 for t in p.targets):
        warnings.append(f"Every slice to segment is blank in the intensity range {lo:g}..{hi:g}: the window hides "
                        "the image. On CT choose a window that shows the structure (window, modality); on MR "
                        "choose the mr modality.")
    views = model.header.get("views") if result.mode == "spd" else None
    if views and axis_name(p.axis, volume) not in views:
        where = (f"The slicing axis was set to {axis_name(p.axis, volume)}" if axis_source == "given"
                 else f"The clicks are on {axis_name(p.axis, volume)} slices")
        fix = ("Choose an axis it knows (the slicing axis, or auto)" if axis_source == "given"
               else "Click in a view it knows")
        warnings.append(f"{where}, but {model.name} was trained on {' and '.join(views)} slices only: expect a "
                        f"poorer result. {fix}, or train a model on this view (spd train --axes all).")
    if result.mode == "spd" and result.audit:
        counts = result.audit_counts()
        own = counts.get("kept", 0) + counts.get("rejected", 0)
        if own and counts.get("kept", 0) == 0:
            warnings.append(f"All {own} clicks were rejected: the saliency map is below tau {p.tau:g} at every one. "
                            f"{_model_hint(model)} Lower tau only if the clicks are really on the structure.")
    if result.voxels == 0:
        hint = _model_hint(model) if result.mode == "spd" else (
            "Check that the clicks are on the structure and that the slicing axis is the view they were placed "
            "in; with LiteMedSAM keep the box around the clicks.")
        warnings.append(f"The result has no voxels ({len(result.slices)} slices decoded, all empty). {hint}")
    return warnings


def _model_hint(model) -> str:
    trained = model.header.get("training", {}) if hasattr(model, "header") else {}
    data = trained.get("data") if isinstance(trained, dict) else None
    axis = model.header.get("axis") if hasattr(model, "header") else None
    about = f" ({model.name} was trained on {data}" + (f", slices along array axis {axis})" if axis is not None
                                                        else ")") if data else ""
    return (f"The model may be wrong for this anatomy or view{about}: use a model trained for it (spd train), check "
            "the slicing axis, or run a backbone such as litemedsam in raw mode.")
