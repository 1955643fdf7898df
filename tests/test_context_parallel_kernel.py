"""Sequence-split causal attention against full causal attention on the unsplit sequence (gloo ranks),
the zigzag layout, and the balance of attention work across ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed

from dimshard.kernels.context_parallel import (
    sequence_split_attention,
    zigzag_indices,
    zigzag_inverse_permutation,
    zigzag_permutation,
)
from dimshard.kernels.sequence_split import comm as kv_transfers
from dimshard.kernels.sequence_split.blocks import (
    block_backward,
    block_forward,
    choose_backend,
    fused_backend_works,
    merge_block,
)
from dimshard.kernels.sequence_split.layout import (
    gathered_blocks,
    gathered_from_natural,
    natural_from_gathered,
    rank_blocks,
    unmasked_score_entries,
)
from dimshard.kernels.sequence_split.simulate import SimulatedSplit

# (batch, query heads, K/V heads, sequence length per rank, head dim), method, dtype
_CASES = [
    ((2, 4, 4, 8, 8), "ring", torch.float64),
    ((1, 4, 2, 8, 8), "ring", torch.float64),
    ((2, 4, 4, 8, 8), "allgather", torch.float64),
    ((1, 6, 2, 8, 8), "allgather", torch.float64),
    ((1, 4, 1, 12, 16), "ring", torch.float32),
    ((1, 4, 1, 12, 16), "allgather", torch.float32),
]


def _inputs(batch, q_heads, kv_heads, seq_len, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, seq_len, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen, dtype=torch.float64)
    grad = torch.randn(batch, q_heads, seq_len, head_dim, generator=gen, dtype=torch.float64)
    return tuple(x.to(dtype) for x in (q, k, v, grad))


def _full_attention(q, k, v, grad, scale):
    """Reference on the whole sequence: output, log-sum-exp, and the gradients of (out * grad).sum()."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=groups > 1)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    scores = q.detach() @ k.detach().repeat_interleave(groups, 1).transpose(-1, -2) * scale
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
    lse = torch.logsumexp(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return (out.detach(), lse, *grads)


def _split_attention_on_rank(cases, scale, gloo_fallbacks=True):
    # False: the collectives take their NCCL code path (single-tensor all-gather, reduce-scatter).
    kv_transfers._GLOO_FALLBACKS = gloo_fallbacks
    world_size, rank = dist.get_world_size(), dist.get_rank()
    results = []
    for (batch, q_heads, kv_heads, local_len, head_dim), method, dtype in cases:
        seq_len = local_len * world_size
        q, k, v, grad = _inputs(batch, q_heads, kv_heads, seq_len, head_dim, dtype)
        positions = zigzag_indices(seq_len, world_size, rank)
        q, k, v, grad = (x[:, :, positions].clone() for x in (q, k, v, grad))
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        out, lse = sequence_split_attention(q, k, v, scale=scale, group=None, method=method, return_lse=True)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
        results.append((out.detach(), lse, dq, dk, dv))
    return results


def _natural_order(per_rank, world_size):
    """Natural-order full tensor from every rank's zigzag shard (sequence on dim 2)."""
    joined = torch.cat(per_rank, dim=2)
    return joined.index_select(2, zigzag_inverse_permutation(joined.shape[2], world_size))


@pytest.mark.slow
@pytest.mark.parametrize("world_size, gloo_fallbacks", [(2, True), (4, True), (2, False)])
def test_split_attention_equals_full_causal_attention(world_size, gloo_fallbacks):
    scale = 0.3
    cases = _CASES if gloo_fallbacks else [c for c in _CASES if c[1] == "allgather"]
    per_rank = run_distributed(_split_attention_on_rank, world_size, cases, scale, gloo_fallbacks, timeout_s=120)
    for index, ((batch, q_heads, kv_heads, local_len, head_dim), _method, dtype) in enumerate(cases):
        reference = _full_attention(*_inputs(batch, q_heads, kv_heads, local_len * world_size, head_dim, dtype), scale)
        for field, name in enumerate(("out", "lse", "dq", "dk", "dv")):
            ours = _natural_order([rank_results[index][field] for rank_results in per_rank], world_size)
            assert ours.dtype == dtype, (name, ours.dtype)
            torch.testing.assert_close(
                ours, reference[field].to(dtype),
                msg=lambda m, name=name, index=index: f"{name} of case {cases[index]}: {m}",
            )


def _single_rank(method):
    q, k, v, grad = _inputs(1, 4, 2, 10, 8, torch.float64)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = sequence_split_attention(q, k, v, group=None, method=method)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad))


