"""Model tests run torch single-threaded.

These models are tiny: on a busy 2-core machine torch's intra-op thread pool spends
more time waiting for its second thread than computing (a 3 ms step becomes 45 ms),
so each test runs with one thread and the previous setting is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
