"""Optimizer offload: AdamW state in host memory, updated on the CPU or streamed through the device.

On the CPU machine host memory is on both sides of every copy, so these run the offload code path
(flat host buffers, chunking across pieces, staging buffers, the measured choice) end to end.
"""

from __future__ import annotations

import pytest
import torch
from test_trainer_optimizer import BETAS, LR, STEPS, WD, _check_against_reference, _worlds
from test_trainer_toy import reference_run, token_rows

from dimshard.runtime.optimizer.host_adamw import HostAdamState, choose_update_device


def test_offloaded_adamw_equals_torch_adamw_with_zero_accumulation_and_clipping():
    rows = token_rows()
    clip_free = reference_run(rows, steps=STEPS, global_batch=4, lr=LR, weight_decay=WD, betas=BETAS)
    clip = 0.5 * min(clip_free[1])
    clipped = reference_run(rows, steps=STEPS, global_batch=4, lr=LR, weight_decay=WD, betas=BETAS, clip=clip)
    # Chunks of 7 elements cut every piece and span piece boundaries.
    cpu = {"offload": True, "update_device": "cpu", "offload_chunk_numel": 7}
    gpu = {"offload": True, "update_device": "gpu", "offload_chunk_numel": 7}
    setups = [
        {"plan_ngpus": 1, "micro_batch_size": 2, "accumulation": 1, "optimizer_kwargs": cpu},  # ZeRO over 2 copies
        {"plan_ngpus": 1, "micro_batch_size": 1, "accumulation": 2, "optimizer_kwargs": gpu},  # ZeRO + accumulation
        {"plan_ngpus": 2, "micro_batch_size": 2, "accumulation": 2, "optimizer_kwargs": cpu, "clip": clip},
        {"plan_ngpus": 1, "micro_batch_size": 2, "accumulation": 1, "zero": False,
         "optimizer_kwargs": {"offload": True, "update_device": "auto", "offload_chunk_numel": 64}},
    ]
    per_rank = _worlds(2, setups)
    for index, setup in enumerate(setups):
        reference = clipped if "clip" in setup else clip_free
        _check_against_reference([rank_results[index] for rank_results in per_rank], reference)


def test_bf16_parameters_are_the_rounded_host_masters():
    reference = reference_run(token_rows(), steps=STEPS, global_batch=4, lr=LR, weight_decay=WD, betas=BETAS)
    setups = [{"plan_ngpus": 1, "micro_batch_size": 2, "accumulation": 1, "param_dtype": torch.bfloat16,
               "optimizer_kwargs": {"offload": True, "update_device": mode, "offload_chunk_numel": 5}}
              for mode in ("cpu", "gpu")]
    for rank_results in _worlds(2, setups):
        for result in rank_results:
            assert result["masters"]  # ZeRO: each copy holds masters of its own pieces only
            for name, (flat_range, master) in result["masters"].items():
                shard = result["shards"][name][1]
                assert master.dtype == torch.float32 and shard.dtype == torch.bfloat16
                assert torch.equal(shard.reshape(-1)[flat_range[0]:flat_range[1]], master.to(torch.bfloat16))
            assert result["losses"] == pytest.approx(reference[0], abs=2e-2)


def test_chunks_cover_the_owned_range_and_the_probe_changes_nothing():
    state = HostAdamState([5, 3, 9], [True, False, True], torch.device("cpu"), chunk_numel=4)
    covered = [(s.piece, s.start, s.stop, c.lo + s.at) for c in state.chunks for s in c.segments]
    flat = [state.offsets[piece] + k for piece, a, b, _ in covered for k in range(a, b)]
    assert flat == list(range(17))
    assert all(state.offsets[piece] + a == at for piece, a, _, at in covered)
    params = [torch.randn(n) for n in (5, 3, 9)]
    for i, p in enumerate(params):
        state.master(i).copy_(p)
    before = [p.clone() for p in params]
    mode, rates = choose_update_device(state, params, probe_chunks=10)
    assert mode in ("cpu", "gpu") and set(rates) == {"cpu", "gpu"}
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert torch.equal(state.flat_master, torch.cat(before))
    assert not state.flat_exp_avg.any() and not state.flat_exp_avg_sq.any()
