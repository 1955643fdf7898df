"""A hand-made ParallelModule (tiny MLP language model) and its single-process reference.

Shared by the trainer, checkpoint and merger tests, so that the runtime is tested without the
planner. The toy follows docs/contract.md like generated code would: ``fc1`` is split by rows
and ``fc2`` by columns over the ``plan_ngpus`` unit ranks (Megatron style, one all-reduce),
everything else is replicated, and the loss gradient is scaled by 1/P.

The test in this file checks the toy itself: summing its local gradients over the holders of
each shard gives the reference model's gradient.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed

from dimshard.runtime import comm
from dimshard.runtime.data.prepared import MicroBatchStream
from dimshard.runtime.distributed import init_parallel
from dimshard.runtime.module import ParallelModule, take_slice
from dimshard.runtime.optimizer.lr_schedule import lr_at

VOCAB, DIM, HIDDEN, SEQ = 32, 8, 16, 8


def toy_plan(plan_ngpus: int, micro_batch_size: int = 2) -> dict:
    """plan.json for the toy: fc1 rows and fc2 columns split over plan_ngpus, the rest replicated."""
    everyone = list(range(plan_ngpus))
    per = HIDDEN // plan_ngpus

    def replicated(name: str, shape: list[int]) -> dict:
        return {"name": name, "full_shape": shape, "dtype": "float32",
                "shards": [{"slices": [[0, n] for n in shape], "unit_ranks": everyone}]}

    def split(name: str, shape: list[int], dim: int) -> dict:
        shards = []
        for u in everyone:
            slices = [[0, n] for n in shape]
            slices[dim] = [u * per, (u + 1) * per]
            shards.append({"slices": slices, "unit_ranks": [u]})
        return {"name": name, "full_shape": shape, "dtype": "float32", "shards": shards}

    parameters = [
        replicated("embed.weight", [VOCAB, DIM]),
        split("fc1.weight", [HIDDEN, DIM], 0),
        split("fc1.bias", [HIDDEN], 0),
        split("fc2.weight", [DIM, HIDDEN], 1),
        replicated("norm.weight", [DIM]),
        replicated("lm_head.weight", [VOCAB, DIM]),
    ]
    plan = {
        "format_version": 1,
        "plan_ngpus": plan_ngpus,
        "mesh": {"axis_names": ["tp"], "shape": [plan_ngpus]},
        "unit_rank_coords": [[u] for u in everyone],
        "axis_groups": {"tp": [everyone]},
        "policy": "toy",
        "recompute_scopes": [],
        "inputs": [{"name": "input_ids", "shape": [micro_batch_size, SEQ], "dtype": "int64"},
                   {"name": "labels", "shape": [micro_batch_size, SEQ], "dtype": "int64"}],
        "parameters": parameters,
        "buffers": [],
        "model_stats": {"num_params": sum(math.prod(p["full_shape"]) for p in parameters), "num_layers": 1,
                        "hidden_size": DIM, "seq_len": SEQ, "model_class": "Toy", "config_fingerprint": "toy"},
    }
    plan["fingerprint"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    return plan


class ToyModule(ParallelModule):
    """This rank's shards of the toy model; forward(input_ids, labels) -> the copy's mean loss."""

    def __init__(self, plan: dict, ctx) -> None:
        super().__init__(ctx)
        self.plan_ngpus = plan["plan_ngpus"]
        for p in plan["parameters"]:
            shard = next(s for s in p["shards"] if ctx.unit_rank in s["unit_ranks"])
            self.declare_parameter(p["name"].replace(".", "_"), p["name"], tuple(p["full_shape"]),
                                   tuple(tuple(s) for s in shard["slices"]), torch.float32,
                                   tuple(shard["unit_ranks"]))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed_weight)
        h = F.gelu(F.linear(x, self.fc1_weight, self.fc1_bias))
        y = comm.all_reduce(F.linear(h, self.fc2_weight), self.ctx.unit_group)  # Partial -> Replicate
        y = F.rms_norm(x + y, (DIM,), self.norm_weight, eps=1e-6)
        logits = F.linear(y, self.lm_head_weight).float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return comm.scale_grad(loss, 1.0 / self.plan_ngpus)


def reference_loss(state: dict[str, torch.Tensor], input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The toy's loss computed on one process from full tensors."""
    x = F.embedding(input_ids, state["embed.weight"])
    h = F.gelu(F.linear(x, state["fc1.weight"], state["fc1.bias"]))
    y = F.rms_norm(x + F.linear(h, state["fc2.weight"]), (DIM,), state["norm.weight"], eps=1e-6)
    logits = F.linear(y, state["lm_head.weight"]).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))


