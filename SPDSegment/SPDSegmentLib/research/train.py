"""Training SPD: stage 1 (saliency head, optional encoder LoRA) and stage 2 (mask decoder).

Two modes:
- ``frozen`` (CPU): the encoder is frozen, so every training slice is encoded once, with the
  inference runtime, into the feature store (``research/features.py``, int8 on disk), and both
  stages train from stored embeddings. Training slices run along every axis in ``axes``, so the
  model knows every view a reader may click in.
- ``lora``: LoRA adapters in the encoder's attention train with the head (needs a GPU to be
  practical); embeddings are recomputed each step.

Training and inference share one forward path (``core/pipeline.py``): the same model-frame
transform of images and masks, ``pipeline.head_logits``/``saliency_maps`` for saliency, and
``pipeline.spd_jobs``/``raw_jobs`` for the decoder's prompts. Stage 2 freezes head and encoder and
tunes the mask decoder on the consensus prompts of simulated sloppy clicks with
``losses.spd_stage2_loss`` (Dice + focal on slices t and t+1 plus Pairwise Slice Consistency).
``prompt_mode="raw"`` tunes on the raw noisy clicks instead (the SAM-Tuning baseline).

Deterministic for a seed. Stage checkpoints in the work folder let ``resume=True`` continue the
same run (same configuration and data, checked by a digest); the folder is removed after success
unless ``keep_work``. ``torchrun`` gives DDP (gloo/nccl) for stage 2.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..core import distill, pipeline, spd_model
from ..core.errors import InputError
from ..core.models.registry import check_device
from ..core.files import atomic_write, check_folder_writable, check_not_inputs, check_space, check_writable
from ..core.progress import Progress
from ..core.prompts import axis_name
from ..core.saliency import add_lora, build_head, head_input
from ..core.volume import apply_range, get_slice, intensity_range
from .data import find_cases, load_split, training_slices
from .features import MARGIN, FeatureStore, encode_case
from .losses import dice_focal_loss, spd_stage2_loss
from .simulate import LEVELS, simulate


@dataclass
class TrainConfig:
    data: str
    out: str
    cases: Optional[List[str]] = None  # None: the fixed split's train cases if ``dataset`` is known, else all
    dataset: Optional[str] = None  # name of a fixed split (hippocampus, left_atrium)
    axes: Tuple[int, ...] = (0, 1, 2)  # slicing (array) axes to train on: every view by default
    modality: str = "auto"
    backbone: str = "litemedsam"
    mode: str = "frozen"  # "frozen" or "lora"
    lora_rank: int = 8
    head: str = "context"  # "context" (ContextSaliencyHead) or "conv2" (the first design)
    head_hidden: int = 64
    head_blocks: int = 2
    head_context: int = 1  # neighbour slices each side the head reads (2.5D)
    head_image: bool = True  # the head refines with the slice's pixels
    head_upsample: int = 1  # 2x steps of the head's output above embedding resolution
    tau: float = distill.DEFAULT_TAU
    neighbours: int = distill.DEFAULT_NEIGHBOURS
    stage1_epochs: float = 8.0
    stage1_max_steps: int = 4000
    stage1_batch: int = 16
    stage1_lr: float = 2e-3
    stage2_steps: int = 150
    stage2_lr: float = 5e-5
    batch_size: int = 4  # stage 2: pairs of adjacent slices per step
    psc_weight: float = 0.5
    prompt_mode: str = "spd"  # "spd" (consensus prompts) or "raw" (SAM-Tuning baseline)
    local_only: bool = False
    dense_prior: bool = False  # also give the decoder the saliency logits as SAM's dense mask prompt
    decoder_prompt: str = "box"  # what stage 2 (and then inference) gives the decoder: points+box or box
    fusion: float = 0.5  # inference: weight of the saliency map averaged with the decoder (recorded in the model)
    components: str = "all"  # inference: "all" or "clicked" 3D parts of the mask (recorded in the model)
    box_margin_mm: float = 5.0  # raw prompt mode: the box margin, as at inference
    noise_levels: Tuple[str, ...] = ("mild", "moderate", "severe")
    prompt_seeds: int = 2
    seed: int = 0
    device: str = "auto"
    cache_dir: Optional[str] = None  # feature store root (frozen mode); None: the user cache
    work_dir: Optional[str] = None  # stage checkpoints; None: OUT.work
    resume: bool = False  # continue a stopped run of the same configuration from its stage checkpoints
    keep_work: bool = False  # keep the work folder after success


@dataclass
class TrainingCase:
    """One case along one slicing axis, ready for both stages."""
    name: str
    axis: int
    view: str  # anatomical name of the slicing axis (axial, coronal, sagittal)
    shape_hw: Tuple[int, int]
    spacing_kji: Tuple[float, float, float]
    slices: List[int]
    transform: "object"
    targets: Dict[int, torch.Tensor]  # t -> (S, S) uint8 ground truth in the model frame
    embeddings: "object"  # Mapping t -> (C, E, E) tensor (feature store view, or a dict in lora mode)
    pixels: Dict[int, torch.Tensor] = field(default_factory=dict)  # t -> (S, S) model-frame pixels
    images: Dict[int, np.ndarray] = field(default_factory=dict)  # lora mode: t -> slice scaled to [0, 1]
    prompts: List[Dict[int, Tuple[np.ndarray, np.ndarray]]] = field(default_factory=list)
    saliency: Dict[int, np.ndarray] = field(default_factory=dict)
    dense: Dict[int, torch.Tensor] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_frame_mask(mask2d: np.ndarray, transform) -> torch.Tensor:
    """A slice mask resized (nearest) into the padded model frame, as ``Backbone.prepare`` places the image."""
    rh, rw = transform.resized_hw
    x = F.interpolate(torch.as_tensor(np.asarray(mask2d), dtype=torch.float32)[None, None], size=(rh, rw),
                      mode="nearest")
    out = torch.zeros(transform.size, transform.size, dtype=torch.uint8)
    out[:rh, :rw] = x[0, 0].to(torch.uint8)
    return out


def _upsample(logits: torch.Tensor, size: int) -> torch.Tensor:
    if logits.shape[-1] == size:
        return logits
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


def default_store_root() -> Path:
    from ..core.cache import cache_folder

    return cache_folder("features")  # a temporary stand-in, with a warning, when the user cache is unusable


def training_cases(config: TrainConfig):
    names = config.cases
    if names is None and config.dataset:
        names = load_split(config.dataset)["train_full"]
    return find_cases(Path(config.data), names)


@dataclass
class Scan:
    """What a training run will read, before anything is encoded: the loaded cases and, per case and
    axis, the training slices and whether the feature store already holds them."""
    cases: List[tuple]  # (name, volume, label)
    slices: int  # training slices over every case and axis
    to_encode: int  # of those, slices the feature store lacks
    store: FeatureStore
    dataset: str


def scan(config: TrainConfig, backbone, progress: Progress) -> Scan:
    cases = training_cases(config)
    store = FeatureStore(config.cache_dir or default_store_root())
    dataset = Path(config.data).name
    loaded, total, missing = [], 0, 0
    for index, case in enumerate(cases):
        progress.step("read cases", index, len(cases))
        volume, label = case.load()
        loaded.append((case.name, volume, label))
        for axis in config.axes:
            n = len(training_slices(label, axis, MARGIN))
            total += n
            if config.mode == "frozen" and not store.has_valid(dataset, case.name, volume, axis, backbone.identity,
                                                               intensity_range(volume.array, config.modality)):
                missing += n
    progress.step("read cases", len(cases), len(cases))
    return Scan(loaded, total, missing, store, dataset)


def prepare(config: TrainConfig, backbone, progress: Progress, head=None, scanned: Optional[Scan] = None
            ) -> List[TrainingCase]:
    """Encode the training slices into the feature store (frozen mode), and simulate the clicks."""
    scanned = scanned or scan(config, backbone, progress)
    uses_pixels = bool(getattr(head, "uses_image", False))
    out = []
    encoded = 0
    for name, volume, label in scanned.cases:
        intensity = intensity_range(volume.array, config.modality)
        for axis in config.axes:
            shape_hw = tuple(s for a, s in enumerate(volume.shape) if a != axis)
            transform = backbone.transform(*shape_hw)
            if config.mode == "frozen":
                entry = encode_case(scanned.store, scanned.dataset, name, volume, label, axis, backbone, MARGIN,
                                    config.modality, _offset(progress, "encode", encoded, scanned.to_encode))
                slices, embeddings = entry.slices, entry.as_mapping()
                encoded += len(slices) if entry.fresh else 0
            else:
                slices, embeddings = training_slices(label, axis, MARGIN), {}
            item = TrainingCase(name, axis, axis_name(axis, volume), shape_hw, tuple(volume.spacing[::-1]),
                                slices, transform, {}, embeddings)
            for t in slices:
                item.targets[t] = model_frame_mask(get_slice(label, axis, t), transform)
            if uses_pixels:
                item.pixels = pipeline.slice_pixels(backbone, volume.array, axis, slices, intensity)
            if config.mode == "lora":
                item.images = {t: apply_range(get_slice(volume.array, axis, t), *intensity) for t in slices}
            for level in config.noise_levels:
                for s in range(config.prompt_seeds):
                    sim = simulate(label, axis, level, seed=config.seed * 1000 + s)
                    item.prompts.append(sim.voxel_prompts(volume).by_slice())
            out.append(item)
    if scanned.to_encode:
        progress.step("encode", scanned.to_encode, scanned.to_encode)
    return out


def _offset(progress: Progress, stage: str, done: int, total: int) -> Progress:
    """A Progress that reports one case's encoding as part of the whole run's (one bar, one ETA)."""
    view = Progress(lambda _stage, d, _t: progress.step(stage, done + d, total))
    view._cancel = progress._cancel  # cancelling the run cancels the case
    return view


def estimate(config: TrainConfig, backbone, head, scanned: Scan) -> Dict[str, float]:
    """Seconds each part of the run is expected to take on this machine, from a short calibration
    (one encoder call, two stage-1 steps, one stage-2 step, on random inputs), and the store's growth."""
    import torch

    size, e = backbone.input_size, backbone.prompt_encoder.image_embedding_size[0]
    seconds: Dict[str, float] = {}

    def timed(fn, repeat: int = 2) -> float:
        elapsed = 0.0
        for _ in range(repeat):  # the first call pays for compilation and allocation
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
        return elapsed

    if scanned.to_encode:
        image = [np.random.default_rng(0).random((size, size), dtype=np.float32)]
        with torch.inference_mode():
            seconds["encode"] = scanned.to_encode * timed(lambda: backbone.encode(backbone.prepare(image)))
    k = 2 * getattr(head, "context", 0) + 1
    emb = torch.randn(config.stage1_batch, k, backbone.embed_dim, e, e).squeeze(1) if k == 1 else \
        torch.randn(config.stage1_batch, k, backbone.embed_dim, e, e)
    pixels = torch.rand(config.stage1_batch, size, size) if getattr(head, "uses_image", False) else None

    def head_step():
        head(emb, pixels).mean().backward()
        head.zero_grad()

    seconds["stage 1"] = stage1_steps(config, scanned.slices) * timed(head_step)
    if config.stage2_steps:
        was_runtime = backbone.runtime
        backbone.runtime = None  # eager, with gradients, as stage 2 runs
        jobs = [(0, np.array([[size / 2, size / 2]]), np.ones(1), np.array([10, 10, size - 10, size - 10.0]))] * \
            (2 * config.batch_size)

        def decoder_step():
            _decode_with_grad(backbone, backbone.mask_decoder, torch.randn(len(jobs), backbone.embed_dim, e, e), jobs,
                              None).mean().backward()
            backbone.mask_decoder.zero_grad()

        seconds["stage 2"] = config.stage2_steps * timed(decoder_step)
        backbone.runtime = was_runtime
    seconds["store_gb"] = scanned.to_encode * backbone.embed_dim * e * e / 1e9
    return seconds


