"""SPDSegment core: pure Python (numpy, SimpleITK, torch); no slicer or qt imports here.

Heavy modules (torch) are imported by the submodules that need them, so importing the
package itself is cheap (Slicer's generic tests construct widgets without torch).
"""
__version__ = "0.1.0"
