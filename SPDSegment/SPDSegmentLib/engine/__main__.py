"""``python -m SPDSegmentLib.engine``: the engine process (started by ``engine.client``, not by hand)."""
import sys

from .server import main

sys.exit(main())