def _pixels_of(item: TrainingCase):
    return item.pixels.__getitem__ if item.pixels else None


def head_batch(head, items: List[TrainingCase], batch, backbone=None, mode: str = "frozen"):
    """Logits (B, 1, L, L) of a batch of (case index, slice): ``saliency.head_input`` per sample, as at
    inference (``pipeline.head_logits``)."""
    embeddings, images = [], []
    for i, t in batch:
        item = items[i]
        if mode == "lora":  # the encoder changes with its adapters: encode the slice and its neighbours now
            from ..core.saliency import neighbourhood

            needed = neighbourhood(t, getattr(head, "context", 0), item.slices)
            encoded = backbone.encode(backbone.prepare([item.images[s] for s in needed]))
            lookup = dict(zip(needed, encoded))
            emb, image = head_input(head, [t], lookup.__getitem__, item.slices, _pixels_of(item))
        else:
            emb, image = head_input(head, [t], item.embeddings.__getitem__, item.slices, _pixels_of(item))
        embeddings.append(emb)
        if image is not None:
            images.append(image)
    device = next(head.parameters()).device
    emb = torch.cat(embeddings).to(device)
    image = torch.cat(images).to(device) if images else None
    return head(emb, image)


def train_stage1(config: TrainConfig, backbone, head, items: List[TrainingCase], progress: Progress,
                 device: str) -> float:
    """Saliency head (and LoRA in lora mode): Dice + focal (gamma 2) against the ground truth."""
    params = list(head.parameters()) + [p for n, p in backbone.image_encoder.named_parameters() if ".lora_" in n]
    samples = [(i, t) for i, item in enumerate(items) for t in item.slices]
    total = stage1_steps(config, len(samples))
    optimiser = torch.optim.AdamW(params, lr=config.stage1_lr, weight_decay=1e-4)
    schedule = warmup_cosine(optimiser, total)
    generator = random.Random(config.seed)
    head.train()
    loss_value = float("nan")
    for step in range(total):
        progress.step("stage 1 (saliency)", step, total)
        batch = generator.sample(samples, min(config.stage1_batch, len(samples)))
        logits = _upsample(head_batch(head, items, batch, backbone, config.mode), backbone.input_size)
        target = torch.stack([items[i].targets[t] for i, t in batch]).to(device)[:, None].float()
        loss = dice_focal_loss(logits, target)
        check_loss(loss, "stage 1", step, total, "stage1_lr", config)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        loss_value = loss.item()
    progress.step("stage 1 (saliency)", total, total)
    head.eval()
    return loss_value


