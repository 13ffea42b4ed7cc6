"""Bounded-memory access to all clients' values of one tensor at a time.

Non-streaming strategies hold memory-mapped deltas (spool files). Stacking a
whole model per client would defeat the point of spooling, so they read one
tensor at a time, and a large tensor in slices of coordinates: peak memory is
one ``(clients, slice)`` block, about ``slice_bytes``, whatever the model size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import ClassVar

import torch

from fl_server.strategies.base import Strategy, accumulation_dtype


def stacked_slices(
    deltas: Sequence[Mapping[str, torch.Tensor]],
    name: str,
    dtype: torch.dtype,
    slice_bytes: int,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yields ``(start, stop, block)`` with ``block[i] = deltas[i][name].flatten()[start:stop]``.

    The block is in ``dtype`` (the accumulation dtype) and is reused between
    slices only by the allocator, never aliased to the inputs.
    """
    flats = [d[name].reshape(-1) for d in deltas]
    numel = flats[0].numel() if flats else 0
    n = len(flats)
    itemsize = torch.empty((), dtype=dtype).element_size()
    step = max(1, slice_bytes // max(1, n * itemsize))
    for start in range(0, numel, step):
        stop = min(numel, start + step)
        block = torch.empty((n, stop - start), dtype=dtype)
        for i, flat in enumerate(flats):
            block[i].copy_(flat[start:stop])
        yield start, stop, block


class BufferedStrategy(Strategy):
    """A strategy that needs every update at once: it keeps the caller's tensors.

    The tensors are memory-mapped spool files, so holding references costs page
    cache, not heap; they are dropped when the round ends. Robust aggregators
    weigh clients equally, as in their papers: a Byzantine client could claim any
    number of examples, so its self-reported count must not buy it influence.
    """

    streaming: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self._deltas: list[dict[str, torch.Tensor]] = []

    def _on_begin(self) -> None:
        self._deltas = []

    def _on_end(self) -> None:
        self._deltas = []

    def _fold(self, client_id: str, delta: dict[str, torch.Tensor], num_examples: int) -> None:
        self._deltas.append(delta)

    def _per_coordinate(
        self, reduce: Callable[[torch.Tensor], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Applies ``reduce`` (a ``(clients, k) -> (k,)`` function) over every coordinate."""
        global_state = self._global_state()
        out: dict[str, torch.Tensor] = {}
        for name in self._float_tensor_names:
            g = global_state[name]
            dtype = accumulation_dtype(g.dtype)
            result = torch.empty(g.numel(), dtype=dtype)
            for start, stop, block in stacked_slices(self._deltas, name, dtype, self.slice_bytes):
                result[start:stop] = reduce(block)
            out[name] = result.reshape(g.shape)
        return out