@pytest.mark.slow
def test_one_rank_is_plain_causal_attention():
    results = run_distributed(_single_rank, 1, "ring", timeout_s=120)[0]
    reference = _full_attention(*_inputs(1, 4, 2, 10, 8, torch.float64), 8**-0.5)
    for ours, ref in zip(results, reference[:1] + reference[2:]):
        torch.testing.assert_close(ours, ref)


def test_blocks_cover_every_causal_pair_once_and_every_rank_does_equal_work():
    seq_len = 48
    for world_size in (1, 2, 3, 4):
        local_len = seq_len // world_size
        for schedule in (rank_blocks, gathered_blocks):
            covered = torch.zeros(seq_len, seq_len, dtype=torch.long)
            work = []
            for rank in range(world_size):
                rows = zigzag_indices(seq_len, world_size, rank)
                entries = 0
                for block in schedule(rank, world_size, local_len):
                    keys = torch.arange(seq_len) if block.source is None else zigzag_indices(seq_len, world_size, block.source)
                    q_pos, k_pos = rows[block.q_start : block.q_stop], keys[block.kv_start : block.kv_stop]
                    mask = torch.ones(len(q_pos), len(k_pos), dtype=torch.long)
                    if block.causal:
                        mask = mask.tril()
                    covered[q_pos[:, None], k_pos[None, :]] += mask
                    assert int(mask.sum()) == unmasked_score_entries(block)
                    entries += unmasked_score_entries(block)
                work.append(entries)
            assert torch.equal(covered, torch.ones(seq_len, seq_len, dtype=torch.long).tril()), schedule.__name__
            # Each rank: 1/P of the causal triangle, P blocks of 2c^2 entries and c diagonal ones.
            chunk = seq_len // (2 * world_size)
            assert work == [2 * world_size * chunk**2 + chunk] * world_size, (schedule.__name__, world_size, work)


def test_merged_blocks_equal_one_call_with_math_backend():
    """Forward merge through the lse and per-block backward against the merged output, one process."""
    q, k, v, grad = _inputs(1, 4, 2, 12, 8, torch.float64)
    scale = 0.4
    reference = _full_attention(q, k, v, grad, scale)
    # Keys 0..5 unmasked for queries 6..11, plus the causal block 6..11 against keys 6..11.
    rows = slice(6, 12)
    pieces = [(slice(0, 6), False), (slice(6, 12), True)]
    out = torch.zeros(1, 4, 6, 8, dtype=torch.float64)
    lse = torch.full((1, 4, 6), float("-inf"), dtype=torch.float64)
    for keys, causal in pieces:
        merge_block(out, lse, *block_forward("math", q[:, :, rows], k[:, :, keys], v[:, :, keys], scale, causal))
    torch.testing.assert_close(out, reference[0][:, :, rows])
    torch.testing.assert_close(lse, reference[1][:, :, rows])
    dq = torch.zeros_like(q[:, :, rows])
    for keys, causal in pieces:
        block_dq, _, block_dv = block_backward(
            "math", grad[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys], out, lse, scale, causal
        )
        dq += block_dq
    # dq of rows 6..11 only depends on those rows' outputs: equal to the full reference.
    torch.testing.assert_close(dq, reference[2][:, :, rows])


def test_zigzag_layout():
    assert zigzag_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert zigzag_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    perm = zigzag_permutation(16, 4)
    assert perm.tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    assert torch.equal(perm[zigzag_inverse_permutation(16, 4)], torch.arange(16))
    x = torch.randn(2, 3, 24, 5)
    stacked = x.index_select(2, zigzag_permutation(24, 3)).unflatten(2, (3, 8)).movedim(2, 0)
    assert torch.equal(natural_from_gathered(stacked, 2), x)
    assert torch.equal(gathered_from_natural(x, 3, 2), stacked)


@pytest.mark.parametrize("seq_len, world_size", [(12, 4), (7, 1), (0, 2)])
def test_lengths_that_do_not_split_give_a_clear_error(seq_len, world_size):
    with pytest.raises(ValueError, match=rf"sequence length {seq_len} does not split into {2 * world_size} equal chunks"):
        zigzag_permutation(seq_len, world_size)


def _bad_inputs():
    errors = []
    q = torch.randn(1, 4, 3, 8)  # 3 local tokens on 2 ranks: 6 does not split into 4 chunks
    for args, kwargs in [
        ((q, q[:, :2], q[:, :2]), {}),
        ((q[:, :, :2], q[:, :3, :2], q[:, :3, :2]), {}),
        ((q[:, :, :2], q[:, :2, :2], q[:, :2, :2]), {"method": "tree"}),
    ]:
        try:
            sequence_split_attention(*args, **kwargs)
        except ValueError as error:
            errors.append(str(error))
    return errors


