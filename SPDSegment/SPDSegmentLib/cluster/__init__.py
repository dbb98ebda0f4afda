"""Batches on more than one machine, through an existing distributed engine (Ray): ``ray_batch``.

A layer of its own on top of ``core`` (it imports nothing else of the package); Ray is the optional
extra ``pip install spdsegment[cluster]``, imported only when a cluster run starts.
"""