def warmup_cosine(optimiser, total: int, warmup_fraction: float = 0.05):
    """Linear warm-up over the first steps, then cosine decay to zero at ``total``."""
    warmup = max(1, int(warmup_fraction * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


def stage1_steps(config: TrainConfig, n_samples: int) -> int:
    return max(1, min(config.stage1_max_steps, int(round(config.stage1_epochs * n_samples / config.stage1_batch))))


class LazySaliency(Mapping):
    """One training case's saliency maps, each computed on first use with ``pipeline.saliency_maps`` (the
    function inference uses) together with its neighbours. Stage 2 reads the maps of a few hundred slice
    windows; computing every map up front took longer than stage 2 itself. Dense logits go to ``item.dense``."""

    def __init__(self, model, item: TrainingCase, neighbours: int):
        self.model, self.item, self.neighbours = model, item, neighbours
        self.slices = set(item.slices)
        self.first, self.last = min(item.slices), max(item.slices)
        self.maps: Dict[int, np.ndarray] = {}

    def __getitem__(self, t: int) -> np.ndarray:
        if t not in self.maps:
            if t not in self.slices:
                raise KeyError(t)
            reach = range(max(t - self.neighbours, self.first), min(t + self.neighbours, self.last) + 1)
            batch = [s for s in reach if s in self.slices and s not in self.maps]
            self.maps.update(pipeline.saliency_maps(self.model, self.item.embeddings, batch, self.item.shape_hw,
                                                    pixels=self.item.pixels or None, dense=self.item.dense))
        return self.maps[t]

    def __contains__(self, t) -> bool:
        return t in self.slices

    def __iter__(self):
        return iter(self.item.slices)

    def __len__(self) -> int:
        return len(self.item.slices)


def compute_saliency(model, items: List[TrainingCase], neighbours: int = distill.DEFAULT_NEIGHBOURS) -> None:
    """Give each training case its saliency maps (computed when stage 2 first reads them)."""
    for item in items:
        item.dense = {}
        item.saliency = LazySaliency(model, item, neighbours)


def _jobs_for(config: TrainConfig, item: TrainingCase, prompts, ts: List[int]):
    """Decoder prompts for slices ``ts`` of one case: ``pipeline.spd_jobs`` or ``raw_jobs``, as at inference."""
    if config.prompt_mode == "raw":
        margin = pipeline.box_margin_px(item.spacing_kji, item.axis, config.box_margin_mm)
        return pipeline.raw_jobs(prompts, ts, item.transform, item.shape_hw, margin)
    # only the clicks that can reach ts (and the first and last clicked slices, which bound the slices
    # decoded from their own saliency box): distill then reads no other slice's saliency map
    n = config.neighbours
    ends = (min(prompts), max(prompts)) if prompts else ()
    prompts = {s: v for s, v in prompts.items() if min(ts) - n <= s <= max(ts) + n or s in ends}
    jobs, _ = pipeline.spd_jobs(prompts, item.saliency, ts, item.transform, config.tau, config.neighbours,
                                local_only=config.local_only, decoder_prompt=config.decoder_prompt)
    return jobs


def _decode_with_grad(backbone, module, embeddings, jobs, mask_input):
    """Decoder logits (B, 1, L, L) with gradients through ``module`` (the decoder, or its DDP wrapper).

    Jobs with points and box-only jobs run as separate batches, as ``pipeline.segment`` decodes them
    (a box-only prompt padded with a "not a point" token would be another prompt)."""
    logits = [None] * len(jobs)
    for group in pipeline.prompt_groups(jobs):
        points, labels, boxes = pipeline.job_tensors([jobs[k] for k in group])
        device = embeddings.device
        sparse, dense = backbone.prompt_encoder(
            points=None if points is None else (points.to(device), labels.to(device)),
            boxes=None if boxes is None else boxes.to(device)[:, None, :],
            masks=None if mask_input is None else mask_input[group])
        out, _ = module(image_embeddings=embeddings[group], image_pe=backbone.prompt_encoder.get_dense_pe(),
                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
        for k, value in zip(group, out):
            logits[k] = value
    return torch.stack(logits)


def train_stage2(config: TrainConfig, backbone, items: List[TrainingCase], progress: Progress, device: str,
                 distributed: bool = False) -> float:
    """Mask decoder on consensus (or raw) prompts: ``losses.spd_stage2_loss`` on adjacent slices t, t+1."""
    decoder = backbone.mask_decoder
    for p in backbone.parameters():
        p.requires_grad_(False)
    for p in decoder.parameters():
        p.requires_grad_(True)
    # The IoU head gets no gradient from the mask losses: freeze it, so that DDP does not wait for
    # gradients that never come ("parameters that were not used in producing loss").
    for p in decoder.iou_prediction_head.parameters():
        p.requires_grad_(False)
    module = torch.nn.parallel.DistributedDataParallel(decoder) if distributed else decoder
    optimiser = torch.optim.AdamW([p for p in decoder.parameters() if p.requires_grad], lr=config.stage2_lr,
                                  weight_decay=1e-4)
    generator = random.Random(config.seed + 1)
    rank, world = _rank_world(distributed)
    pairs = [(i, t) for i, item in enumerate(items) for t in item.slices[:-1]][rank::world]
    use_dense = config.dense_prior and config.prompt_mode == "spd"
    decoder.train()
    loss_value = float("nan")
    max_draws = 100 * config.batch_size  # CPD may leave (almost) no prompts: never loop forever
    for step in range(config.stage2_steps):
        progress.step("stage 2 (decoder)", step, config.stage2_steps)
        embeddings, jobs, targets, dense = [], [], [], []
        draws = 0
        while len(jobs) < 2 * config.batch_size:
            draws += 1
            if draws > max_draws:
                if jobs:
                    break
                raise InputError(
                    f"Stage 2 found no pair of adjacent slices with prompts after {max_draws} draws: the saliency "
                    f"head rejects the simulated clicks at tau {config.tau}. Train stage 1 longer or lower tau.")
            i, t = generator.choice(pairs)
            item = items[i]
            pair = _jobs_for(config, item, generator.choice(item.prompts), [t, t + 1])
            if len(pair) != 2:
                continue
            for job in pair:
                jobs.append(job)
                embeddings.append(item.embeddings[job[0]])
                targets.append(item.targets[job[0]])
                if use_dense:
                    dense.append(item.dense[job[0]])
        emb = torch.stack(embeddings).to(device)
        logits = _upsample(_decode_with_grad(backbone, module, emb, jobs,
                                             torch.stack(dense).to(device) if use_dense else None),
                           backbone.input_size)
        target = torch.stack(targets).to(device)[:, None].float()
        loss, _ = spd_stage2_loss(logits[0::2], logits[1::2], target[0::2], target[1::2], config.psc_weight)
        check_loss(loss, "stage 2", step, config.stage2_steps, "stage2_lr", config)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        loss_value = loss.item()
    progress.step("stage 2 (decoder)", config.stage2_steps, config.stage2_steps)
    decoder.eval()
    return loss_value


def _rank_world(distributed: bool) -> Tuple[int, int]:
    if distributed and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _init_distributed() -> bool:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend=backend)
        return True
    return False


# What a stage-1 checkpoint depends on: resuming with any of these changed would mix two runs.
_STAGE1_FIELDS = ("axes", "modality", "backbone", "mode", "lora_rank", "head", "head_hidden", "head_blocks",
                  "head_context", "head_image", "head_upsample", "stage1_epochs", "stage1_max_steps", "stage1_batch", "stage1_lr",
                  "seed")


def stage1_digest(config: TrainConfig, case_names: List[str]) -> str:
    """What stage 1 depends on (its settings and the case names), as the digest its checkpoint records."""
    settings = {k: v for k, v in asdict(config).items() if k in _STAGE1_FIELDS}
    settings["cases"] = list(case_names)
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=list).encode()).hexdigest()[:16]


