"""``python -m preftune.world._worker``: the isolated demo-world builder started by ``ensure_world``.

A module of its own (not imported by the package) so that running it does not re-import the
module it executes.
"""

from __future__ import annotations

import sys

from preftune.world.build import _worker_main

if __name__ == "__main__":
    sys.exit(_worker_main())
