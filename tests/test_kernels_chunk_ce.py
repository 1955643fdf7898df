"""chunk_linear_cross_entropy against the eager reference (fp64) on random inputs: values and gradients."""

from __future__ import annotations

import pytest
import torch

from dimshard.kernels import chunk_linear_cross_entropy, chunk_linear_cross_entropy_reference
from dimshard.kernels.chunk_linear_cross_entropy import tile_sizes

PAD = -100
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# ||out - ref|| / ||ref|| bounds: fp32 arithmetic, and bf16 operands (logits rounded to bf16 as in eager).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1e-2}


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _inputs(batch, length, dim, vocab, dtype, device, padding_idx=PAD, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, dim, generator=gen).to(device, dtype)
    weight = (torch.randn(vocab, dim, generator=gen) / dim**0.5).to(device, dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[0, :3] = padding_idx  # padded tokens at the start and scattered
    labels[-1, -1] = padding_idx
    labels.view(-1)[:: 5] = padding_idx
    grad_out = torch.randn(batch, length, generator=gen).to(device)
    return hidden, weight, labels.to(device), grad_out


def _loss_and_grads(fn, hidden, weight, labels, grad_out, **kwargs):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    loss = fn(hidden, weight, labels, PAD, **kwargs)
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight), grad_out)
    return loss, grad_hidden, grad_weight


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "batch, length, chunk_size, vocab_splits",
    [(1, 37, 7, 1), (2, 19, 7, 3), (2, 19, 16, None), (3, 11, 1024, None), (2, 16, 8, 2), (1, 5, 1, 7)],
)
def test_matches_reference(device, dtype, batch, length, chunk_size, vocab_splits):
    hidden, weight, labels, grad_out = _inputs(batch, length, 32, 61, dtype, device)
    loss, grad_hidden, grad_weight = _loss_and_grads(
        chunk_linear_cross_entropy, hidden, weight, labels, grad_out, chunk_size=chunk_size, vocab_splits=vocab_splits
    )
    ref_loss, ref_hidden, ref_weight = _loss_and_grads(
        chunk_linear_cross_entropy_reference, hidden.double(), weight.double(), labels, grad_out.double()
    )
    assert loss.dtype == torch.float32 and loss.shape == labels.shape
    assert grad_hidden.dtype == dtype and grad_weight.dtype == dtype
    tol = TOLERANCE[dtype]
    assert _relative_error(loss, ref_loss) < tol
    assert _relative_error(grad_hidden, ref_hidden) < tol
    assert _relative_error(grad_weight, ref_weight) < tol
    padded = labels == PAD
    assert torch.all(loss[padded] == 0)
    assert torch.all(grad_hidden[padded] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_is_as_close_as_eager_bf16(device):
    # The eager op on the same bf16 inputs is the bar: the chunked op must not be noticeably worse.
    hidden, weight, labels, grad_out = _inputs(2, 24, 64, 300, torch.bfloat16, device, seed=1)
    ours = _loss_and_grads(chunk_linear_cross_entropy, hidden, weight, labels, grad_out, chunk_size=5, vocab_splits=3)
    eager = _loss_and_grads(chunk_linear_cross_entropy_reference, hidden, weight, labels, grad_out)
    exact = _loss_and_grads(chunk_linear_cross_entropy_reference, hidden.double(), weight.double(), labels,
                            grad_out.double())
    for out, bar, ref in zip(ours, eager, exact):
        assert _relative_error(out, ref) <= 1.5 * _relative_error(bar, ref) + 1e-3


def test_padding_idx_inside_vocabulary():
    hidden, weight, labels, grad_out = _inputs(2, 9, 16, 20, torch.float32, "cpu")
    labels[labels == PAD] = 0
    loss = chunk_linear_cross_entropy(hidden, weight, labels, 0, chunk_size=4, vocab_splits=2)
    ref = chunk_linear_cross_entropy_reference(hidden, weight, labels, 0)
    torch.testing.assert_close(loss, ref)
    assert torch.all(loss[labels == 0] == 0)


def test_only_one_input_needs_grad():
    hidden, weight, labels, grad_out = _inputs(1, 13, 16, 30, torch.float32, "cpu")
    ref_loss, ref_hidden, ref_weight = _loss_and_grads(
        chunk_linear_cross_entropy_reference, hidden, weight, labels, grad_out
    )
    h = hidden.clone().requires_grad_()
    (grad_hidden,) = torch.autograd.grad(chunk_linear_cross_entropy(h, weight, labels, PAD, chunk_size=4), h, grad_out)
    torch.testing.assert_close(grad_hidden, ref_hidden)
    w = weight.clone().requires_grad_()
    (grad_weight,) = torch.autograd.grad(chunk_linear_cross_entropy(hidden, w, labels, PAD, chunk_size=4), w, grad_out)
    torch.testing.assert_close(grad_weight, ref_weight)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_weight_gradient_accumulates_without_loss(device):
    # fp32 hidden states make every per-chunk product exact in fp32, so what is left is the
    # accumulation over 48 token chunks into a bf16 gradient: it must land on the correctly
    # rounded value (plain bf16 accumulation would be off by several roundings).
    hidden, weight, labels, grad_out = _inputs(1, 48, 16, 24, torch.float32, device, seed=2)
    weight_bf16 = weight.to(torch.bfloat16).requires_grad_()
    loss = chunk_linear_cross_entropy(hidden, weight_bf16, labels, PAD, chunk_size=1, vocab_splits=1)
    (grad_weight,) = torch.autograd.grad(loss, weight_bf16, grad_out)
    exact_weight = weight_bf16.detach().double().requires_grad_()
    ref = chunk_linear_cross_entropy_reference(hidden.double(), exact_weight, labels, PAD)
    (ref_weight,) = torch.autograd.grad(ref, exact_weight, grad_out.double())
    rounding = (ref_weight.to(torch.bfloat16).double() - ref_weight).norm()
    assert (grad_weight.double() - ref_weight).norm() <= 1.05 * rounding + 1e-12


def test_tile_sizes_keep_memory_promise():
    token_tile, vocab_tile = tile_sizes(131072, 128256, 1024, None)
    assert (token_tile, vocab_tile) == (16384, 8016)
    assert token_tile * vocab_tile <= 1024 * (128256 + 16)
    assert tile_sizes(100, 61, 7, None) == (7, 61)  # small vocabularies are not split
    assert tile_sizes(100, 61, 7, 3) == (21, 21)
    with pytest.raises(ValueError):
        tile_sizes(10, 10, 0, None)


def test_runs_on_meta_tensors():
    # The planner's tracer runs registered ops on meta tensors to learn output shapes.
    hidden = torch.empty(2, 4096, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.empty(1000, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.empty(2, 4096, device="meta", dtype=torch.long)
    loss = chunk_linear_cross_entropy(hidden, weight, labels, PAD)
    assert loss.shape == (2, 4096) and loss.dtype == torch.float32 and loss.device.type == "meta"


def test_shape_errors_say_what_is_wrong():
    hidden, weight, labels, _ = _inputs(1, 4, 8, 10, torch.float32, "cpu")
    with pytest.raises(ValueError, match="labels shape"):
        chunk_linear_cross_entropy(hidden, weight, labels[:, :2], PAD)
    with pytest.raises(ValueError, match="weight must be"):
        chunk_linear_cross_entropy(hidden, weight[:, :4], labels, PAD)
