"""Shared pieces of the parallel-equals-single-process tests: mini models and a per-rank runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def mini_llama_config(**overrides: Any) -> Any:
    """A tiny Llama config whose head counts split over 1, 2 and 4 ranks."""
    from transformers import LlamaConfig

    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5,
                  attn_implementation="sdpa", tie_word_embeddings=False)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def reference_step(model: torch.nn.Module, input_ids: torch.Tensor, optimizer: str, lr: float) -> dict:
    """One process, the original model: loss, gradients and parameters after one optimizer step."""
    model.zero_grad()
    loss = model(input_ids=input_ids, labels=input_ids.clone(), use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt = _make_optimizer(optimizer, model.parameters(), lr)
    opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"loss": loss.item(), "grads": grads, "params": params}


def _make_optimizer(kind: str, params: Any, lr: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    # eps well above float32 noise: for gradients near zero Adam's first step is the sign of noise.
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.1, eps=1e-4)


def reduce_gradients(ctx: Any, module: Any, loss: torch.Tensor) -> torch.Tensor:
    """After ``loss.backward()`` on every rank: each shard's gradient summed over its holders and
    averaged over the copies, as docs/contract.md prescribes; returns ``loss``'s mean over all ranks."""
    for lp in module.local_parameters():
        group = ctx.shard_group(lp.unit_ranks)
        if group is not None:
            dist.all_reduce(lp.param.grad, group=group)
        lp.param.grad /= ctx.dp_size
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss)
    return global_loss / ctx.world_size


def rank_step(compile_dir: str, weights_file: str, input_ids: torch.Tensor, optimizer: str, lr: float) -> dict:
    """One rank of a parallel run: load the compiled module, forward, backward, reduce, one step.

    The batch is split over the data-parallel copies; gradients are summed over each shard's
    holders and averaged over copies, as docs/contract.md prescribes.
    """
    from safetensors.torch import load_file

    from dimshard.runtime.distributed import init_parallel
    from dimshard.runtime.module import load_parallel_module, read_plan

    plan = read_plan(compile_dir)
    ctx = init_parallel(plan)
    module = load_parallel_module(compile_dir, ctx)
    module.load_full_state_dict(load_file(weights_file))
    per_copy = input_ids.shape[0] // ctx.dp_size
    batch = input_ids[ctx.copy_index * per_copy:(ctx.copy_index + 1) * per_copy]
    loss = module(batch, batch.clone())
    loss.backward()
    global_loss = reduce_gradients(ctx, module, loss)
    locals_ = module.local_parameters()
    grads = {lp.name: (lp.slices, lp.param.grad.detach().clone()) for lp in locals_}
    opt = _make_optimizer(optimizer, [lp.param for lp in locals_], lr)
    opt.step()
    params = {lp.name: (lp.slices, lp.param.detach().clone()) for lp in locals_}
    return {"loss": global_loss.item(), "local_loss": loss.item(), "grads": grads, "params": params}


def rank_steps(jobs: list[tuple[str, str]], input_ids: torch.Tensor, lr: float) -> list[dict]:
    """One rank: ``rank_step`` with SGD for every (compile dir, weights file) in turn; a case that raises
    gives ``{"error": its traceback}`` instead, so one failure does not hide the others' results."""
    import traceback

    results = []
    for compile_dir, weights in jobs:
        try:
            results.append(rank_step(compile_dir, weights, input_ids, "sgd", lr))
        except Exception:  # noqa: BLE001 — reported per case by the caller
            results.append({"error": traceback.format_exc(limit=6)[-2000:]})
    return results


def assemble(results: list[dict], key: str, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors from every rank's shards; checks that replicas of a shard agree exactly."""
    out = {n: torch.full_like(t, float("nan")) for n, t in full.items()}
    seen: dict[tuple, torch.Tensor] = {}
    for r in results:
        for name, (slices, value) in r[key].items():
            idx = tuple(slice(a, b) for a, b in slices)
            k = (name, tuple(map(tuple, slices)))
            if k in seen:
                assert torch.allclose(seen[k], value, atol=1e-6, rtol=0), f"replicas of {name}{slices} differ"
            seen[k] = value
            out[name][idx] = value
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest absolute difference over all tensors (NaN counts as infinite) and where."""
    worst, where = 0.0, ""
    for n in b:
        d = (a[n] - b[n]).abs()
        v = float("inf") if torch.isnan(d).any() else d.max().item()
        if v > worst:
            worst, where = v, n
    return worst, where


def save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def assert_matches_reference(results: list[dict], ref: dict, tol: float) -> None:
    """Every rank's loss, and the assembled gradients and updated parameters, equal the reference within ``tol``."""
    for r in results:
        assert abs(r["loss"] - ref["loss"]) <= tol, (r["loss"], ref["loss"])
    worst, where = max_diff(assemble(results, "grads", ref["grads"]), ref["grads"])
    assert worst <= tol, f"gradient of {where} differs by {worst}"
    worst, where = max_diff(assemble(results, "params", ref["params"]), ref["params"])
    assert worst <= tol, f"updated {where} differs by {worst}"
