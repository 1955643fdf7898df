"""Activation offload: recomputed regions whose inputs wait for the backward in host memory."""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from dimshard.runtime.activation_offload import ActivationOffloader, offloaded_checkpoint


class _Chain(torch.nn.Module):
    """Layers that read the residual stream and a shared side input, like decoder layers."""

    def __init__(self, layers: int = 3, width: int = 8) -> None:
        super().__init__()
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(width, width) * 0.3)
                                              for _ in range(layers))

    def layer(self, k: int, x: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.dropout(torch.tanh(x @ self.weights[k]) * side, p=0.2)
        return x + h

    def forward(self, x: torch.Tensor, side: torch.Tensor, offloader: ActivationOffloader | None) -> torch.Tensor:
        for k in range(len(self.weights)):
            fn = functools.partial(self.layer, k)
            x = offloaded_checkpoint(offloader, fn, x, side) if offloader else checkpoint(fn, x, side,
                                                                                           use_reentrant=False)
        return x.square().mean()


def _grads(offload: bool) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, ActivationOffloader | None]:
    torch.manual_seed(0)
    model = _Chain()
    x = torch.randn(4, 8, requires_grad=True)
    side = torch.rand(4, 8)
    offloader = ActivationOffloader(torch.device("cpu")) if offload else None
    torch.manual_seed(1)  # same dropout masks in both runs
    loss = model(x, side, offloader)
    if offloader is not None:
        # Each layer's input (4 x 8 fp32) is parked; the side input, needing no gradient, is not.
        assert offloader.host_bytes == 3 * 4 * 8 * 4
    loss.backward()
    return loss.detach(), [w.grad for w in model.weights], x.grad, offloader


def test_same_loss_and_gradients_as_checkpoint_and_host_memory_returned():
    loss, grads, x_grad, _ = _grads(offload=False)
    loss_o, grads_o, x_grad_o, offloader = _grads(offload=True)
    assert torch.equal(loss, loss_o)
    assert torch.equal(x_grad, x_grad_o)
    for a, b in zip(grads, grads_o):
        assert torch.equal(a, b)
    assert offloader.host_bytes == 0 and offloader.host_peak_bytes == 3 * 4 * 8 * 4
    # Buffers are reused by the next step instead of pinned again.
    pinned = offloader.pool.pinned_bytes
    torch.manual_seed(0)
    model = _Chain()
    model(torch.randn(4, 8, requires_grad=True), torch.rand(4, 8), offloader).backward()
    assert offloader.pool.pinned_bytes == pinned


def test_without_gradients_nothing_is_parked():
    offloader = ActivationOffloader(torch.device("cpu"))
    model = _Chain()
    with torch.no_grad():
        model(torch.randn(4, 8), torch.rand(4, 8), offloader)
    assert offloader.host_peak_bytes == 0


def test_host_buffers_lock_whole_pages_of_their_own():
    from dimshard.runtime.pinned import page_aligned

    for numel, dtype in ((1, torch.float32), (12345, torch.bfloat16), (4096, torch.float32)):
        region, buffer = page_aligned(numel, dtype)
        assert region.data_ptr() % 4096 == 0 and region.numel() % 4096 == 0
        assert buffer.numel() == numel and buffer.dtype == dtype and buffer.data_ptr() == region.data_ptr()
        assert region.numel() - buffer.numel() * buffer.element_size() < 4096
