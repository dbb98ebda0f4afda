"""The pure core: numpy, SimpleITK and torch; no slicer, qt or research imports here.

Importing this package is cheap; modules that need torch import it themselves.
"""
