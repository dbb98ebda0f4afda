"""The Slicer side: MRML <-> core (``adapter``, imports slicer lazily) and what the two GUIs share (``gui``:
this Slicer's SPD engine, the model menu, status lines).

Builds on ``core`` and ``engine``; nothing in ``core``, ``engine`` or ``research`` imports from here.
"""
