"""The model-input transform: a 2D slice <-> the square, padded input of a SAM-family network."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np


@dataclass(frozen=True)
class SliceTransform:
    """Slice (h, w) <-> model input (size x size): resize the longest side, pad bottom/right.

    Pixel-centre convention (as F.interpolate with align_corners=False and SAM's prompt encoder,
    which adds 0.5): slice pixel index p maps to model index (p + 0.5) * scale - 0.5.
    """

    height: int
    width: int
    size: int

    @property
    def scale(self) -> float:
        return self.size / max(self.height, self.width)

    @property
    def resized_hw(self) -> Tuple[int, int]:
        return int(round(self.height * self.scale)), int(round(self.width * self.scale))

    def rc_to_model_xy(self, rc: np.ndarray) -> np.ndarray:
        rc = np.asarray(rc, float).reshape(-1, 2)
        return (rc[:, ::-1] + 0.5) * self.scale - 0.5

    def model_xy_to_rc(self, xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, float).reshape(-1, 2)
        return ((xy + 0.5) / self.scale - 0.5)[:, ::-1]

    def box_rc_to_model(self, rc_min: np.ndarray, rc_max: np.ndarray) -> np.ndarray:
        """Box (x0, y0, x1, y1) in model pixels around slice pixels rc_min..rc_max inclusive."""
        lo = (np.asarray(rc_min, float)[::-1]) * self.scale
        hi = (np.asarray(rc_max, float)[::-1] + 1.0) * self.scale - 1.0
        return np.concatenate([lo, hi])