def _make_head(config: TrainConfig, backbone):
    if config.head == "conv2":
        return build_head({"type": "conv2", "hidden": config.head_hidden}, backbone.embed_dim)
    if config.head != "context":
        raise InputError(f"Unknown saliency head {config.head!r}: use context or conv2.")
    return build_head({"type": "context", "hidden": config.head_hidden, "blocks": config.head_blocks,
                       "context": config.head_context, "image": config.head_image,
                       "upsample": config.head_upsample}, backbone.embed_dim)


def check_config(config: TrainConfig) -> None:
    """Refuse settings that cannot train, before anything is loaded or encoded; InputError naming the setting
    (a TrainConfig field, which the command line shows as its option)."""
    def refuse(setting: str, message: str):
        raise InputError(message, setting=setting)

    choices = {"mode": ("frozen", "lora"), "decoder_prompt": pipeline.DECODER_PROMPTS,
               "components": pipeline.COMPONENTS, "prompt_mode": ("spd", "raw"), "head": ("context", "conv2"),
               "modality": pipeline.MODALITIES}
    for setting, allowed in choices.items():
        if getattr(config, setting) not in allowed:
            refuse(setting, f"Unknown {setting.replace('_', ' ')} {getattr(config, setting)!r}: use "
                            f"{' or '.join(allowed)}{' (CPU) or lora (GPU)' if setting == 'mode' else ''}.")
    try:  # the inference settings recorded in the model: one validation with the command line, console and engine
        pipeline.SegmentOptions(tau=config.tau, neighbours=config.neighbours, fusion=config.fusion).validate()
    except InputError as exc:
        refuse(exc.setting, str(exc))
    if not config.axes or any(a not in (0, 1, 2) or isinstance(a, bool) for a in config.axes):
        refuse("axes", f"Training axes must be array axes 0, 1, 2; got {list(config.axes)}.")
    unknown = [level for level in config.noise_levels if level not in LEVELS]
    if unknown:
        refuse("noise_levels", f"Unknown noise levels {unknown}: use {', '.join(LEVELS)}.")
    for setting, low, strict in (("stage1_lr", 0.0, True), ("stage2_lr", 0.0, True), ("stage1_epochs", 0.0, False),
                                 ("psc_weight", 0.0, False), ("box_margin_mm", 0.0, False)):
        value = getattr(config, setting)
        finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not finite or value < low or (strict and value == low):
            refuse(setting, f"{setting} is {value!r}; it must be a finite number {'>' if strict else '>='} {low:g}.")
    for setting, low in (("stage1_batch", 1), ("batch_size", 1), ("stage2_steps", 0), ("stage1_max_steps", 0),
                         ("prompt_seeds", 0), ("seed", 0)):
        value = getattr(config, setting)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            refuse(setting, f"{setting} is {value!r}; it must be a whole number >= {low}.")
    for setting in ("head_hidden", "head_blocks", "head_context", "head_upsample", "lora_rank"):
        why = spd_model.whole_number_problem(setting, getattr(config, setting))
        if why:
            refuse(setting, f"{setting} is {getattr(config, setting)!r}; it must be {why}.")
    check_device(config.device)


