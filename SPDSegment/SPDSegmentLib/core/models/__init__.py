"""Backbones: catalogue, loading, downloads. ``load(name_or_path)`` is the one entry point."""
from .registry import DEFAULT_MODEL, catalogue, load_backbone  # noqa: F401
