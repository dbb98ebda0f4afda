"""The Slicer side: MRML <-> core (``adapter``, imports slicer lazily) and GUI helpers (``runner``).

Builds on ``core``; nothing in ``core`` or ``research`` imports from here.
"""
