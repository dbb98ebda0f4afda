"""A digest of network weights: the key of converted OpenVINO models and of memoised results.

Its own module so that ``backbone`` and ``openvino_runtime`` (which ``backbone`` imports lazily)
both import it without an import circle.
"""
from __future__ import annotations

import hashlib

import torch.nn as nn


def weights_digest(*modules: nn.Module) -> str:
    """SHA-256 of the modules' weights: the key of converted models and of memoised results."""
    digest = hashlib.sha256()
    for module in modules:
        for key, value in module.state_dict().items():
            digest.update(key.encode())
            digest.update(value.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()
