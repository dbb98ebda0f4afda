"""The SPD segment editor effect (SegmentEditorEffect.py), registered by the SegmentEditorSPD module."""
