"""Training SPD: stage 1 (saliency head, optional encoder LoRA) and stage 2 (mask decoder).

Two modes:
- ``frozen`` (CPU): the encoder is frozen, so every training slice is encoded once into the
  embedding cache (on disk) and both stages train from cached embeddings in minutes.
- ``lora``: LoRA adapters in the encoder's attention train with the head (needs a GPU to be
  practical); embeddings are recomputed each step.
Stage 2 freezes head and encoder and tunes the mask decoder on the consensus prompts of simulated
sloppy clicks with Dice + focal + the Pairwise Slice Consistency loss between slices t and t+1.
``prompt_mode="raw"`` tunes on the raw noisy clicks instead (the SAM-Tuning baseline).
Deterministic for a seed; stage checkpoints make it resumable; ``torchrun`` gives DDP (gloo/nccl).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..core import distill as cpd
from ..core import spd_model
from ..core.cache import EmbeddingCache
from ..core.errors import InputError
from ..core.models.backbone import pad_points
from ..core.pipeline import encode_slices, load_model
from ..core.progress import Progress
from ..core.saliency import SaliencyHead, add_lora
from ..core.volume import apply_range, get_slice, intensity_range
from .data import Case, find_cases, load_split, training_slices
from .losses import dice_focal_loss, pairwise_slice_consistency
from .simulate import simulate


@dataclass
class TrainConfig:
    data: str
    out: str
    cases: Optional[List[str]] = None  # None: the fixed split's train cases if ``dataset`` is known, else all
    dataset: Optional[str] = None  # name of a fixed split (hippocampus, left_atrium)
    axis: int = 0
    modality: str = "auto"
    backbone: str = "litemedsam"
    mode: str = "frozen"  # "frozen" or "lora"
    lora_rank: int = 8
    head_hidden: int = 64
    tau: float = 0.5
    neighbours: int = 2
    stage1_epochs: int = 8
    stage1_lr: float = 1e-3
    stage2_steps: int = 150
    stage2_lr: float = 2e-5
    batch_size: int = 8
    psc_weight: float = 0.5
    prompt_mode: str = "spd"  # "spd" (consensus prompts) or "raw" (SAM-Tuning baseline)
    local_only: bool = False
    dense_prior: bool = False  # also give the decoder the saliency logits as SAM's dense mask prompt
    noise_levels: Tuple[str, ...] = ("mild", "moderate", "severe")
    prompt_seeds: int = 3
    seed: int = 0
    device: str = "auto"
    cache_dir: Optional[str] = None
    work_dir: Optional[str] = None  # stage checkpoints for resuming


@dataclass
class SliceSample:
    case: int
    t: int
    target: torch.Tensor  # (S, S) uint8 ground truth in the padded model frame


@dataclass
class CaseData:
    case: Case
    shape_hw: Tuple[int, int]
    key_slices: List[int]
    targets: Dict[int, torch.Tensor] = field(default_factory=dict)
    embeddings: Dict[int, torch.Tensor] = field(default_factory=dict)
    saliency: Dict[int, np.ndarray] = field(default_factory=dict)
    dense: Dict[int, torch.Tensor] = field(default_factory=dict)  # saliency logits as SAM mask prompts
    prompts: List[Dict[int, Tuple[np.ndarray, np.ndarray]]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _model_frame_target(mask2d: np.ndarray, size: int) -> torch.Tensor:
    """Ground truth resized (nearest) into the padded model frame, as the image is."""
    h, w = mask2d.shape
    scale = size / max(h, w)
    rh, rw = int(round(h * scale)), int(round(w * scale))
    x = torch.as_tensor(mask2d, dtype=torch.float32)[None, None]
    x = F.interpolate(x, size=(rh, rw), mode="nearest")
    out = torch.zeros(size, size, dtype=torch.uint8)
    out[:rh, :rw] = x[0, 0].to(torch.uint8)
    return out


def _upsample(logits: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


def prepare(config: TrainConfig, backbone, cache: EmbeddingCache, progress: Progress) -> List[CaseData]:
    """Load cases, encode their training slices (frozen mode), simulate the sloppy clicks."""
    names = config.cases
    if names is None and config.dataset:
        names = load_split(config.dataset)["train"]
    cases = find_cases(Path(config.data), names)
    out = []
    for index, case in enumerate(cases):
        progress.step("load cases", index, len(cases))
        volume, label = case.load()
        axis = config.axis
        slices = training_slices(label, axis, config.neighbours + 1)
        shape_hw = tuple(s for a, s in enumerate(volume.shape) if a != axis)
        item = CaseData(case, shape_hw, slices)
        for t in slices:
            item.targets[t] = _model_frame_target(get_slice(label, axis, t), backbone.input_size)
        rng = intensity_range(volume.array, config.modality)
        if config.mode == "frozen":
            item.embeddings = encode_slices(backbone, volume, axis, slices, rng, cache=cache, batch_size=4)
        else:
            item.images = {t: apply_range(get_slice(volume.array, axis, t), *rng) for t in slices}
        for level in config.noise_levels:
            for s in range(config.prompt_seeds):
                sim = simulate(label, axis, level, seed=config.seed * 1000 + s)
                ijk = sim.ijk
                t_idx = np.rint(ijk[:, 2 - axis]).astype(int)
                rc = ijk[:, [2 - a for a in range(3) if a != axis]]
                item.prompts.append({int(t): (rc[t_idx == t], sim.labels[t_idx == t]) for t in np.unique(t_idx)})
        out.append(item)
    progress.step("load cases", len(cases), len(cases))
    return out


def train_stage1(config: TrainConfig, backbone, head: SaliencyHead, items: List[CaseData], progress: Progress,
                 device: str) -> float:
    """Saliency head (and LoRA in lora mode): Dice + focal (gamma 2) against the ground truth."""
    params = [p for p in head.parameters()] + [p for n, p in backbone.image_encoder.named_parameters()
                                                if ".lora_" in n]
    optimiser = torch.optim.AdamW(params, lr=config.stage1_lr, weight_decay=1e-4)
    samples = [(i, t) for i, item in enumerate(items) for t in item.key_slices]
    generator = random.Random(config.seed)
    steps_per_epoch = max(1, len(samples) // config.batch_size)
    total = config.stage1_epochs * steps_per_epoch
    head.train()
    loss_value = float("nan")
    for epoch in range(config.stage1_epochs):
        generator.shuffle(samples)
        for step in range(steps_per_epoch):
            progress.step("stage 1 (saliency)", epoch * steps_per_epoch + step, total)
            batch = samples[step * config.batch_size:(step + 1) * config.batch_size]
            if config.mode == "frozen":
                emb = torch.stack([items[i].embeddings[t] for i, t in batch]).to(device)
            else:
                emb = backbone.encode(backbone.prepare([items[i].images[t] for i, t in batch]))
            target = torch.stack([items[i].targets[t] for i, t in batch]).to(device)[:, None].float()
            logits = _upsample(head(emb), backbone.input_size)
            loss = dice_focal_loss(logits, target)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            loss_value = loss.item()
    progress.step("stage 1 (saliency)", total, total)
    head.eval()
    return loss_value


@torch.no_grad()
def compute_saliency(backbone, head, items: List[CaseData], device: str) -> None:
    for item in items:
        ts = item.key_slices
        for start in range(0, len(ts), 16):
            batch = ts[start:start + 16]
            emb = torch.stack([item.embeddings[t] for t in batch]).to(device)
            head_logits = head(emb)
            maps = torch.sigmoid(backbone.to_slice(head_logits, *item.shape_hw)).cpu().numpy()
            for t, m, low in zip(batch, maps, backbone.mask_prompt(head_logits).cpu()):
                item.saliency[t] = m
                item.dense[t] = low


def _prompt_for(config: TrainConfig, backbone, item: CaseData, prompts, t: int):
    """(points_xy, labels, box) for slice t, or None when the slice gets no prompt."""
    transform = backbone.transform(*item.shape_hw)
    if config.prompt_mode == "raw":
        if t not in prompts:
            return None
        rc, labels = prompts[t]
        box = cpd.points_box(rc, 5.0, item.shape_hw)
        return transform.rc_to_model_xy(rc), labels, transform.box_rc_to_model(*box)
    result = cpd.distill(prompts, item.saliency, config.tau, config.neighbours, targets=[t],
                         local_only=config.local_only)
    consensus = result.consensus.get(t)
    if consensus is None or not len(consensus.positives):
        return None
    box = cpd.saliency_box(item.saliency[t], consensus.positives, config.tau)
    return transform.rc_to_model_xy(consensus.rc), consensus.labels, transform.box_rc_to_model(*box)


def train_stage2(config: TrainConfig, backbone, items: List[CaseData], progress: Progress, device: str,
                 distributed: bool = False) -> float:
    """Mask decoder on consensus (or raw) prompts with Dice + focal + PSC between t and t+1."""
    decoder = backbone.mask_decoder
    for p in backbone.parameters():
        p.requires_grad_(False)
    for p in decoder.parameters():
        p.requires_grad_(True)
    # The IoU head gets no gradient from the mask losses: freeze it, so that DDP does not wait for
    # gradients that never come ("parameters that were not used in producing loss").
    for p in decoder.iou_prediction_head.parameters():
        p.requires_grad_(False)
    module = decoder
    if distributed:
        module = torch.nn.parallel.DistributedDataParallel(decoder)
    optimiser = torch.optim.AdamW(decoder.parameters(), lr=config.stage2_lr, weight_decay=1e-4)
    generator = random.Random(config.seed + 1)
    rank, world = _rank_world(distributed)
    pairs = [(i, t) for i, item in enumerate(items) for t in item.key_slices[:-1]]
    pairs = pairs[rank::world]
    decoder.train()
    loss_value = float("nan")
    pe = backbone.prompt_encoder.get_dense_pe()
    max_draws = 100 * 2 * config.batch_size  # CPD may leave (almost) no prompts: never loop forever
    for step in range(config.stage2_steps):
        progress.step("stage 2 (decoder)", step, config.stage2_steps)
        jobs, targets, pair_index = [], [], []
        draws = 0
        while len(jobs) < 2 * config.batch_size:
            draws += 1
            if draws > max_draws:
                if jobs:
                    break
                raise InputError(
                    f"Stage 2 found no slice with prompts after {max_draws} draws: the saliency head rejects "
                    f"every simulated click at tau {config.tau}. Train stage 1 longer or lower --tau."
                )
            i, t = generator.choice(pairs)
            item = items[i]
            prompts = generator.choice(item.prompts)
            first = _prompt_for(config, backbone, item, prompts, t)
            second = _prompt_for(config, backbone, item, prompts, t + 1)
            if first is None and second is None:
                continue
            for tt, job in ((t, first), (t + 1, second)):
                if job is not None:
                    jobs.append((item.embeddings[tt], *job, item.dense[tt]))
                    targets.append(item.targets[tt])
            pair_index.append(len(jobs) - 2 if first is not None and second is not None else -1)
        emb = torch.stack([j[0] for j in jobs]).to(device)
        points, labels = pad_points([j[1] for j in jobs], [j[2] for j in jobs])
        boxes = torch.as_tensor(np.stack([j[3] for j in jobs]), dtype=torch.float32, device=device)
        mask_input = None
        if config.dense_prior and config.prompt_mode == "spd":
            mask_input = torch.stack([j[4] for j in jobs]).to(device)
        sparse, dense = backbone.prompt_encoder(points=(points.to(device), labels.to(device)),
                                                boxes=boxes[:, None, :], masks=mask_input)
        low_res, _ = module(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                            dense_prompt_embeddings=dense, multimask_output=False)
        logits = _upsample(low_res, backbone.input_size)
        target = torch.stack(targets).to(device)[:, None].float()
        loss = dice_focal_loss(logits, target)
        both = [k for k in pair_index if k >= 0]
        if config.psc_weight > 0 and both:
            prob = torch.sigmoid(logits)
            a = prob[[k for k in both]]
            b = prob[[k + 1 for k in both]]
            loss = loss + config.psc_weight * pairwise_slice_consistency(a, b)
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


def train(config: TrainConfig, progress: Optional[Progress] = None) -> Path:
    """Both stages; writes the SPD model file to ``config.out`` and returns its path."""
    progress = progress or Progress()
    if config.mode not in ("frozen", "lora"):
        raise InputError(f"Unknown training mode {config.mode!r}: use frozen (CPU) or lora (GPU).")
    distributed = _init_distributed()
    seed_everything(config.seed)
    # eager fp32 PyTorch: training needs gradients, and its cached embeddings must be the exact ones
    backbone = load_model(config.backbone, device=config.device, runtime="torch", precision="fp32")
    if not hasattr(backbone, "image_encoder"):
        raise InputError("--backbone must be a SAM-family backbone, not an SPD model file.")
    device = str(backbone.device)
    if config.dataset and config.axis is None:
        config.axis = int(load_split(config.dataset)["axis"])
    cache = EmbeddingCache(max_bytes=4 << 30, directory=config.cache_dir)
    head = SaliencyHead(backbone.embed_dim, config.head_hidden).to(device)
    work = Path(config.work_dir or (str(config.out) + ".work"))
    work.mkdir(parents=True, exist_ok=True)
    stage1_file = work / "stage1.pt"
    if config.mode == "lora":
        add_lora(backbone.image_encoder, config.lora_rank)
        backbone.to(device)
    items = prepare(config, backbone, cache, progress)
    resume = stage1_file.exists()
    if distributed:  # every rank decides before rank 0 can write stage1.pt
        torch.distributed.barrier()
    if resume:  # resume: stage 1 already done
        state = torch.load(stage1_file, map_location=device, weights_only=True)
        head.load_state_dict(state["head"])
        backbone.image_encoder.load_state_dict(state.get("lora", {}), strict=False)
        stage1_loss = float(state["loss"])
    else:
        stage1_loss = train_stage1(config, backbone, head, items, progress, device)
        lora = {k: v for k, v in backbone.image_encoder.state_dict().items() if ".lora_" in k}
        if _rank_world(distributed)[0] == 0:
            partial = stage1_file.with_name(stage1_file.name + ".partial")  # a crash leaves no half file
            torch.save({"head": head.state_dict(), "lora": lora, "loss": stage1_loss}, partial)
            os.replace(partial, stage1_file)
    if config.mode == "lora":  # stage 2 runs on frozen encoder features: encode once with the adapters
        for item in items:
            with torch.no_grad():
                for t in item.key_slices:
                    item.embeddings[t] = backbone.encode(backbone.prepare([item.images[t]]))[0].cpu()
    compute_saliency(backbone, head, items, device)
    stage2_loss = train_stage2(config, backbone, items, progress, device, distributed) if config.stage2_steps else None
    header = spd_model.make_header(
        backbone, head, lora_rank=config.lora_rank if config.mode == "lora" else 0, tau=config.tau,
        neighbours=config.neighbours, decoder_tuned=bool(config.stage2_steps), prompt_mode=config.prompt_mode,
        axis=config.axis, psc_weight=config.psc_weight, local_only=config.local_only,
        dense_prior=bool(config.dense_prior and config.prompt_mode == "spd"),
        training={"data": Path(config.data).name, "cases": [i.case.name for i in items], "mode": config.mode,
                  "noise_levels": list(config.noise_levels), "seed": config.seed,
                  "stage1_epochs": config.stage1_epochs, "stage2_steps": config.stage2_steps,
                  "slices": sum(len(i.key_slices) for i in items)},
        losses={"stage1": stage1_loss, "stage2": stage2_loss},
    )
    if _rank_world(distributed)[0] == 0:
        out = spd_model.save(config.out, backbone, head, header)
    else:
        out = Path(config.out)
    if distributed:
        torch.distributed.barrier()
    return out


def config_from_json(path: os.PathLike) -> TrainConfig:
    with open(path, encoding="utf-8") as handle:
        return TrainConfig(**json.load(handle))


def config_to_json(config: TrainConfig) -> str:
    return json.dumps(asdict(config), indent=1)
