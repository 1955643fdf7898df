"""Document masking: a packed batch through the compiled model equals the Hugging Face model run one
document at a time (loss and gradients), on 1 and 2 gloo processes under several plans; under a
sequence split the compile refuses document masks with a clear message.

The packed rows hold documents of mixed lengths (one runs from the first row's end into nothing:
rows are independent); positions restart at each document, attention and the loss stay inside it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from dist_utils import run_distributed
from parallel_harness import assemble, max_diff, mini_llama_config, reduce_gradients, save_weights

from dimshard.kernels.hf_attention import register
from dimshard.planner import CompileConfig, compile_model
from dimshard.runtime.data.packed_stream import IGNORE_INDEX, labels_for

TOL = 1e-5
SEQ = 32
# Document lengths per row (each row sums to SEQ): short and long, a one-token document. Three per
# row, so every row (and data-parallel copy) has as many targets: the loss is then the batch mean.
ROWS = [[5, 20, 7], [1, 12, 19], [3, 3, 26], [2, 28, 2]]


def packed_batch(rows: list[list[int]], vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids, labels, position_ids, document_ids for rows of documents with the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (len(rows), SEQ), generator=generator)
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])
    document_ids = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in rows])
    labels = torch.from_numpy(labels_for(input_ids.numpy(), position_ids.numpy()))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "document_ids": document_ids}


def reference_per_document(model: torch.nn.Module, batch: dict[str, torch.Tensor], rows: list[list[int]]) -> dict:
    """Loss (mean over every document's next-token targets) and gradients, one document per forward."""
    model.zero_grad()
    total, count = 0.0, 0
    for r, row in enumerate(rows):
        start = 0
        for length in row:
            ids = batch["input_ids"][r:r + 1, start:start + length]
            start += length
            if length < 2:
                continue  # no next-token target inside a one-token document
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            total = total + torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            count += length - 1
    loss = total / count
    loss.backward()
    return {"loss": loss.item(), "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()}}


def packed_rank_step(compile_dir: str, weights_file: str, batch: dict[str, torch.Tensor]) -> dict:
    """One rank: the compiled module on this copy's rows of the packed batch; loss and gradients."""
    from safetensors.torch import load_file

    from dimshard.runtime.distributed import init_parallel
    from dimshard.runtime.module import load_parallel_module, read_plan

    plan = read_plan(compile_dir)
    ctx = init_parallel(plan)
    module = load_parallel_module(compile_dir, ctx)
    module.load_full_state_dict(load_file(weights_file))
    per_copy = batch["input_ids"].shape[0] // ctx.dp_size
    mine = {k: v[ctx.copy_index * per_copy:(ctx.copy_index + 1) * per_copy] for k, v in batch.items()}
    loss = module(**mine)
    loss.backward()
    # Copies hold as many targets (see ROWS), so the mean over copies is the batch's mean loss.
    global_loss = reduce_gradients(ctx, module, loss)
    return {"loss": global_loss.item(),
            "grads": {lp.name: (lp.slices, lp.param.grad.detach().clone()) for lp in module.local_parameters()}}


def _model() -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(mini_llama_config(attn_implementation=register()))


def test_labels_never_cross_a_document():
    batch = packed_batch(ROWS, 128)
    targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    for r, row in enumerate(ROWS):
        ends = torch.cumsum(torch.tensor(row), 0) - 1  # each document's last token predicts nothing
        assert (targets[r, ends] == IGNORE_INDEX).all()
        assert int(targets[r].ne(IGNORE_INDEX).sum()) == sum(n - 1 for n in row)


# Batch split across copies; heads split with the residual stream split along the sequence.
@pytest.mark.slow
@pytest.mark.parametrize("policy,plan_ngpus,world", [("dp", 1, 2), ("tp_sp", 2, 2)])
def test_packed_documents_match_the_model_one_document_at_a_time(tmp_path, policy, plan_ngpus, world):
    model = _model()
    rows = ROWS[:2] if world // plan_ngpus == 1 else ROWS  # two rows per copy
    batch = packed_batch(rows, 128)
    per_copy = len(rows) // (world // plan_ngpus)
    example = {k: v[:per_copy] for k, v in batch.items()}
    compile_model(model, example, tmp_path / "out",
                  CompileConfig(plan_ngpus=plan_ngpus, policy=policy, loss="chunked_cross_entropy",
                                loss_chunk_size=7))
    assert "document_ids=document_ids" in (tmp_path / "out" / "gencode" / "rank0.py").read_text()
    save_weights(model, tmp_path / "weights.safetensors")
    # The reference runs the same weights with PyTorch's sdpa, each document alone.
    reference_model = copy.deepcopy(model)
    reference_model.config._attn_implementation = "sdpa"
    ref = reference_per_document(reference_model, batch, rows)
    results = run_distributed(packed_rank_step, world, str(tmp_path / "out"), str(tmp_path / "weights.safetensors"),
                              batch)
    for r in results:
        assert abs(r["loss"] - ref["loss"]) <= TOL, (r["loss"], ref["loss"])
    grads = assemble(results, "grads", ref["grads"])
    worst, where = max_diff(grads, ref["grads"])
    assert worst <= TOL, f"gradient of {where} differs by {worst}"


def test_unmasked_packing_differs_from_per_document():
    """The comparison above can fail: the rows run whole (attention across documents) give another loss."""
    model = _model()
    model.config._attn_implementation = "sdpa"
    batch = packed_batch(ROWS, 128)
    ref = reference_per_document(copy.deepcopy(model), batch, ROWS)
    whole = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
    assert abs(whole.item() - ref["loss"]) > 1e-3


def test_document_masks_under_a_sequence_split_are_refused_at_compile_time(tmp_path):
    from test_context_parallel_planner import sequence_policy

    from dimshard.planner.plan.placements import PlanError
    from dimshard.planner.search.policies import register_policy

    register_policy("data_test_sp2", sequence_policy({"sp": 2}), replace=True)
    batch = packed_batch(ROWS[:1], 128)
    with pytest.raises(PlanError, match=r"document.*sequence split"):
        compile_model(_model(), batch, tmp_path / "out", CompileConfig(plan_ngpus=2, policy="data_test_sp2"))
