"""Recurrent and hybrid families (Mamba, Mamba2, Bamba, Falcon-H1, LFM2, ... with experts turned off) under
``tp``, ``auto`` and ``cp`` on 2 and 4 gloo ranks equal one process running the Hugging Face model.

Each family's tiny config (tests/model_families.py, plus ``EXPERTS_OFF`` for hybrids whose default
config routes to experts) is compiled with dimshard's recurrent ops (one op per scan and per short
convolution, planner/graph/hf_mixers.py); the reference is the Hugging Face model itself, its
PyTorch path, in fp32. One launch per rank count runs every compiled model: loss, gradients and
the parameters after one SGD step must match, each tensor relative to its largest entry. Under
``cp`` every scan and convolution runs sequence split (``kernels/recurrent/sequence_split.py``, states
passed between ranks, in the zigzag layout where softmax attention shares the axis): the generated
code calls only the split forms.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_utils import run_distributed
from model_families import SEQUENCE, TINY, causal_lm_families
from parallel_harness import assemble, rank_steps, reference_step
from test_model_breadth import BATCH, FOUR_WAY_HEADS, _models

# Hybrids whose default config routes to experts: the same layers with dense MLPs (their experts are
# the mixture-of-experts tests' concern), one recurrent layer and one attention layer.
EXPERTS_OFF: dict[str, dict[str, Any]] = {
    "jamba": {"num_experts": 1, "attn_layer_period": 2, "attn_layer_offset": 1, "mamba_d_state": 8,
              "mamba_dt_rank": 8},
    "granitemoehybrid": {"num_local_experts": 0, "layer_types": ["linear_attention", "full_attention"], "mamba_n_heads": 8,
                         "mamba_d_head": 16, "mamba_n_groups": 4, "mamba_d_state": 8, "mamba_chunk_size": 8},
    "nemotron_h": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "full_attention", "mlp"],
                   "mamba_num_heads": 8, "mamba_head_dim": 16, "n_groups": 4, "ssm_state_size": 8, "chunk_size": 8},
    "qwen3_next": {"mlp_only_layers": [0, 1], "layer_types": ["linear_attention", "full_attention"],
                   "linear_num_key_heads": 4, "linear_num_value_heads": 8, "linear_key_head_dim": 8,
                   "linear_value_head_dim": 8},
    # Kimi's attention layer is multi-head latent attention: it writes keys into views (key_states[..., :n].copy_),
    # which the tracer turns into scatters (planner/graph/functionalize.py).
    "kimi_linear": {"mlp_layer_types": ["dense", "dense"], "layer_types": ["linear_attention", "full_attention"],
                    "linear_num_heads": 4, "linear_head_dim": 8, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                    "v_head_dim": 16, "kv_lora_rank": 16},
}
# Families without attention layers: their heads (and Mamba2's head_dim) are the mixer's, already 4-way.
NO_ATTENTION = {"mamba", "falcon_mamba", "mamba2"}
FAMILIES = [f for f in ("mamba", "falcon_mamba", "mamba2", "bamba", "falcon_h1", "lfm2", "lfm3", "qwen3_5_text",
                         "olmo_hybrid", *EXPERTS_OFF) if f in causal_lm_families()]  # lfm3: transformers >= 5.25
POLICIES = ("tp", "auto", "cp")
RANKS = (2, 4)
LOSS_TOL = 1e-5
RELATIVE_TOL = 3e-5  # gradients and updated parameters, relative to each tensor's largest entry (when above 1)
LR = 1e-2


def _prepare(family: str, ranks: int, workdir: Path, input_ids: torch.Tensor) -> tuple[dict, list[tuple[str, str]]]:
    """The reference step and the (compile dir, weights) of each policy for one family and rank count."""
    from safetensors.torch import save_file

    from dimshard.planner import CompileConfig, compile_model

    four_way = FOUR_WAY_HEADS if ranks == 4 and family not in NO_ATTENTION else {}
    overrides = {**EXPERTS_OFF.get(family, {}), **four_way}
    if "kv_lora_rank" in overrides:  # latent attention expands its keys to one head per query head
        overrides["num_key_value_heads"] = overrides.get("num_attention_heads", TINY["num_attention_heads"])
    reference, ours = _models(family, **overrides)
    workdir.mkdir(parents=True, exist_ok=True)
    weights = workdir / "weights.safetensors"
    save_file({n: p.detach().contiguous() for n, p in ours.named_parameters()}, str(weights))
    jobs = []
    for policy in POLICIES:
        config = CompileConfig(plan_ngpus=ranks, policy=policy, loss="chunked_cross_entropy", loss_chunk_size=5)
        compile_model(ours, {"input_ids": input_ids, "labels": input_ids.clone()}, workdir / policy, config)
        jobs.append((str(workdir / policy), str(weights)))
    return reference_step(copy.deepcopy(reference), input_ids, "sgd", LR), jobs


def _split_calls_problem(compile_dir: Path) -> str:
    """Empty when every rank's generated code runs each recurrent op sequence split (the ``split_*`` forms,
    none of the whole ops), else what it runs whole."""
    for rank_code in sorted((compile_dir / "gencode").glob("rank*.py")):
        imports = [line for line in rank_code.read_text().splitlines() if line.startswith("from dimshard.kernels.recurrent")]
        whole = [line.rsplit(" ", 1)[-1] for line in imports if ".sequence_split import split_" not in line]
        if whole or not imports:
            return f"{rank_code.name} runs {whole or 'no recurrent op'} whole, not sequence split"
    return ""


def _problem(results: list[dict], ref: dict) -> str:
    """Empty when every rank's loss and the assembled gradients and updated parameters match ``ref``."""
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        return "run: " + errors[0].strip().splitlines()[-1][:300]
    for r in results:
        if abs(r["loss"] - ref["loss"]) > LOSS_TOL:
            return f"loss {r['loss']:.7f} against Hugging Face's {ref['loss']:.7f}"
    for key in ("grads", "params"):
        full = assemble(results, key, ref[key])
        for name, want in ref[key].items():
            scale = max(1.0, want.abs().max().item())
            worst = (full[name] - want).abs().max().item()
            if not worst <= RELATIVE_TOL * scale:  # NaN (a slice no rank holds) fails too
                return f"{key} of {name} differ by {worst:.2e} (largest entry {scale:.2e})"
    return ""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str, int], str]:
    input_ids = torch.randint(0, 128, (BATCH, SEQUENCE), generator=torch.Generator().manual_seed(0))
    root = tmp_path_factory.mktemp("recurrent")
    found: dict[tuple[str, str, int], str] = {}
    for ranks in RANKS:
        refs, jobs, owners = {}, [], []
        for family in FAMILIES:
            try:
                refs[family], family_jobs = _prepare(family, ranks, root / f"{family}_{ranks}", input_ids)
            except Exception as error:  # noqa: BLE001
                for policy in POLICIES:
                    found[(family, policy, ranks)] = f"compile: {type(error).__name__}: {error}"[:400]
                continue
            jobs += family_jobs
            owners += [(family, policy) for policy in POLICIES]
        results = run_distributed(rank_steps, ranks, jobs, input_ids, LR, timeout_s=600) if jobs else []
        for index, (family, policy) in enumerate(owners):
            codegen = _split_calls_problem(root / f"{family}_{ranks}" / policy) if policy == "cp" else ""
            found[(family, policy, ranks)] = codegen or _problem([rank[index] for rank in results], refs[family])
    return found


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("family", FAMILIES)
def test_recurrent_family_trains_like_hugging_face(outcomes, family, policy, ranks):
    problem = outcomes[(family, policy, ranks)]
    assert not problem, f"{family} under {policy} on {ranks} ranks: {problem}"


def test_each_scan_and_convolution_is_one_op():
    from transformers.models.mamba2 import modeling_mamba2

    from dimshard.planner.graph.hf import chunked_causal_lm_forward
    from dimshard.planner.graph.trace import trace

    _, ours = _models("mamba2")
    originals = {name: getattr(modeling_mamba2, name) for name in ("mamba2_chunk_scan", "causal_conv1d_fn")}
    ids = torch.randint(0, 128, (1, SEQUENCE))
    graph = trace(ours, {"input_ids": ids, "labels": ids.clone()}, forward_fn=chunked_causal_lm_forward())
    assert all(getattr(modeling_mamba2, name) is fn for name, fn in originals.items())  # restored after the trace
    names = [op.name.rsplit(".", 1)[-1] for op in graph.ops]
    layers = ours.config.num_hidden_layers
    assert names.count("state_space_dual") == layers and names.count("causal_conv1d") == layers
    assert not any(n in ("cumsum", "einsum", "tril", "conv1d") for n in names)  # no traced scan internals
