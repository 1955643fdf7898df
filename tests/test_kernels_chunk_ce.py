"""chunk_linear_cross_entropy against the eager reference (fp64) on random inputs: values and gradients.

Both gradient paths (precomputed in the forward, recomputed in the backward) are checked against
the reference and each other, for per-token (non-uniform) and uniform incoming gradients, and
for when each path runs: activation checkpointing, retained graphs, no-grad evaluation.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from dimshard.kernels import chunk_linear_cross_entropy, chunk_linear_cross_entropy_reference
from dimshard.kernels.chunk_linear_cross_entropy import precompute_tile_sizes, tile_sizes

# The package re-exports the function under the module's name, so fetch the module itself.
ce_module = importlib.import_module("dimshard.kernels.chunk_linear_cross_entropy")

PAD = -100
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# ||out - ref|| / ||ref|| bounds: fp32 arithmetic, and bf16 operands (logits rounded to bf16 as in eager).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1e-2}
# Incoming gradients: "random" per token (non-uniform), or the loss reduced as training does:
# "mean" = sum / number of non-padding tokens (the planner's loss), "sum".
GRADS = ["random", "mean", "sum"]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


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


def _backward(loss, inputs, labels, grad_out, **kwargs):
    """Gradients of ``loss`` [b, l]: ``grad_out`` per token (a tensor), or reduced first ("sum"/"mean")."""
    if isinstance(grad_out, str):
        total = loss.sum() if grad_out == "sum" else loss.sum() / (labels != PAD).sum()
        return torch.autograd.grad(total, inputs, **kwargs)
    return torch.autograd.grad(loss, inputs, grad_out.to(loss.dtype), **kwargs)


def _loss_and_grads(fn, hidden, weight, labels, grad_out, **kwargs):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    loss = fn(hidden, weight, labels, PAD, **kwargs)
    grad_hidden, grad_weight = _backward(loss, (hidden, weight), labels, grad_out)
    return loss, grad_hidden, grad_weight


def _reference(hidden, weight, labels, grad_out):
    """Loss and gradients of the eager op in fp64."""
    if isinstance(grad_out, torch.Tensor):
        grad_out = grad_out.double()
    return _loss_and_grads(chunk_linear_cross_entropy_reference, hidden.double(), weight.double(), labels, grad_out)


def _counting(monkeypatch, name):
    """Replace the module function ``name`` by a wrapper recording each call's arguments."""
    calls = []
    original = getattr(ce_module, name)

    def wrapper(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(ce_module, name, wrapper)
    return calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("precompute_grad", [None, False])
@pytest.mark.parametrize("grad_kind", GRADS)
@pytest.mark.parametrize(
    "batch, length, chunk_size, vocab_splits",
    [(1, 37, 7, 1), (2, 19, 7, 3), (2, 19, 16, None), (3, 11, 1024, None), (2, 16, 8, 2), (1, 5, 1, 7)],
)
def test_matches_reference(device, dtype, precompute_grad, grad_kind, batch, length, chunk_size, vocab_splits):
    hidden, weight, labels, grad_out = _inputs(batch, length, 32, 61, dtype, device)
    grad = grad_out if grad_kind == "random" else grad_kind
    loss, grad_hidden, grad_weight = _loss_and_grads(
        chunk_linear_cross_entropy, hidden, weight, labels, grad, chunk_size=chunk_size, vocab_splits=vocab_splits,
        precompute_grad=precompute_grad,
    )
    ref_loss, ref_hidden, ref_weight = _reference(hidden, weight, labels, grad)
    assert loss.dtype == torch.float32 and loss.shape == labels.shape
    assert grad_hidden.dtype == dtype and grad_weight.dtype == dtype
    assert grad_hidden.shape == hidden.shape and grad_weight.shape == weight.shape
    tol = TOLERANCE[dtype]
    assert _relative_error(loss, ref_loss) < tol
    assert _relative_error(grad_hidden, ref_hidden) < tol
    assert _relative_error(grad_weight, ref_weight) < tol
    padded = labels == PAD
    assert torch.all(loss[padded] == 0)
    assert torch.all(grad_hidden[padded] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad_kind", GRADS)
def test_precompute_path_equals_recompute_path(dtype, grad_kind):
    hidden, weight, labels, grad_out = _inputs(2, 29, 32, 150, dtype, "cpu", seed=3)
    grad = grad_out if grad_kind == "random" else grad_kind
    kwargs = dict(chunk_size=6, vocab_splits=4)
    pre = _loss_and_grads(chunk_linear_cross_entropy, hidden, weight, labels, grad, precompute_grad=True, **kwargs)
    re = _loss_and_grads(chunk_linear_cross_entropy, hidden, weight, labels, grad, precompute_grad=False, **kwargs)
    # The same loss computation on other tile shapes: BLAS may block the products differently.
    torch.testing.assert_close(pre[0], re[0], rtol=1e-6, atol=1e-6)
    # Gradients: the same sums in another order (and bf16 roundings in other places).
    bound = 1e-6 if dtype == torch.float32 else TOLERANCE[dtype]
    for a, b in zip(pre[1:], re[1:]):
        assert _relative_error(a, b) < bound


@pytest.mark.parametrize("grad_kind", GRADS)
@pytest.mark.parametrize("precompute_grad", [None, False])
def test_which_path_runs(monkeypatch, grad_kind, precompute_grad):
    # Uniform incoming gradients take the saved gradients as they are; a per-token one recomputes
    # only the weight gradient; the recompute path recomputes both.
    hidden, weight, labels, grad_out = _inputs(2, 13, 16, 40, torch.float32, "cpu")
    grad = grad_out if grad_kind == "random" else grad_kind
    precomputes = _counting(monkeypatch, "_loss_and_grads_tiles")
    recomputes = _counting(monkeypatch, "_recompute_grads")
    _loss_and_grads(chunk_linear_cross_entropy, hidden, weight, labels, grad, chunk_size=4,
                    precompute_grad=precompute_grad)
    if precompute_grad is False:
        assert len(precomputes) == 0 and len(recomputes) == 1
        return
    assert len(precomputes) == 1
    if grad_kind == "random":
        assert len(recomputes) == 1
        need_hidden, need_weight = recomputes[0][0][7:9]
        assert (need_hidden, need_weight) == (False, True)
    else:
        assert len(recomputes) == 0


def test_planner_local_slice_takes_fast_path(monkeypatch):
    # Under the planner each rank gets a slice of the sequence (views, not contiguous) and
    # reduces it as per_token.sum() / count: a uniform incoming gradient.
    hidden, weight, labels, _ = _inputs(2, 24, 16, 40, torch.bfloat16, "cpu", seed=4)
    local_hidden, local_labels = hidden[:, 8:16], labels[:, 8:16]
    recomputes = _counting(monkeypatch, "_recompute_grads")
    ours = _loss_and_grads(chunk_linear_cross_entropy, local_hidden, weight, local_labels, "mean", chunk_size=5)
    assert len(recomputes) == 0
    for out, ref in zip(ours, _reference(local_hidden, weight, local_labels, "mean")):
        assert _relative_error(out, ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_kind", GRADS)
@pytest.mark.parametrize("precompute_grad", [None, False])
def test_bf16_is_as_close_as_eager_bf16(device, grad_kind, precompute_grad):
    # The eager op on the same bf16 inputs is the bar: the chunked op must not be noticeably worse.
    hidden, weight, labels, grad_out = _inputs(2, 24, 64, 300, torch.bfloat16, device, seed=1)
    grad = grad_out if grad_kind == "random" else grad_kind
    ours = _loss_and_grads(chunk_linear_cross_entropy, hidden, weight, labels, grad, chunk_size=5, vocab_splits=3,
                           precompute_grad=precompute_grad)
    eager = _loss_and_grads(chunk_linear_cross_entropy_reference, hidden, weight, labels, grad)
    exact = _reference(hidden, weight, labels, grad)
    for out, bar, ref in zip(ours, eager, exact):
        assert _relative_error(out, ref) <= 1.5 * _relative_error(bar, ref) + 1e-3


def test_bf16_weight_gradient_over_many_chunks_is_as_close_as_eager():
    # The precompute path adds each chunk's bf16 product into the residual and renormalises every
    # 4 chunks: 256 chunks here. The result is a bf16 tensor, so its own final rounding (all of
    # eager's error) is the floor; the residual's roundings may add up to 3/4 of that again
    # (measured: 1.25x eager renormalising after every chunk, 1.54x every 4 chunks).
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(1, 4096, 64, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(300, 64, generator=gen) / 8).to(torch.bfloat16)
    labels = torch.randint(0, 300, (1, 4096), generator=gen)
    ours = _loss_and_grads(chunk_linear_cross_entropy, hidden, weight, labels, "mean", chunk_size=16)
    eager = _loss_and_grads(chunk_linear_cross_entropy_reference, hidden, weight, labels, "mean")
    exact = _reference(hidden, weight, labels, "mean")
    assert _relative_error(ours[2], exact[2]) <= 1.75 * _relative_error(eager[2], exact[2])


def test_padding_idx_inside_vocabulary():
    hidden, weight, labels, grad_out = _inputs(2, 9, 16, 20, torch.float32, "cpu")
    labels[labels == PAD] = 0
    loss = chunk_linear_cross_entropy(hidden, weight, labels, 0, chunk_size=4, vocab_splits=2)
    ref = chunk_linear_cross_entropy_reference(hidden, weight, labels, 0)
    torch.testing.assert_close(loss, ref)
    assert torch.all(loss[labels == 0] == 0)
    h = hidden.clone().requires_grad_()
    loss = chunk_linear_cross_entropy(h, weight, labels, 0, chunk_size=4, vocab_splits=2)
    (grad_hidden,) = torch.autograd.grad(loss.sum(), h)
    assert torch.all(grad_hidden[labels == 0] == 0)


@pytest.mark.parametrize("grad_kind", GRADS)
@pytest.mark.parametrize("precompute_grad", [None, False])
def test_only_one_input_needs_grad(grad_kind, precompute_grad):
    hidden, weight, labels, grad_out = _inputs(1, 13, 16, 30, torch.float32, "cpu")
    grad = grad_out if grad_kind == "random" else grad_kind
    _, ref_hidden, ref_weight = _reference(hidden, weight, labels, grad)
    kwargs = dict(chunk_size=4, precompute_grad=precompute_grad)
    h = hidden.clone().requires_grad_()
    (grad_hidden,) = _backward(chunk_linear_cross_entropy(h, weight, labels, PAD, **kwargs), h, labels, grad)
    assert _relative_error(grad_hidden, ref_hidden) < TOLERANCE[torch.float32]
    w = weight.clone().requires_grad_()
    (grad_weight,) = _backward(chunk_linear_cross_entropy(hidden, w, labels, PAD, **kwargs), w, labels, grad)
    assert _relative_error(grad_weight, ref_weight) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("hidden_dtype, weight_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("grad_kind", ["random", "mean"])
@pytest.mark.parametrize("precompute_grad", [None, False])
def test_mixed_dtypes(hidden_dtype, weight_dtype, grad_kind, precompute_grad):
    # The weight is cast block by block to the hidden states' dtype; its gradient keeps its own.
    hidden, weight, labels, grad_out = _inputs(2, 15, 32, 70, torch.float32, "cpu", seed=6)
    hidden, weight = hidden.to(hidden_dtype), weight.to(weight_dtype)
    grad = grad_out if grad_kind == "random" else grad_kind
    ours = _loss_and_grads(chunk_linear_cross_entropy, hidden, weight, labels, grad, chunk_size=4, vocab_splits=3,
                           precompute_grad=precompute_grad)
    assert ours[1].dtype == hidden_dtype and ours[2].dtype == weight_dtype
    for out, ref in zip(ours, _reference(hidden, weight, labels, grad)):
        assert _relative_error(out, ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_kind", ["random", "sum"])
def test_bf16_weight_gradient_accumulates_without_loss(device, grad_kind):
    # fp32 hidden states make every per-chunk product exact in fp32, so what is left is the
    # accumulation over 48 token chunks into a bf16 gradient: it must land on the correctly
    # rounded value (plain bf16 accumulation would be off by several roundings). "sum" keeps the
    # precomputed weight gradient; "random" recomputes it.
    hidden, weight, labels, grad_out = _inputs(1, 48, 16, 24, torch.float32, device, seed=2)
    grad = grad_out if grad_kind == "random" else torch.ones_like(grad_out)
    weight_bf16 = weight.to(torch.bfloat16).requires_grad_()
    loss = chunk_linear_cross_entropy(hidden, weight_bf16, labels, PAD, chunk_size=1, vocab_splits=1)
    (grad_weight,) = torch.autograd.grad(loss, weight_bf16, grad)
    exact_weight = weight_bf16.detach().double().requires_grad_()
    ref = chunk_linear_cross_entropy_reference(hidden.double(), exact_weight, labels, PAD)
    (ref_weight,) = torch.autograd.grad(ref, exact_weight, grad.double())
    rounding = (ref_weight.to(torch.bfloat16).double() - ref_weight).norm()
    assert (grad_weight.double() - ref_weight).norm() <= 1.05 * rounding + 1e-12


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("grad_kind", ["random", "mean"])
def test_under_activation_checkpointing(monkeypatch, use_reentrant, grad_kind):
    # The forward runs twice; the recomputed forward's saved gradients are the ones used.
    hidden, weight, labels, grad_out = _inputs(2, 17, 16, 45, torch.float32, "cpu", seed=7)
    grad = grad_out if grad_kind == "random" else grad_kind
    precomputes = _counting(monkeypatch, "_loss_and_grads_tiles")
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = checkpoint(lambda a, b: chunk_linear_cross_entropy(a, b, labels, PAD, chunk_size=5), h, w,
                      use_reentrant=use_reentrant)
    # .backward(), not autograd.grad: reentrant checkpointing supports only the former.
    if grad_kind == "random":
        loss.backward(grad)
    else:
        (loss.sum() / (labels != PAD).sum()).backward()
    grads = (h.grad, w.grad)
    # Non-reentrant: both forwards run with grad enabled; reentrant: the first one without.
    assert len(precomputes) == (1 if use_reentrant else 2)
    plain = _loss_and_grads(chunk_linear_cross_entropy, hidden, weight, labels, grad, chunk_size=5)
    for out, ref in zip((loss, *grads), plain):
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    for out, ref in zip(grads, _reference(hidden, weight, labels, grad)[1:]):
        assert _relative_error(out, ref) < TOLERANCE[torch.float32]


def test_second_backward_through_retained_graph():
    # The first backward hands out the saved buffers scaled in place; the second recomputes.
    hidden, weight, labels, grad_out = _inputs(2, 11, 16, 30, torch.float32, "cpu", seed=8)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = chunk_linear_cross_entropy(h, w, labels, PAD, chunk_size=4)
    first = _backward(loss, (h, w), labels, "mean", retain_graph=True)
    second = _backward(loss, (h, w), labels, grad_out)
    for out, ref in zip(first, _reference(hidden, weight, labels, "mean")[1:]):
        assert _relative_error(out, ref) < TOLERANCE[torch.float32]
    for out, ref in zip(second, _reference(hidden, weight, labels, grad_out)[1:]):
        assert _relative_error(out, ref) < TOLERANCE[torch.float32]


def test_saved_gradients_are_handed_out_without_a_copy(monkeypatch):
    # No second gradient-sized buffer: the backward scales the forward's buffers in place, and
    # autograd stores them as .grad as they are.
    addresses = []  # not the tensors: holding a reference would itself force autograd to copy
    original = ce_module._loss_and_grads_tiles

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        addresses.extend(t.data_ptr() for t in result[2:4])  # hidden and weight (no bias here)
        return result

    monkeypatch.setattr(ce_module, "_loss_and_grads_tiles", recording)
    hidden, weight, labels, _ = _inputs(2, 11, 16, 30, torch.bfloat16, "cpu")
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = chunk_linear_cross_entropy(h, w, labels, PAD, chunk_size=4)
    (loss.sum() / (labels != PAD).sum()).backward()
    assert [h.grad.data_ptr(), w.grad.data_ptr()] == addresses


def test_evaluation_does_no_gradient_work(monkeypatch):
    hidden, weight, labels, _ = _inputs(2, 13, 16, 40, torch.float32, "cpu")
    expected = chunk_linear_cross_entropy_reference(hidden, weight, labels, PAD)
    softmax_grads = _counting(monkeypatch, "_softmax_grad_")
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.no_grad():
        no_grad = chunk_linear_cross_entropy(h, w, labels, PAD, chunk_size=4)
    with torch.inference_mode():
        inference = chunk_linear_cross_entropy(h, w, labels, PAD, chunk_size=4)
    no_inputs_need_grad = chunk_linear_cross_entropy(hidden, weight, labels, PAD, chunk_size=4)
    assert len(softmax_grads) == 0
    for loss in (no_grad, inference, no_inputs_need_grad):
        torch.testing.assert_close(loss, expected)
        assert loss.grad_fn is None
    # With a gradient to take, the forward itself does the gradient work.
    chunk_linear_cross_entropy(h, w, labels, PAD, chunk_size=4)
    assert len(softmax_grads) > 0


def test_tile_sizes_keep_memory_promise():
    token_tile, vocab_tile = tile_sizes(131072, 128256, 1024, None)
    assert (token_tile, vocab_tile) == (16384, 8016)
    assert token_tile * vocab_tile <= 1024 * (128256 + 16)
    assert tile_sizes(100, 61, 7, None) == (7, 61)  # small vocabularies are not split
    assert tile_sizes(100, 61, 7, 3) == (21, 21)
    with pytest.raises(ValueError):
        tile_sizes(10, 10, 0, None)


def test_precompute_tile_sizes():
    # Llama-3-8B at 128K tokens, bf16: at most 640 MiB of logits per chunk, 16 vocabulary blocks.
    chunk, vocab_tile = precompute_tile_sizes(131072, 128256, 2, None, None)
    assert (chunk, vocab_tile) == (2560, 8016)
    assert chunk * 128256 * 2 <= 640 * 2**20
    assert precompute_tile_sizes(131072, 128256, 4, None, None)[0] == 1280  # fp32 logits
    assert precompute_tile_sizes(100, 128256, 2, None, None)[0] == 100  # never more than the tokens
    assert precompute_tile_sizes(131072, 128256, 2, 1000, 4) == (1000, 32064)  # chunk_size is the bound
    assert precompute_tile_sizes(100, 61, 2, 7, None) == (7, 61)  # small vocabularies are not split
    with pytest.raises(ValueError):
        precompute_tile_sizes(10, 10, 2, 0, None)


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


# --- the Triton kernels on both paths, under Triton's interpreter on the CPU ---------------------

def test_triton_paths_under_interpreter():
    # Like tests/test_kernels_triton.py: the interpreter must be on before Triton is imported, so
    # the triton_path tests below run in a fresh process with TRITON_INTERPRET=1.
    if INTERPRETED:
        pytest.skip("already inside the interpreted run")
    pytest.importorskip("triton", minversion="3.9")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton_path_"],
        env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad_kind", GRADS)
@pytest.mark.parametrize("precompute_grad", [None, False])
def test_triton_path_matches_reference(monkeypatch, dtype, grad_kind, precompute_grad):
    if not INTERPRETED:
        pytest.skip("runs in the TRITON_INTERPRET=1 subprocess")
    monkeypatch.setattr(ce_module, "use_triton", lambda *tensors: True)
    hidden, weight, labels, grad_out = _inputs(2, 9, 16, 50, dtype, "cpu", seed=9)
    grad = grad_out if grad_kind == "random" else grad_kind
    ours = _loss_and_grads(chunk_linear_cross_entropy, hidden, weight, labels, grad, chunk_size=5, vocab_splits=3,
                           precompute_grad=precompute_grad)
    for out, ref in zip(ours, _reference(hidden, weight, labels, grad)):
        assert _relative_error(out, ref) < TOLERANCE[dtype]


# The final projections of other families: output bias (Phi, GPT-J), logit scale (Cohere, Granite),
# final-logit soft-cap (Gemma 2), applied inside each tile.
@pytest.mark.parametrize("bias, logit_scale, softcap", [(True, None, None), (False, 0.25, None), (False, None, 2.0),
                                                        (True, 1.5, 3.0)])
@pytest.mark.parametrize("precompute", [True, False])
@pytest.mark.parametrize("grad_out", ["random", "mean"])
def test_head_features_match_reference(bias, logit_scale, softcap, precompute, grad_out):
    hidden, weight, labels, random_grad = _inputs(2, 9, 16, 30, torch.float32, "cpu", seed=11)
    grad_out = random_grad if grad_out == "random" else grad_out
    b = torch.randn(30, generator=torch.Generator().manual_seed(3)) if bias else None
    features = {"logit_scale": logit_scale, "softcap": softcap}

    def run(fn, dtype, **kwargs):
        h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
        bb = None if b is None else b.to(dtype).requires_grad_()
        loss = fn(h, w, labels, PAD, bias=bb, **features, **kwargs)
        inputs = (h, w) + ((bb,) if bb is not None else ())
        g = grad_out if isinstance(grad_out, str) else grad_out.to(dtype)
        return (loss, *_backward(loss, inputs, labels, g))

    ours = run(chunk_linear_cross_entropy, torch.float32, chunk_size=4, vocab_splits=3, precompute_grad=precompute)
    ref = run(chunk_linear_cross_entropy_reference, torch.float64)
    assert len(ours) == (4 if bias else 3)
    for out, expected in zip(ours, ref):
        assert _relative_error(out, expected) < TOLERANCE[torch.float32]


def test_head_features_are_checked():
    hidden, weight, labels, _ = _inputs(1, 4, 8, 12, torch.float32, "cpu")
    with pytest.raises(ValueError, match="bias must be"):
        chunk_linear_cross_entropy(hidden, weight, labels, PAD, bias=torch.zeros(11))
    with pytest.raises(ValueError, match="softcap must be positive"):
        chunk_linear_cross_entropy(hidden, weight, labels, PAD, softcap=0.0)
