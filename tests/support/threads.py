"""``one_thread``: torch on one intra-op thread for the test, then back (import it into a test module).

Tiny models gain nothing from intra-op threads, and the suite's two xdist workers share two cores:
more threads only add contention. Imported into a module (``from support.threads import one_thread``),
the autouse fixture applies to every test of that module.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
