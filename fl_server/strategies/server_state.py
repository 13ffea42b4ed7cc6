"""Per-tensor server optimiser state shared by FedOpt and FedAvgM.

Buffers are keyed ``"<slot>/<tensor name>"`` in ``state_dict()`` so one flat
safetensors checkpoint holds them all. They are created on the first completed
round (their shapes come from the global model) and checked against the global
model at every ``begin_round``, so a checkpoint restored into the wrong model is
an error, not a silent broadcast.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fl_server.strategies.base import StrategyError, accumulation_dtype


class SlotState:
    """Named per-tensor buffers (e.g. slots "m" and "v"), float32 or float64."""

    def __init__(self, owner: str, slots: tuple[str, ...]) -> None:
        self.owner = owner
        self.slots = slots
        self.buffers: dict[str, dict[str, torch.Tensor]] = {s: {} for s in slots}

    @property
    def empty(self) -> bool:
        return not any(self.buffers.values())

    def check_against(self, global_state: Mapping[str, torch.Tensor]) -> None:
        """Refuses state whose tensors do not match the global model's floating tensors."""
        if self.empty:
            return
        float_names = {n: t for n, t in global_state.items() if t.is_floating_point()}
        for slot, bufs in self.buffers.items():
            if set(bufs) != set(float_names):
                extra = sorted(set(bufs) - set(float_names))[:5]
                missing = sorted(set(float_names) - set(bufs))[:5]
                raise StrategyError(
                    f"{self.owner}: server state slot {slot!r} does not match the global model "
                    f"(unknown tensors {extra}, missing tensors {missing})"
                )
            for name, buf in bufs.items():
                g = float_names[name]
                if buf.shape != g.shape:
                    raise StrategyError(
                        f"{self.owner}: server state {slot}/{name} has shape {tuple(buf.shape)}, "
                        f"the global model has {tuple(g.shape)}"
                    )
                if buf.dtype != accumulation_dtype(g.dtype):
                    bufs[name] = buf.to(accumulation_dtype(g.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{slot}/{name}": buf.clone()
            for slot, bufs in self.buffers.items()
            for name, buf in bufs.items()
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        loaded: dict[str, dict[str, torch.Tensor]] = {s: {} for s in self.slots}
        for key, tensor in state.items():
            slot, sep, name = key.partition("/")
            if not sep or slot not in loaded:
                raise StrategyError(
                    f"{self.owner}: unexpected server state entry {key!r} "
                    f"(expected '<slot>/<tensor>' with slot in {list(self.slots)})"
                )
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                raise StrategyError(f"{self.owner}: server state {key!r} is not a floating tensor")
            loaded[slot][name] = tensor.detach().clone().to(accumulation_dtype(tensor.dtype))
        names = [set(b) for b in loaded.values()]
        if any(n != names[0] for n in names):
            raise StrategyError(f"{self.owner}: server state slots cover different tensors")
        self.buffers = loaded