class TrainingDiverged(InputError):
    """The loss became NaN or infinite: nothing is saved."""


def check_loss(loss: torch.Tensor, stage: str, step: int, total: int, rate: str, config: TrainConfig) -> None:
    """Stop a diverging run (a NaN or infinite loss) at once, saying what to change; nothing is saved."""
    if bool(torch.isfinite(loss)):
        return
    extra = " or the PSC weight (psc_weight)" if stage == "stage 2" and config.psc_weight else ""
    raise TrainingDiverged(
        f"Training diverged in {stage} at step {step + 1} of {total}: the loss became {float(loss.detach())}. Lower the "
        f"{stage} learning rate ({rate}, now {getattr(config, rate):g}){extra} and train again; nothing was saved.",
        setting=rate)


def work_folder(config: TrainConfig) -> Path:
    return Path(config.work_dir or (str(config.out) + ".work"))


def check_outputs(config: TrainConfig, cases) -> None:
    """Before anything loads or is encoded: the model file can be written (a .spd.safetensors name, a writable
    folder), neither it nor the work folder's checkpoint is one of the training files (by name or link), and a
    feature-store folder given explicitly can be written."""
    out = Path(config.out)
    if not spd_model.is_spd_file(out):
        raise InputError(f"The model file {out} must end with {spd_model.SUFFIX}; nothing was trained.", setting="out")
    check_writable(out, what="model file")
    work = work_folder(config)
    check_folder_writable(work, what="work folder")
    if config.cache_dir:
        check_folder_writable(config.cache_dir, what="feature-store folder")
    check_not_inputs({"model file": out, "work folder's checkpoint": work / "stage1.pt"},
                     [path for case in cases for path in (case.image, case.label)])


