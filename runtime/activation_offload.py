"""Recomputed regions whose inputs wait for the backward in host memory instead of on the GPU.

A recomputed region (``torch.utils.checkpoint`` in generated code) keeps only its inputs for the
backward; for a decoder layer that is the residual stream entering it. ``offloaded_checkpoint``
runs such a region with that input parked in page-locked host memory:

- forward: the region runs without keeping anything; each floating input that needs a gradient
  is copied to a host buffer on a side stream (the device copy is freed once the copy is done:
  ``record_stream`` keeps the allocator from reusing it earlier);
- backward: the input is copied back (on another side stream), the region is run again with
  gradients, and its backward is taken. When region k's backward starts, the input of the region
  before it (the next one the backward reaches) is fetched, so the copy runs under region k's
  recomputation and backward.

Inputs that need no gradient (rotary tables, masks) are shared by every layer and stay where they
are. CPU and CUDA RNG states are restored for the recomputation, as torch.utils.checkpoint does.
Without CUDA the same code runs with host memory on both sides (copies into host buffers, no
streams), so a CPU machine exercises it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .pinned import HostBufferPool


@dataclass
class _Parked:
    """One region's inputs between its forward and its backward."""

    inputs: list[Any]  # tensors kept as they are, or None where the value is on the host
    host: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> host buffer
    meta: dict[int, tuple[torch.Size, torch.dtype, bool]] = field(default_factory=dict)
    stored: Any = None  # CUDA event: the copy to the host is done
    fetched: dict[int, torch.Tensor] | None = None  # position -> device tensor, once fetched
    ready: Any = None  # CUDA event: the copy back is done


class ActivationOffloader:
    """Parks region inputs in host memory and fetches them back ahead of the backward.

    One per generated module; regions register in forward order and are fetched in reverse.
    ``host_peak_bytes`` is the most host memory held at once (what the planner prices).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.pool = HostBufferPool()
        self._order: list[_Parked] = []  # parked regions not yet consumed, forward order
        self._streams: tuple | None = None

    @property
    def host_peak_bytes(self) -> int:
        return self.pool.peak_bytes

    @property
    def host_bytes(self) -> int:
        return self.pool.in_use_bytes

    def _side_streams(self):
        if self.device.type != "cuda":
            return None, None
        if self._streams is None:
            self._streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
        return self._streams

    def park(self, inputs: tuple[Any, ...]) -> _Parked:
        """Start copying the gradient-carrying floating inputs to the host; return the handle."""
        parked = _Parked(list(inputs))
        down, _ = self._side_streams()
        if down is not None:
            down.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(down) if down is not None else _Null():
            for k, x in enumerate(inputs):
                if not (isinstance(x, torch.Tensor) and x.requires_grad and x.is_floating_point()):
                    continue
                value = x.detach()
                buffer = self.pool.take(value.numel(), value.dtype)
                buffer.copy_(value.reshape(-1), non_blocking=True)
                if down is not None:
                    value.record_stream(down)
                parked.host[k] = buffer
                parked.meta[k] = (value.shape, value.dtype, x.requires_grad)
                parked.inputs[k] = None
            if down is not None:
                parked.stored = torch.cuda.Event()
                parked.stored.record(down)
        self._order.append(parked)
        return parked

    def _fetch(self, parked: _Parked) -> None:
        if parked.fetched is not None:
            return
        _, up = self._side_streams()
        # Allocated on the compute stream (its memory pool), filled on the side stream.
        parked.fetched = {k: torch.empty(parked.meta[k][0], dtype=parked.meta[k][1], device=self.device)
                          for k in parked.host}
        if up is not None:
            up.wait_stream(torch.cuda.current_stream(self.device))
            if parked.stored is not None:
                up.wait_event(parked.stored)
        with torch.cuda.stream(up) if up is not None else _Null():
            for k, buffer in parked.host.items():
                value = parked.fetched[k]
                value.view(-1).copy_(buffer, non_blocking=True)
                if up is not None:
                    value.record_stream(up)
            if up is not None:
                parked.ready = torch.cuda.Event()
                parked.ready.record(up)

    def unpark(self, parked: _Parked) -> list[Any]:
        """The region's inputs back on the device (detached), fetching the previous region's next."""
        self._fetch(parked)
        position = next((i for i, p in enumerate(self._order) if p is parked), None)
        if position is not None:
            self._order.pop(position)
            if position > 0:
                self._fetch(self._order[position - 1])
        compute = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        if parked.ready is not None:
            compute.wait_event(parked.ready)
        values = list(parked.inputs)
        for k, value in parked.fetched.items():
            values[k] = value
        if parked.stored is not None:
            parked.stored.synchronize()  # before the host buffer can be handed out again
        for buffer in parked.host.values():
            self.pool.give(buffer)
        parked.host.clear()
        parked.fetched = None
        return values

    def discard(self) -> None:
        """Drop every parked input (a forward whose backward never ran, e.g. after an error)."""
        for parked in self._order:
            if parked.stored is not None:
                parked.stored.synchronize()
            for buffer in parked.host.values():
                self.pool.give(buffer)
            parked.host.clear()
        self._order.clear()


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, offloader: ActivationOffloader, function: Callable[..., Any], *inputs: Any) -> Any:
        ctx.offloader = offloader
        ctx.function = function
        ctx.rng = _rng_state(offloader.device)
        with torch.no_grad():
            outputs = function(*inputs)
        ctx.tuple_output = isinstance(outputs, tuple)
        ctx.parked = offloader.park(inputs)
        return outputs

    @staticmethod
    def backward(ctx, *grads: Any) -> Any:
        offloader: ActivationOffloader = ctx.offloader
        values = offloader.unpark(ctx.parked)
        inputs = [v.detach().requires_grad_(v.requires_grad or k in ctx.parked.meta) if isinstance(v, torch.Tensor)
                  else v for k, v in enumerate(values)]
        cpu_rng, cuda_rng = ctx.rng
        devices = [offloader.device] if cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, offloader.device)
            with torch.enable_grad():
                outputs = ctx.function(*inputs)
        if not ctx.tuple_output:
            outputs = (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        input_grads = tuple(x.grad if isinstance(x, torch.Tensor) and x.requires_grad else None for x in inputs)
        return (None, None, *input_grads)


def offloaded_checkpoint(offloader: ActivationOffloader, function: Callable[..., Any], *inputs: Any) -> Any:
    """``function(*inputs)`` recomputed in backward, its gradient-carrying inputs kept in host memory.

    The drop-in for ``torch.utils.checkpoint.checkpoint(function, *inputs, use_reentrant=False)``
    in generated code: same values and gradients. Without gradients to take (no input requires a
    gradient, or grad mode is off) it simply calls ``function``.
    """
    if not torch.is_grad_enabled() or not any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
        return function(*inputs)
    return _OffloadedCheckpoint.apply(offloader, function, *inputs)
