"""Parallel equals one process, on real GPUs with NCCL: every layout through the trainer's runtime.

    torchrun --nproc_per_node 4 benchmarks/multi_gpu_check.py              # NCCL, fp32 and bf16
    torchrun --nproc_per_node 2 benchmarks/multi_gpu_check.py --backend gloo --dtypes float32   # CPU

For each case, rank 0 builds a mini Llama (seeded), compiles it for the case's plan and saves its
weights; every rank then runs one training step with the runtime train.py uses: the generated
module (single-tensor all-gather / reduce-scatter / all-to-all on NCCL), the bucketed
asynchronous gradient reduction overlapping the activation collectives of backward, and ZeRO-1
AdamW with its parameter all-gather over the data-parallel copies, on sub-communicators of a
2-D (unit x copies) layout where the case has several copies. Rank 0 compares the loss, the
reduced gradients and the updated parameters with the Hugging Face model run in one process on
the same device in float32, and prints one line per case and a table last. Collectives are
logged (``runtime/reliability/collective_order.py``) and every rank's order on shared communicators is
checked after each case. Exits non-zero when any case fails.

Tolerances: float32 plans must match to 1e-4 (absolute, loss) and 1e-3 (relative L2 error of
the gradients and of the parameter change made by the step; reduction order differs across
ranks). bf16 plans, whose parameters and activations are rounded to 8 mantissa bits, must match
to 2e-2 and 5e-2, the parameters compared as values: an lr-sized change of a bf16 parameter near
1.0 is below its rounding step, so the change itself is not comparable there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

# eps well above rounding noise: for gradients near zero Adam's first step is the sign of the noise.
ADAM_EPS = 1e-4
# What "param rel" compares: the step's change in fp32, the values in bf16 (see the docstring).
_PARAM_KEY = {"float32": "update_rel_err", "bfloat16": "param_rel_err"}
TOLERANCES = {"float32": (1e-4, 1e-3), "bfloat16": (2e-2, 5e-2)}  # (loss abs, tensors relative L2)


@dataclass(frozen=True)
class Case:
    """One layout: a policy, the GPUs of one model copy (the rest are copies), recompute."""

    name: str
    policy: str
    copies: int  # data-parallel copies; plan_ngpus = world // copies
    recompute: str = "none"


CASES = (
    Case("dp", "dp", copies=0),  # 0: one copy per GPU
    Case("tp", "tp", copies=1),
    Case("tp_sp", "tp_sp", copies=1, recompute="layer"),
    Case("tp_batch", "tp_batch", copies=1),
    Case("auto", "auto", copies=1),
    Case("tp_x_dp_zero1", "tp", copies=2),  # 2-D: tensor parallel inside a copy, ZeRO-1 across copies
    Case("tp_sp_x_dp_zero1", "tp_sp", copies=2, recompute="layer"),
)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("nccl", "gloo"), default=None,
                   help="process-group backend; default nccl when CUDA is visible, else gloo")
    p.add_argument("--cases", default=",".join(c.name for c in CASES),
                   help="comma-separated case names; also POLICY:COPIES for any registered policy "
                        "(e.g. a sequence-split policy)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="parameter dtypes to compile for: float32, bfloat16")
    p.add_argument("--seq_len", type=int, default=64, help="tokens per sequence of the mini model's batch")
    p.add_argument("--batch", type=int, default=8, help="sequences per step over all copies")
    p.add_argument("--work_dir", default="/tmp/dimshard_multi_gpu_check", help="compile outputs and weights")
    p.add_argument("--json_out", default=None, help="append one JSON line per case to this file")
    return p.parse_args(argv)


def _cases(spec: str) -> list[Case]:
    known = {c.name: c for c in CASES}
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if item in known:
            out.append(known[item])
        elif ":" in item:
            policy, copies = item.split(":", 1)
            out.append(Case(item, policy, copies=int(copies)))
        else:
            sys.exit(f"unknown case {item!r}: one of {', '.join(known)}, or POLICY:COPIES")
    return out


def _mini_config():
    from transformers import LlamaConfig

    # Head counts and sizes split 1, 2, 4 and 8 ways.
    return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=256, max_position_embeddings=1024, rms_norm_eps=1e-5,
                       attn_implementation="sdpa", tie_word_embeddings=False)


def _reference(model: torch.nn.Module, ids: torch.Tensor, lr: float, device: torch.device) -> dict:
    """One fp32 step of the original model in one process: loss, gradients, updated parameters."""
    model = model.to(device)
    loss = model(input_ids=ids.to(device), labels=ids.to(device), use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()}
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=ADAM_EPS)
    opt.step()
    params = {n: p.detach().float().cpu() for n, p in model.named_parameters()}
    return {"loss": loss.item(), "grads": grads, "params": params}


def _assemble(pieces: list[dict], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {n: torch.full_like(t, float("nan")) for n, t in like.items()}
    for rank_pieces in pieces:
        for name, slices, value in rank_pieces:
            out[name][tuple(slice(a, b) for a, b in slices)] = value
    return out


def _relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    worst, where = 0.0, ""
    for name, ref in b.items():
        got = a[name]
        err = float("inf") if torch.isnan(got).any() else ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        if err > worst:
            worst, where = err, name
    return worst, where


def run_case(case: Case, dtype_name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Compile (rank 0), run one step on every rank, compare on rank 0; returns rank 0's record."""
    from transformers import LlamaForCausalLM

    from dimshard.planner.compile import CompileConfig, compile_model
    from dimshard.runtime.distributed import init_parallel
    from dimshard.runtime.module import load_parallel_module, read_plan
    from dimshard.runtime.optimizer.grad_reducer import GradReducer, keeps_param_dtype
    from dimshard.runtime.optimizer.zero_adamw import ZeroAdamW, offloads_optimizer
    from dimshard.runtime.reliability import collective_order

    rank, world = dist.get_rank(), dist.get_world_size()
    copies = world if case.copies == 0 else case.copies
    plan_ngpus = world // copies
    param_dtype = getattr(torch, dtype_name)
    out_dir = Path(args.work_dir) / f"{case.name}_{dtype_name}".replace(":", "_")
    weights = out_dir / "weights.pt"
    torch.manual_seed(0)
    model = LlamaForCausalLM(_mini_config())
    ids = torch.randint(0, 256, (args.batch, args.seq_len))
    if rank == 0:
        example = ids[: args.batch // copies]
        config = CompileConfig(plan_ngpus=plan_ngpus, policy=case.policy, recompute=case.recompute,
                               param_dtype=param_dtype if param_dtype != torch.float32 else None)
        compile_model(model, {"input_ids": example, "labels": example.clone()}, out_dir / "compile", config)
        torch.save(model.state_dict(), weights)
    dist.barrier()
    plan = read_plan(out_dir / "compile")
    ctx = init_parallel(plan)
    module = load_parallel_module(out_dir / "compile", ctx)
    module.load_full_state_dict(torch.load(weights, weights_only=True))
    params = module.local_parameters()
    optimizer = ZeroAdamW(params, ctx, weight_decay=0.1, eps=ADAM_EPS, param_dtype=param_dtype,
                          offload=offloads_optimizer(plan))
    reducer = GradReducer(params, ctx, keep_param_dtype=keeps_param_dtype(plan, 1))
    per_copy = args.batch // ctx.dp_size
    batch = ids[ctx.copy_index * per_copy:(ctx.copy_index + 1) * per_copy].to(device)
    lr = 1e-3
    start = time.perf_counter()
    loss = module(batch, batch.clone())
    loss.backward()
    grads = reducer.finish()
    local_grads = [(lp.name, lp.slices, g.detach().float().cpu()) for lp, g in zip(params, grads)]
    optimizer.step(grads, lr, None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    global_loss = loss.detach().float().clone()
    dist.all_reduce(global_loss)
    global_loss /= world
    local_params = [(lp.name, lp.slices, lp.param.detach().float().cpu()) for lp in params]
    order_events = collective_order.check_collective_order()
    gathered: list = [None] * world if rank == 0 else None
    dist.gather_object((local_grads, local_params), gathered, dst=0)
    reducer.close()
    record = {"case": case.name, "dtype": dtype_name, "world": world, "plan_ngpus": plan_ngpus,
              "copies": ctx.dp_size, "mesh": plan["mesh"], "step_s": round(seconds, 3),
              "collectives_checked": order_events}
    if rank == 0:
        ref = _reference(model, ids, lr, device)
        grads_full = _assemble([g for g, _ in gathered], ref["grads"])
        params_full = _assemble([p for _, p in gathered], ref["params"])
        loss_tol, rel_tol = TOLERANCES[dtype_name]
        grad_err, grad_where = _relative_error(grads_full, ref["grads"])
        param_err, param_where = _relative_error(params_full, ref["params"])
        loss_err = abs(global_loss.item() - ref["loss"])
        # Updated parameters: compare the change, not the value (a small lr hides errors otherwise).
        start_params = {n: v.float() for n, v in torch.load(weights, weights_only=True).items()}
        delta_err, delta_where = _relative_error(
            {n: params_full[n] - start_params[n] for n in ref["params"]},
            {n: ref["params"][n] - start_params[n] for n in ref["params"]})
        record_errors = {"param_rel_err": param_err, "update_rel_err": delta_err}
        record.update(loss=round(global_loss.item(), 6), ref_loss=round(ref["loss"], 6), loss_err=loss_err,
                      grad_rel_err=grad_err, grad_worst=grad_where, param_rel_err=param_err,
                      update_rel_err=delta_err, update_worst=delta_where or param_where,
                      ok=bool(loss_err <= loss_tol and grad_err <= rel_tol
                              and record_errors[_PARAM_KEY[dtype_name]] <= rel_tol))
    return record


def main(argv: list[str] | None = None) -> int:
    """Run the chosen cases on every rank; rank 0 prints a table and returns 1 if any failed."""
    from dimshard.runtime.reliability.gpu_memory import enable_expandable_segments

    enable_expandable_segments()  # before CUDA starts, as every rank of a training run
    args = _args(argv)
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, **({"device_id": device} if device.type == "cuda" else {}))
    from dimshard.runtime.reliability import collective_order

    collective_order.enable()
    rank = dist.get_rank()
    records = []
    for dtype_name in filter(None, args.dtypes.split(",")):
        if dtype_name not in TOLERANCES:
            sys.exit(f"unknown dtype {dtype_name!r}: float32 or bfloat16")
        for case in _cases(args.cases):
            if dist.get_world_size() % max(case.copies, 1) != 0:
                continue
            record = run_case(case, dtype_name, args, device)
            records.append(record)
            if rank == 0:
                print(json.dumps(record, default=str), flush=True)
                if args.json_out:
                    with Path(args.json_out).open("a") as f:
                        f.write(json.dumps(record, default=str) + "\n")
    failed = [r for r in records if not r.get("ok")]  # rank 0 alone compares; the others learn its verdict
    if rank == 0:
        print(f"\n{'case':<20} {'dtype':<9} {'mesh':<14} {'loss err':>9} {'grad rel':>9} {'param rel':>10}  result")
        for r in records:
            mesh = "x".join(map(str, r.get("mesh", {}).get("shape", []))) + f" x{r.get('copies', '?')}"
            print(f"{r['case']:<20} {r['dtype']:<9} {mesh:<14} {r.get('loss_err', float('nan')):>9.2e} "
                  f"{r.get('grad_rel_err', float('nan')):>9.2e} {r.get(_PARAM_KEY[r['dtype']], float('nan')):>10.2e}  "
                  f"{'ok' if r['ok'] else 'FAIL'}")
        print(f"{len(records) - len(failed)} passed, {len(failed)} failed")
    verdict = [len(failed)]
    dist.broadcast_object_list(verdict, src=0)
    dist.destroy_process_group()
    return 1 if verdict[0] else 0


if __name__ == "__main__":
    sys.exit(main())
