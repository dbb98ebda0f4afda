"""SPDSegment: Saliency-Guided Prompt Distillation for Segment Anything, in layers.

- ``core/``: the pure core (numpy, SimpleITK, torch; no slicer or qt): volumes, prompts, models,
  saliency, distillation, the pipeline. Everything else builds on it.
- ``research/``: simulation, training, the benchmarks and the U-Net baseline (uses the core).
- ``slicer_side/``: what the Slicer module and the effect use (MRML adapter, GUI helpers).
- ``cli.py``: the ``spd`` command line.

Heavy modules (torch) are imported by the submodules that need them, so importing the
package itself is cheap (Slicer's generic tests construct widgets without torch).
"""
__version__ = "0.1.0"
