"""Mixture-of-experts families: a parallel run equals one process running Hugging Face's model.

For each family below a tiny model (4 experts, top-2; a shared expert, grouped top-k over sigmoid
scores or a dense first layer as the family has them) is compiled with dimshard's experts op
(``kernels/moe``) under ``ep``, ``tp`` and ``auto`` for 2 and 4 ranks, with the load-balancing loss
on (``output_router_logits``, a coefficient large enough to matter) and off. Two launches (2 and 4
gloo processes) run every compiled model for one SGD step; each loss, merged gradient and updated
weight must equal the Hugging Face model's own (eager experts, fp32, one process).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_utils import run_distributed
from model_families import tiny_config
from parallel_harness import assert_matches_reference, rank_steps, reference_step, save_weights

TOL = 2e-5
LR = 1e-2
# deepseek_v3: multi-head latent attention, whose keys are written into views (planner/graph/functionalize.py).
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe", "olmoe", "deepseek_v3")
# (policy, plan_ngpus, load-balancing loss on)
# (policy, plan_ngpus, load-balancing loss on[, "chunked" loss, policy options])
CASES = [(policy, ngpus, True) for policy in ("ep", "tp", "auto") for ngpus in (2, 4)] + [
    ("ep", 2, False), ("ep", 4, False),
    ("ep", 2, True, "chunked"),  # train.py's loss: the decoder, the chunked cross-entropy, the family's aux term
    ("ep", 4, True, "model", {"ep_size": 2}),  # tp x ep: attention heads on one axis, experts on the other
]
# Families the tp x ep case runs for: all. qwen2_moe's shared-expert gate and glm4_moe's dense first layer move
# the batch between the ep and tp axes (planner/plan/redistribute.py keeps a dim's shards nested in axis order)
# and put collectives of both groups beside the experts in the backward (the experts op is one autograd node,
# so every rank runs them in the same order).
FOLDED_FAMILIES = FAMILIES
MOE_SIZES = dict(num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=32, shared_expert_intermediate_size=32, n_group=2, topk_group=1,
                 first_k_dense_replace=1, norm_topk_prob=True, router_aux_loss_coef=0.5, router_jitter_noise=0.0)
MLA = dict(head_dim=8, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, kv_lora_rank=16, q_lora_rank=32,
           num_key_value_heads=4)


def moe_config(family: str, aux_loss: bool) -> Any:
    """A tiny config of ``family`` with 4 experts, top-2, and the load-balancing loss on or off."""
    config = tiny_config(family)
    overrides = dict(MOE_SIZES, **(MLA if family == "deepseek_v3" else {}))
    for name, value in overrides.items():
        if hasattr(config, name):
            setattr(config, name, value)
    config.output_router_logits = aux_loss
    return config


def moe_models(family: str, aux_loss: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(Hugging Face's model with eager experts, the same weights with dimshard's attention and experts)."""
    from transformers import AutoModelForCausalLM

    from dimshard.kernels.hf_attention import register as register_attention
    from dimshard.kernels.hf_experts import register as register_experts

    config = moe_config(family, aux_loss)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    with torch.no_grad():
        for tensor in list(reference.parameters()) + list(reference.buffers()):
            # Routers start at zero in some families: ties would make the top-k arbitrary.
            if tensor.is_floating_point() and tensor.dim() >= 1 and not tensor.any():
                tensor.normal_(0.0, 0.5)
    reference.config._experts_implementation = "eager"
    ours = copy.deepcopy(reference)
    ours.set_attn_implementation(register_attention())
    ours.set_experts_implementation(register_experts())
    reference.set_attn_implementation("sdpa")
    return reference.train(), ours.train()


def _compile_all(workdir: Path, input_ids: torch.Tensor) -> tuple[dict, dict[int, list[tuple[str, str, str]]]]:
    """References per (family, aux) and, per rank count, the (case name, compile dir, weights) to run."""
    from dimshard.planner import CompileConfig, compile_model

    refs: dict[str, dict] = {}
    jobs: dict[int, list[tuple[str, str, str]]] = {2: [], 4: []}
    for family in FAMILIES:
        for aux_loss in (True, False):
            reference, ours = moe_models(family, aux_loss)
            key = f"{family}-aux{int(aux_loss)}"
            weights = workdir / f"{key}.safetensors"
            save_weights(ours, weights)
            refs[key] = reference_step(reference, input_ids, "sgd", LR)
            for policy, ngpus, aux, *more in CASES:
                loss, options = (more[0] if more else "model"), (more[1] if len(more) > 1 else {})
                if aux != aux_loss or (options and family not in FOLDED_FAMILIES):
                    continue
                name = f"{key}-{policy}{ngpus}-{loss}-{'-'.join(map(str, options.values())) or 'default'}"
                out = workdir / name
                loss_options = {"loss": "chunked_cross_entropy", "loss_chunk_size": 5} if loss == "chunked" else {}
                compile_model(ours, {"input_ids": input_ids, "labels": input_ids.clone()}, out,
                              CompileConfig(plan_ngpus=ngpus, policy=policy, policy_options=options, **loss_options))
                jobs[ngpus].append((name, str(out), str(weights)))
    return refs, jobs


def test_moe_families_match_hugging_face(tmp_path):
    input_ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    refs, jobs = _compile_all(tmp_path, input_ids)
    failures = []
    for ngpus, cases in jobs.items():
        per_rank = run_distributed(rank_steps, ngpus, [(d, w) for _, d, w in cases], input_ids, LR, timeout_s=600)
        for index, (name, compile_dir, _) in enumerate(cases):
            results = [rank[index] for rank in per_rank]
            errors = [r["error"] for r in results if "error" in r]
            if errors:
                failures.append(f"{name}: {errors[0]}")
                continue
            try:
                assert_matches_reference(results, refs[name.split("-")[0] + "-" + name.split("-")[1]], TOL)
            except AssertionError as error:
                failures.append(f"{name}: {error}")
            if "-ep" in name:  # the experts ran as one op, each rank given its slice of the expert ids
                code = Path(compile_dir, "gencode", "rank0.py").read_text()
                assert re.search(r"moe_experts\(\w+, \w+, \w+, \w+_s0, ", code), name
            if name.startswith("mixtral") and name.endswith("-2"):
                # tp x ep: attention heads on tp and the batch on ep, experts on ep (layer 0's splits)
                report = Path(compile_dir, "plan_report.md").read_text()
                assert "| tp:h, ep:b |" in report and "mlp.experts | `t d^, t k^, t k^, e" in report, name
                assert re.search(r"moe_experts \| mlp\.experts \| `[^`]*` \| ep:e \|", report), name
    assert not failures, "\n".join(failures)


# GLM-4-MoE and DeepSeek-V3 balance by a bias only.
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("glm4_moe", "deepseek_v3")])
def test_aux_loss_changes_the_loss(family):
    """The load-balancing loss is on in the cases above: Hugging Face's loss differs with it."""
    input_ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with_aux, _ = moe_models(family, True)
    without, _ = moe_models(family, False)
    a = with_aux(input_ids=input_ids, labels=input_ids).loss.item()
    b = without(input_ids=input_ids, labels=input_ids).loss.item()
    assert abs(a - b) > 1e-3, (a, b)
