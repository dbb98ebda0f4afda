"""Backbones and model files: the catalogue (``catalogue.json``), loading by name or path, downloads.

``registry.load_backbone(name_or_path)`` loads a SAM-family backbone; ``pipeline.load_model`` also loads
SPD model files. ``registry.DEFAULT_MODEL`` is the default model of every front end.
"""
from .registry import DEFAULT_BACKBONE, DEFAULT_MODEL, catalogue, load_backbone  # noqa: F401
