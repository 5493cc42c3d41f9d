"""``python -m benchmarks``: the side-by-side comparison of :mod:`benchmarks.compare`."""

import sys

from benchmarks.compare import main

if __name__ == "__main__":  # DDP's spawned processes import this module again as __mp_main__
    sys.exit(main())