def full_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random full tensors of the toy (norm weights around 1)."""
    g = torch.Generator().manual_seed(seed)
    plan = toy_plan(1)
    state = {p["name"]: torch.randn(p["full_shape"], generator=g) * 0.5 for p in plan["parameters"]}
    state["norm.weight"] = 1.0 + 0.1 * torch.randn(DIM, generator=g)
    return state


def make_module(plan: dict, seed: int = 0):
    """(ctx, ToyModule with full_state(seed) loaded) for this process; call on every rank."""
    ctx = init_parallel(plan)
    module = ToyModule(plan, ctx)
    module.load_full_state_dict(full_state(seed))
    return ctx, module


def token_rows(num: int = 24, seed: int = 1) -> torch.Tensor:
    """Random token ids [num, SEQ] for the toy's datasets."""
    return torch.randint(0, VOCAB, (num, SEQ), generator=torch.Generator().manual_seed(seed))


def save_dataset(path: str | Path, rows: torch.Tensor) -> str:
    """Write rows as a datasets.save_to_disk folder with an input_ids column; return the path."""
    import datasets

    datasets.Dataset.from_dict({"input_ids": rows.tolist()}).save_to_disk(str(path))
    return str(path)


class RowsDataset:
    """The minimal dataset interface MicroBatchStream uses, over an in-memory tensor."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[indices]}


def reference_run(
    rows: torch.Tensor, *, steps: int, global_batch: int, lr: float = 1e-2, max_steps: int | None = None,
    warmup_steps: int = 0, schedule: str = "constant", weight_decay: float = 0.0, clip: float | None = None,
    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, seed: int = 0, data_seed: int = 0,
    start_state: dict[str, torch.Tensor] | None = None, skip_steps: tuple[int, ...] = (),
) -> tuple[list[float], list[float], dict[str, torch.Tensor], torch.optim.AdamW, dict[str, torch.nn.Parameter]]:
    """Train the full toy on one process with torch.optim.AdamW in the runtime's data order.

    Step s uses the next ``global_batch`` sequences of the epoch order (runtime.data); steps in
    ``skip_steps`` consume their batch without an update (loss and norm recorded as nan). Returns
    (losses, grad norms before clipping, final state, optimizer, parameters by name).
    """
    params = {k: torch.nn.Parameter(v.clone()) for k, v in (start_state or full_state(seed)).items()}
    decay = [p for p in params.values() if p.dim() > 1]
    no_decay = [p for p in params.values() if p.dim() == 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps)
    stream = MicroBatchStream(RowsDataset(rows), micro_batch_size=global_batch, dp_size=1, copy_index=0,
                              seed=data_seed)
    losses, norms = [], []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr=lr, max_steps=max_steps or steps, warmup_steps=warmup_steps,
                                schedule=schedule)
        batch = next(stream)
        if step in skip_steps:
            losses.append(float("nan"))
            norms.append(float("nan"))
            continue
        optimizer.zero_grad()
        loss = reference_loss(params, batch["input_ids"], batch["labels"])
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(params.values()), clip if clip else float("inf"))))
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, norms, {k: v.detach().clone() for k, v in params.items()}, optimizer, params


def local_shards(module: ParallelModule) -> dict[str, torch.Tensor]:
    """This rank's shards by name (detached copies)."""
    return {lp.name: lp.param.detach().clone() for lp in module.local_parameters()}


def max_shard_diff(module_shards: dict[str, torch.Tensor], module: ParallelModule,
                   full: dict[str, torch.Tensor]) -> float:
    """Largest |shard - reference slice| over this rank's shards."""
    return max(float((module_shards[lp.name].float() - take_slice(full[lp.name], lp.slices)).abs().max())
               for lp in module.local_parameters())


# ----------------------------------------------------------------------------------------------


def _grads_summed_over_holders(plan_ngpus: int) -> dict[str, torch.Tensor]:
    plan = toy_plan(plan_ngpus)
    ctx, module = make_module(plan)
    rows = token_rows(2)
    module(rows, rows).backward()
    full = {p["name"]: torch.zeros(p["full_shape"]) for p in plan["parameters"]}
    for lp in module.local_parameters():
        take_slice(full[lp.name], lp.slices).add_(lp.param.grad)
    for tensor in full.values():  # a sum over every rank, every element from its holders only
        dist.all_reduce(tensor)
    return full


def test_toy_gradient_convention_matches_reference():
    state = {k: v.requires_grad_() for k, v in full_state().items()}
    rows = token_rows(2)
    reference_loss(state, rows, rows).backward()
    summed = run_distributed(_grads_summed_over_holders, 2, 2)[0]
    for name, tensor in state.items():
        assert torch.allclose(summed[name], tensor.grad, atol=1e-6), name
