"""Contextual Prompt Distillation (CPD), pure numpy.

For a target slice t with saliency map S_t, threshold tau and neighbourhood n:
  kept_t     = { p in P_t : S_t(p) > tau }                        (local validation)
  borrowed_t = { q in P_j, 0 < |j - t| <= n : S_j(q) > tau and S_t(q) > tau }
  consensus  = kept_t  U  borrowed_t
A borrowed point keeps its in-plane (row, col) and is placed on slice t. Corrections are explicit
user intent and pass through on their own slice without validation: background points (label 0)
and trusted foreground corrections (``trusted``); a trusted correction is borrowed like a kept click.
Every input point is reported once as kept, rejected or correction on its own slice; every
borrowing is reported as an extra "borrowed" record naming the target and source slices.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Tuple

import numpy as np

PromptsBySlice = Mapping[int, Tuple[np.ndarray, np.ndarray]]  # t -> (rc (n, 2), labels (n,))
# The paper's tau and n: the defaults of every run, and of a model file that does not record its own.
DEFAULT_TAU = 0.5
DEFAULT_NEIGHBOURS = 2


@dataclass
class AuditEntry:
    rc: np.ndarray  # (2,) in-plane position
    slice: int  # the slice the record is about (target slice for "borrowed")
    status: str  # "kept" | "rejected" | "borrowed" | "correction" (a user correction on its own slice)
    source_slice: int  # where the point was clicked
    score: float  # saliency at the point on `slice`
    label: int = 1

    def ijk(self, axis: int) -> np.ndarray:
        """Continuous (i, j, k) of the record: ``rc`` placed on ``slice`` along the array axis ``axis``."""
        index = np.zeros(3)
        index[axis] = self.slice
        index[[a for a in range(3) if a != axis]] = self.rc
        return index[::-1]


@dataclass
class Consensus:
    rc: np.ndarray  # (m, 2)
    labels: np.ndarray  # (m,)
    sources: np.ndarray  # (m,) source slice of each point

    def __len__(self) -> int:
        return len(self.rc)

    @property
    def positives(self) -> np.ndarray:
        return self.rc[self.labels > 0]


@dataclass
class DistillResult:
    consensus: Dict[int, Consensus] = field(default_factory=dict)
    audit: List[AuditEntry] = field(default_factory=list)

    def counts(self) -> Dict[str, int]:
        """{"kept", "rejected", "borrowed"} counts, and "correction" when there are corrections."""
        out = {"kept": 0, "rejected": 0, "borrowed": 0}
        for entry in self.audit:
            out[entry.status] = out.get(entry.status, 0) + 1
        return out


def sample(saliency: np.ndarray, rc: np.ndarray) -> np.ndarray:
    """Saliency at continuous (row, col) positions: nearest pixel, clipped to the slice."""
    rc = np.asarray(rc, float).reshape(-1, 2)
    r = np.clip(np.rint(rc[:, 0]).astype(int), 0, saliency.shape[0] - 1)
    c = np.clip(np.rint(rc[:, 1]).astype(int), 0, saliency.shape[1] - 1)
    return saliency[r, c]


def target_slices(prompted: Iterable[int], neighbours: int, n_slices: int) -> List[int]:
    """Slices that can receive prompts: every prompted slice and its +-n neighbours inside the volume."""
    out = set()
    for t in prompted:
        out.update(range(max(0, t - neighbours), min(n_slices, t + neighbours + 1)))
    return sorted(out)


def distill(prompts: PromptsBySlice, saliency: Mapping[int, np.ndarray], tau: float = DEFAULT_TAU,
            neighbours: int = DEFAULT_NEIGHBOURS, targets: Iterable[int] | None = None,
            local_only: bool = False, trusted: Mapping[int, np.ndarray] | None = None) -> DistillResult:
    """Consensus prompts for each target slice (see module docstring).

    ``saliency`` must hold a probability map for every target slice and every prompted slice
    within reach. ``local_only`` switches borrowing off (the ablation "local validation only").
    ``trusted``: slice -> (n,) bool beside ``prompts[t]``, the user's corrections (never rejected).
    """
    trusted = trusted or {}
    result = DistillResult()
    if targets is None:
        targets = sorted(set(prompts) & set(saliency))
    passes_own: Dict[int, np.ndarray] = {}
    for t, (rc, labels) in prompts.items():
        if t not in saliency:
            continue
        scores = sample(saliency[t], rc)
        correction = np.asarray(trusted.get(t, np.zeros(len(labels), bool)), bool) | (np.asarray(labels) == 0)
        passes_own[t] = (scores > tau) | correction
        for p, label, score, ok, corrected in zip(rc, labels, scores, passes_own[t], correction):
            status = "correction" if corrected else ("kept" if ok else "rejected")
            result.audit.append(AuditEntry(np.array(p, float), t, status, t, float(score), int(label)))  # a copy

    for t in targets:
        if t not in saliency:
            continue
        rcs, labs, srcs = [], [], []
        if t in prompts and t in passes_own:
            rc, labels = prompts[t]
            keep = passes_own[t]
            rcs.append(np.asarray(rc, float)[keep])
            labs.append(np.asarray(labels)[keep])
            srcs.append(np.full(int(keep.sum()), t))
        if not local_only:
            for j in sorted(passes_own):  # the prompted slices within reach (n may exceed the volume)
                if j == t or abs(j - t) > neighbours:
                    continue
                rc, labels = prompts[j]
                positive = np.asarray(labels) > 0
                candidates = passes_own[j] & positive
                if not candidates.any():
                    continue
                here = sample(saliency[t], np.asarray(rc, float)[candidates])
                ok = here > tau
                chosen = np.asarray(rc, float)[candidates][ok]
                for p, score in zip(chosen, here[ok]):
                    result.audit.append(AuditEntry(p, t, "borrowed", j, float(score), 1))
                rcs.append(chosen)
                labs.append(np.ones(len(chosen), int))
                srcs.append(np.full(len(chosen), j))
        if rcs and sum(len(r) for r in rcs):
            result.consensus[t] = Consensus(np.concatenate(rcs).reshape(-1, 2), np.concatenate(labs).astype(int),
                                            np.concatenate(srcs).astype(int))
    return result


def saliency_box(saliency: np.ndarray, points_rc: np.ndarray, tau: float = DEFAULT_TAU):
    """(rc_min, rc_max) of the saliency components above tau that contain the given points.

    Falls back to all components above tau when the points hit none, and to None when the map
    has nothing above tau. LiteMedSAM was trained with boxes, so this box carries the prior's
    extent to the decoder while the points say which structure is meant.
    """
    from scipy import ndimage  # here: Slicer imports this module at start-up, before SciPy may be installed

    above = saliency > tau
    if not above.any():
        return None
    components, count = ndimage.label(above)
    ids = set()
    if len(points_rc):
        r = np.clip(np.rint(points_rc[:, 0]).astype(int), 0, saliency.shape[0] - 1)
        c = np.clip(np.rint(points_rc[:, 1]).astype(int), 0, saliency.shape[1] - 1)
        ids = {int(i) for i in components[r, c] if i > 0}
    region = np.isin(components, list(ids)) if ids else above
    rows, cols = np.nonzero(region)
    return np.array([rows.min(), cols.min()]), np.array([rows.max(), cols.max()])


def points_box(points_rc: np.ndarray, margin: float, shape: Tuple[int, int]):
    """Box around points grown by ``margin`` pixels, clipped to the slice."""
    lo = np.floor(points_rc.min(axis=0) - margin)
    hi = np.ceil(points_rc.max(axis=0) + margin)
    lo = np.clip(lo, 0, np.array(shape) - 1)
    hi = np.clip(hi, 0, np.array(shape) - 1)
    return lo.astype(int), hi.astype(int)