def check_space_for(config: TrainConfig, scanned: "Scan", backbone, head) -> None:
    """Refuse before encoding when the disks clearly lack room for the store's growth, the stage-1 checkpoint
    and the model file (its weights: the head in fp32 and the tuned decoder in fp16)."""
    e = backbone.prompt_encoder.image_embedding_size[0]
    head_bytes = 4 * sum(p.numel() for p in head.parameters())
    model_bytes = head_bytes + 2 * sum(p.numel() for p in backbone.mask_decoder.parameters())
    needs = {Path(config.out).parent: model_bytes, work_folder(config): head_bytes}
    store = scanned.store.root
    needs[store] = needs.get(store, 0) + scanned.to_encode * (backbone.embed_dim * e * e + 4 * backbone.embed_dim)
    check_space(needs, what="the feature store, the stage-1 checkpoint and the model file")


def train(config: TrainConfig, progress: Optional[Progress] = None, log=print) -> Path:
    """Both stages; writes the SPD model file to ``config.out`` and returns its path."""
    progress = progress or Progress()
    check_config(config)
    check_outputs(config, training_cases(config))
    distributed = _init_distributed()
    seed_everything(config.seed)
    started = time.perf_counter()
    # frozen mode encodes with the inference runtime (OpenVINO on a CPU: 2-3x faster than eager PyTorch), so
    # the stored embeddings are the ones inference computes; training itself runs eager fp32 with gradients.
    runtime = "auto" if config.mode == "frozen" else "torch"
    backbone = pipeline.load_model(config.backbone, device=config.device, runtime=runtime,
                                   precision="auto" if config.mode == "frozen" else "fp32")
    if not hasattr(backbone, "image_encoder"):
        raise InputError("The backbone must be a SAM-family backbone, not an SPD model file.")
    device = str(backbone.device)
    head = _make_head(config, backbone).to(device)
    if config.mode == "lora":
        add_lora(backbone.image_encoder, config.lora_rank)
        backbone.to(device)
    scanned = scan(config, backbone, progress)
    check_space_for(config, scanned, backbone, head)
    expected = estimate(config, backbone, head, scanned)
    parts = [f"{name} ~{value / 60:.1f} min" for name, value in expected.items() if name != "store_gb"]
    log(f"Training on {len(scanned.cases)} cases x {len(config.axes)} axes ({scanned.slices} slices). Expected on this "
        f"machine: {', '.join(parts)}; about {sum(v for k, v in expected.items() if k != 'store_gb') / 60:.0f} min "
        f"in all" + (f"; the feature store grows by {expected['store_gb']:.2f} GB ({scanned.store.root})."
                     if scanned.to_encode else "."))
    items = prepare(config, backbone, progress, head, scanned)
    embeddings_identity = backbone.identity
    backbone.set_runtime("torch", "fp32")  # gradients from here on
    case_names = sorted({item.name for item in items})
    work = work_folder(config)
    stage1_file = work / "stage1.pt"
    digest = stage1_digest(config, case_names)
    state = None
    if stage1_file.exists():
        if not config.resume:
            log(f"Starting afresh: {work} holds an earlier run's checkpoint (use resume to continue it).")
        else:
            state = torch.load(stage1_file, map_location=device, weights_only=True)
            if state.get("digest") != digest:
                log(f"Starting afresh: the checkpoint in {work} was made with other settings or cases.")
                state = None
    if distributed:  # every rank decides before rank 0 can write stage1.pt
        torch.distributed.barrier()
    if state is not None:
        log(f"Resuming after stage 1 from {stage1_file}.")
        head.load_state_dict(state["head"])
        backbone.image_encoder.load_state_dict(state.get("lora", {}), strict=False)
        stage1_loss = float(state["loss"])
        earlier_seconds = float(state.get("seconds", 0.0))  # the stopped run's time, counted in the header
    else:
        earlier_seconds = 0.0
        stage1_loss = train_stage1(config, backbone, head, items, progress, device)
        lora = {k: v for k, v in backbone.image_encoder.state_dict().items() if ".lora_" in k}
        if _rank_world(distributed)[0] == 0:
            with atomic_write(stage1_file) as tmp:  # a crash leaves no half file
                torch.save({"head": head.state_dict(), "lora": lora, "loss": stage1_loss, "digest": digest,
                            "seconds": time.perf_counter() - started}, tmp)
    if config.mode == "lora":  # stage 2 runs on frozen encoder features: encode once with the adapters
        with torch.no_grad():
            for item in items:
                item.embeddings = {t: backbone.encode(backbone.prepare([item.images[t]]))[0].cpu()
                                   for t in item.slices}
    model = spd_model.SPDModel(backbone, head.eval(), {})
    compute_saliency(model, items, config.neighbours)
    stage2_loss = train_stage2(config, backbone, items, progress, device, distributed) if config.stage2_steps else None
    views = sorted({item.view for item in items})
    header = spd_model.make_header(
        backbone, head, lora_rank=config.lora_rank if config.mode == "lora" else 0, tau=config.tau,
        neighbours=config.neighbours, decoder_tuned=bool(config.stage2_steps), prompt_mode=config.prompt_mode,
        axes=sorted(set(config.axes)), views=views, psc_weight=config.psc_weight, local_only=config.local_only,
        dense_prior=bool(config.dense_prior and config.prompt_mode == "spd"), decoder_prompt=config.decoder_prompt,
        fusion=float(config.fusion), components=config.components,
        training={"data": Path(config.data).name, "cases": case_names, "mode": config.mode,
                  "noise_levels": list(config.noise_levels), "seed": config.seed,
                  "stage1_steps": stage1_steps(config, sum(len(i.slices) for i in items)),
                  "stage2_steps": config.stage2_steps, "slices": sum(len(i.slices) for i in items),
                  "embeddings": embeddings_identity,
                  "seconds": round(earlier_seconds + time.perf_counter() - started, 1)},
        losses={"stage1": stage1_loss, "stage2": stage2_loss},
    )
    out = Path(config.out)
    if _rank_world(distributed)[0] == 0:
        out = spd_model.save(config.out, backbone, head, header)
        if not config.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    if distributed:
        torch.distributed.barrier()
    return out
