"""The SPD engine: the core in a child process of Slicer, so Slicer's main thread never waits on it.

- ``protocol``: the request types (shared by every front end), the JSON messages with request ids,
  and voxel arrays through memory-mapped ``.npy`` files;
- ``server``: ``Engine`` (models loaded once, embedding cache and re-prompt memo hot; also used
  in-process by the console API and the benchmark) and the loop that serves it over a private pipe;
- ``client``: starts, polls (non-blocking, from a ``qt.QTimer``), cancels, restarts and stops the engine;
- ``processes``: process trees (``PythonSlicer`` is a launcher), non-blocking pipe reads, private folders.

``python -m SPDSegmentLib.engine`` runs the server; it imports only ``core``.
"""