@pytest.mark.slow
def test_bad_inputs_give_clear_errors():
    errors = run_distributed(_bad_inputs, 2, timeout_s=120)[0]
    assert len(errors) == 3
    assert "sequence length 6 does not split into 4 equal chunks" in errors[0]
    assert "4 query heads are not a multiple of 3 K/V heads" in errors[1]
    assert "unknown method 'tree'" in errors[2]


def _simulated(q, k, v, grad, world_size, method, backend, scale):
    split = SimulatedSplit(q, k, v, grad, world_size, backend, scale)
    outputs = split.forward(method)
    out = split.natural_order([o for o, _ in outputs])
    lse = split.natural_order([lse for _, lse in outputs])
    return (out, lse, *split.gradients(*split.backward(method, outputs)))


@pytest.mark.parametrize("method", ["ring", "allgather"])
def test_simulated_eight_way_split_equals_full_attention(method):
    q, k, v, grad = _inputs(1, 4, 2, 64, 8, torch.float64)
    reference = _full_attention(q, k, v, grad, 0.5)
    for ours, ref in zip(_simulated(q, k, v, grad, 8, method, "math", 0.5), reference):
        torch.testing.assert_close(ours, ref)


# ---- GPU: the fused backends (skipped without CUDA; CI has none) ----------------------------------

_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _max_error(ours, ref):
    return max(float((a.detach().float() - b.detach().float()).abs().max()) for a, b in zip(ours, ref))


@_gpu
@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_fused_backend_takes_gqa_and_matches_math_on_gpu(backend):
    assert fused_backend_works(backend, torch.device("cuda", torch.cuda.current_device()), torch.bfloat16, 128)


@_gpu
@pytest.mark.parametrize("method", ["ring", "allgather"])
@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_simulated_split_with_fused_blocks_is_as_accurate_as_one_call_on_gpu(backend, method):
    """bf16 blocks merged through the lse: error against an fp32 reference no worse than one fused call's."""
    q, k, v, grad = (x.cuda() for x in _inputs(1, 8, 2, 2048, 128, torch.float32))
    scale = 128**-0.5
    reference = _simulated(q, k, v, grad, 1, "ring", "math", scale)  # fp32, one rank: plain causal attention
    low = [x.to(torch.bfloat16) for x in (q, k, v, grad)]
    one_call = _simulated(*low, 1, "ring", backend, scale)
    split = _simulated(*low, 4, method, backend, scale)
    for name, ours, single, ref in zip(("out", "lse", "dq", "dk", "dv"), split, one_call, reference):
        split_error, single_error = _max_error([ours], [ref]), _max_error([single], [ref])
        assert split_error <= 2 * single_error + 1e-3, (name, split_error, single_error)


def _op_on_one_gpu_rank(method):
    q, k, v, grad = (x.cuda().to(torch.bfloat16) for x in _inputs(2, 8, 2, 512, 128, torch.float32))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = sequence_split_attention(q, k, v, group=None, method=method, return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_q, ref_k, ref_v = (x.detach().requires_grad_() for x in (q, k, v))
    ref = F.scaled_dot_product_attention(ref_q, ref_k, ref_v, is_causal=True, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref, (ref_q, ref_k, ref_v), grad)
    assert choose_backend(q, k) in ("cudnn", "flash")
    assert lse.shape == (2, 8, 512) and lse.dtype == torch.float32
    return _max_error([out, *grads], [ref, *ref_grads])


@_gpu
@pytest.mark.parametrize("method", ["ring", "allgather"])
def test_op_on_one_gpu_rank_equals_sdpa(method):
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert _op_on_one_gpu_rank(method) < 0.05
    finally:
        dist.destroy_process_group()


def test_block_benchmark_runs_tiny_on_cpu(monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "context_parallel_blocks.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as `python benchmarks/...` has it: measurement.py
    spec = importlib.util.spec_from_file_location("context_parallel_blocks", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    rows = bench.main(["--seq_len", "64", "--world_sizes", "2,4", "--num_heads", "4", "--num_kv_heads", "2",
                       "--head_dim", "8", "--dtype", "float32", "--device", "cpu", "--warmup", "0", "--repeats", "1"])
    assert [(r.name, r.world_size) for r in rows] == [
        ("monolithic causal", 1), ("split ring", 2), ("split allgather", 2), ("split ring", 4), ("split allgather", 4),
    ]
    for row in rows[1:]:
        assert row.backend == "math" and max(row.errors.values()) < 1e-5, row
