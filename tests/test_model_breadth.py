"""Every dense decoder-only family transformers ships: trace, compile (tp, tp_sp on 2 ranks), match Hugging Face.

The families come from transformers' own causal-LM list (tests/model_families.py sorts them into
dense, mixture-of-experts and other). For each dense family a tiny randomly initialised model is
traced and compiled with dimshard's attention and chunked loss under tp and tp_sp (with the fused
kernels, as train.py traces on GPU) for 2 ranks;
one launch of 2 gloo processes then runs every compiled model once, and each loss and merged
gradient must equal the Hugging Face model's own (one process; its sdpa attention, or eager where it
has none) within fp32 tolerance. Mixture-of-experts families run their experts as dimshard's experts op
(tests/test_moe_families.py checks them) or are refused at compile time with planner.graph.hf's message.

``python tests/test_model_breadth.py --write docs/models.md`` runs the same checks and writes the
family table.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_utils import run_distributed
from model_families import (
    KNOWN_GAPS,
    MOE_EXPERTS_OP,
    SEQUENCE,
    causal_lm_families,
    family_status,
    tiny_config,
)
from parallel_harness import assert_matches_reference, rank_step, rank_steps, reference_step

TOL = 1e-5  # the loss, absolute
# A gradient, relative to its largest entry (when that exceeds 1): sums over every token in fp32, in
# another order on each rank (Gemma 4's tied, scaled embedding lands at 1.1e-5).
GRAD_TOL = 3e-5
POLICIES = ("tp", "tp_sp")
BATCH = 2


def _models(model_type: str, **overrides: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the Hugging Face reference, the same weights with attn_implementation="dimshard").

    The reference runs Hugging Face's sdpa attention where the family supports it (Gemma 4's
    eager attention differs from its own sdpa by 1e-6 in float64), eager where it does not or
    soft-caps the scores (Gemma 2). ``overrides`` are config fields set on the tiny config.
    """
    from transformers import AutoModelForCausalLM

    from dimshard.kernels.hf_attention import register

    config = tiny_config(model_type)
    for name, value in overrides.items():
        setattr(config, name, value)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    ours = copy.deepcopy(reference)
    ours.set_attn_implementation(register())
    if getattr(reference, "_supports_sdpa", False) and getattr(config, "attn_logit_softcapping", None) is None:
        reference.set_attn_implementation("sdpa")
    return reference.train(), ours.train()


def _compile_family(model_type: str, workdir: Path, input_ids: torch.Tensor) -> tuple[dict, list[tuple[str, str]]]:
    """Reference loss and gradients, and the (compile dir, weights file) of each policy."""
    from safetensors.torch import save_file

    from dimshard.planner.compile import compile_model
    from dimshard.planner.compile_config import CompileConfig

    reference, ours = _models(model_type)
    workdir.mkdir(parents=True, exist_ok=True)
    # named_parameters lists a tied weight once, under the name the compiled module gives it.
    save_file({n: p.detach().contiguous() for n, p in ours.named_parameters()}, str(workdir / "weights.safetensors"))
    jobs = []
    for policy in POLICIES:
        out = workdir / policy
        # tp_sp traces with the fused kernels, as train.py does on GPU: each fusion must keep the family's values.
        config = CompileConfig(plan_ngpus=2, policy=policy, loss="chunked_cross_entropy", loss_chunk_size=5,
                               fused_kernels=policy == "tp_sp")
        compile_model(ours, {"input_ids": input_ids, "labels": input_ids.clone()}, out, config)
        jobs.append((str(out), str(workdir / "weights.safetensors")))
    loss = reference(input_ids=input_ids, labels=input_ids.clone(), use_cache=False).loss
    loss.backward()
    # A parameter the loss never reaches (an unused position table) has no gradient: zero, as on the ranks.
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
             for n, p in reference.named_parameters()}
    return {"loss": loss.item(), "grads": grads}, jobs


def check_families(families: list[str], workdir: Path) -> dict[str, dict[str, Any]]:
    """Run the breadth checks; returns per family {"status", "reason", "seconds"} (status ok/failed/moe/other)."""
    input_ids = torch.randint(0, 128, (BATCH, SEQUENCE), generator=torch.Generator().manual_seed(0))
    report: dict[str, dict[str, Any]] = {}
    refs: dict[str, dict] = {}
    jobs: list[tuple[str, str]] = []
    owners: list[tuple[str, str]] = []
    for family in families:
        kind, reason = family_status(family)
        start = time.perf_counter()
        if kind == "moe":
            report[family] = {"status": "experts" if reason == MOE_EXPERTS_OP else "moe", "reason": reason}
            continue
        if kind == "other":
            report[family] = {"status": "other", "reason": reason}
            continue
        try:
            refs[family], family_jobs = _compile_family(family, workdir / family, input_ids)
        except Exception as error:  # noqa: BLE001
            report[family] = {"status": "failed", "reason": f"compile: {type(error).__name__}: {error}"[:300]}
            continue
        report[family] = {"status": "ok", "reason": "", "seconds": time.perf_counter() - start}
        jobs += family_jobs
        owners += [(family, policy) for policy in POLICIES]
    if jobs:
        ranks = run_distributed(rank_steps, 2, jobs, input_ids, 0.0, timeout_s=900)
        for index, (family, policy) in enumerate(owners):
            outcome = [rank[index] for rank in ranks]
            problem = _compare(outcome, refs[family])
            if problem and report[family]["status"] == "ok":
                report[family] = {"status": "failed", "reason": f"{policy}: {problem}"}
    return report


def _compare(outcome: list[dict], ref: dict) -> str:
    errors = [r["error"] for r in outcome if "error" in r]
    if errors:
        return "run: " + errors[0].strip().splitlines()[-1][:250]
    for r in outcome:
        if abs(r["loss"] - ref["loss"]) > TOL:
            return f"loss {r['loss']:.7f} against Hugging Face's {ref['loss']:.7f}"
    covered = {name: torch.zeros_like(g, dtype=torch.bool) for name, g in ref["grads"].items()}
    for r in outcome:
        for name, (slices, value) in r["grads"].items():
            index = tuple(slice(a, b) for a, b in slices)
            expected = ref["grads"][name][index]
            # fp32 tolerance relative to the tensor's scale (Gemma's scaled, tied embedding has large gradients).
            scale = max(1.0, ref["grads"][name].abs().max().item())
            worst = (value - expected).abs().max().item() if value.numel() else 0.0
            if not worst <= GRAD_TOL * scale:
                return f"gradient of {name} differs by {worst:.2e} (largest entry {scale:.2e})"
            covered[name][index] = True
    missing = [name for name, mask in covered.items() if not bool(mask.all())]
    return f"no rank holds all of the gradient of {missing[0]}" if missing else ""


@pytest.fixture(scope="module")
def breadth_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return check_families(causal_lm_families(), tmp_path_factory.mktemp("breadth"))


DENSE = [f for f in causal_lm_families() if family_status(f)[0] == "dense"]


@pytest.mark.slow
@pytest.mark.parametrize("family", DENSE)
def test_dense_family_matches_hugging_face(breadth_report, family):
    entry = breadth_report[family]
    if family in KNOWN_GAPS:
        assert entry["status"] != "ok", f"{family} passes now: remove it from KNOWN_GAPS in tests/model_families.py"
        pytest.xfail(f"{KNOWN_GAPS[family]} ({entry['reason']})")
    assert entry["status"] == "ok", f"{family}: {entry['reason']}"


def test_every_family_has_a_status():
    statuses = {f: family_status(f) for f in causal_lm_families()}
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gpt_neox", "phi"} <= {
        f for f, (kind, _) in statuses.items() if kind == "dense"}
    assert all(reason for kind, reason in statuses.values() if kind != "dense")
    stale = [f for f in KNOWN_GAPS if f in statuses and statuses[f][0] != "dense"]
    assert not stale, f"KNOWN_GAPS lists families that are not dense candidates: {stale}"


def test_mixture_of_experts_run_the_experts_op_or_are_refused_at_compile_time():
    from dimshard.planner.graph.hf import UnsupportedModelError, build_on_meta

    moe = {f: family_status(f)[1] for f in causal_lm_families() if family_status(f)[0] == "moe"}
    assert moe["mixtral"] == moe["qwen3_moe"] == MOE_EXPERTS_OP
    assert moe["jetmoe"] != MOE_EXPERTS_OP  # its experts are a loop over expert modules
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts.*experts interface"):
        build_on_meta(tiny_config("jetmoe"))
    assert build_on_meta(tiny_config("mixtral")).config._experts_implementation == "dimshard"


def write_table(report: dict[str, dict[str, Any]], path: Path) -> None:
    """docs/models.md: one row per causal-LM family with its status and reason."""
    import transformers
    from test_moe_families import FAMILIES as CHECKED_MOE

    labels = {"ok": "supported", "failed": "fails", "experts": "mixture of experts (dimshard's experts op)",
              "moe": "unsupported (mixture of experts)", "other": "not covered"}
    counts = {k: sum(1 for e in report.values() if e["status"] == k) for k in labels}
    lines = [
        "# Model families",
        "",
        f"Generated by `python tests/test_model_breadth.py --write docs/models.md` with transformers "
        f"{transformers.__version__} and torch {torch.__version__}. Every family transformers maps to a causal-LM "
        "class is listed. **supported**: a tiny model of the family traces, compiles under `tp` and `tp_sp` for 2 "
        "ranks, and its loss and gradients on 2 processes equal the Hugging Face model's own (one process; its sdpa "
        f"attention, or eager where it has none) within {TOL:g} (loss) and {GRAD_TOL:g} of each gradient's largest "
        "entry (tests/test_model_breadth.py); and a `save_pretrained` folder of it loads into `train.py`, trains, "
        "merges and exports a folder that `from_pretrained` loads with the trained weights "
        "(tests/test_family_roundtrip.py). Mixture-of-experts families whose experts use transformers' experts "
        "interface run them as dimshard's experts op (docs/design.md, \"Mixture of experts\"); the other "
        "mixture-of-experts families are refused at compile time; the others are not dense decoder-only LMs or need more than dimshard's ops, for the reason given.",
        "",
        f"{counts['ok']} supported, {counts['failed']} failing, {counts['experts']} mixture of experts on dimshard's "
        f"experts op ({sum(1 for f in CHECKED_MOE if report.get(f, {}).get('status') == 'experts')} of them checked "
        f"against Hugging Face), {counts['moe']} mixture of experts refused, {counts['other']} not covered.",
        "",
        "| family | status | reason |",
        "|---|---|---|",
    ]
    labels["checked_experts"] = "supported (mixture of experts)"
    for family in sorted(report):
        entry = report[family]
        reason = KNOWN_GAPS.get(family, "") if entry["status"] == "failed" else ""
        reason = reason or str(entry.get("reason", ""))
        if entry["status"] == "experts" and family in CHECKED_MOE:
            entry = {**entry, "status": "checked_experts"}
            reason = ("tests/test_moe_families.py: ep, tp and auto on 2 and 4 ranks, load-balancing loss on and "
                      "off, equal Hugging Face's")
        elif entry["status"] == "experts":
            reason = ("compiles with dimshard's experts op (transformers' experts interface); not yet checked "
                      "against Hugging Face")
        if entry["status"] == "moe" and "(" in reason:
            reason = ("its experts are a loop over expert modules, not transformers' experts interface ("
                      + reason.split("(", 1)[1].split(")", 1)[0] + ")")
        reason = reason.replace("|", "/").replace("\n", " ")
        lines.append(f"| `{family}` | {labels[entry['status']]} | {reason} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run the checks for every (or the named) family and write the table."""
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", default="docs/models.md", help="where to write the family table")
    parser.add_argument("--families", nargs="*", help="only these model types (default: all)")
    args = parser.parse_args(argv)
    families = args.families or causal_lm_families()
    with tempfile.TemporaryDirectory() as tmp:
        report = check_families(families, Path(tmp))
    write_table(report, Path(args.write))
    for family, entry in sorted(report.items()):
        print(f"{family:28s} {entry['status']:7s} {entry.get('reason', '')[:100]}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())


# --------------------------------------------------------------------------------------------
# The op rules these families need (planner/ops/rules/)
# --------------------------------------------------------------------------------------------


def _annotation(name: str, inputs: list[tuple[int, ...]], outputs: list[tuple[int, ...]], *args: Any,
                **kwargs: Any) -> str:
    from dimshard.planner.ops.annotations import parse_annotation
    from dimshard.planner.ops.registry import OpCall, TensorMeta, get_rule

    metas = [TensorMeta(s, torch.float32) for s in inputs]
    call = OpCall(name, (metas[0], *args) if metas else args, kwargs, metas, [TensorMeta(s, torch.float32)
                                                                              for s in outputs])
    text = get_rule(name)(call)
    parse_annotation(text).bind([len(s) for s in inputs], [len(s) for s in outputs])  # well-formed for the call
    return text


@pytest.mark.parametrize("name, inputs, outputs, args, expected", [
    # LayerNorm with and without weight/bias: the normalised dim stays whole, the rest splits.
    ("torch.nn.functional.layer_norm", [(2, 8, 64), (64,), (64,)], [(2, 8, 64)], ((64,),),
     "d0 d1 n0^, n0^, n0^ -> d0 d1 n0^"),
    ("torch.nn.functional.layer_norm", [(2, 8, 64)], [(2, 8, 64)], ((64,),), "d0 d1 n0^ -> d0 d1 n0^"),
    ("torch.nn.functional.rms_norm", [(2, 8, 4, 16), (16,)], [(2, 8, 4, 16)], ((16,),),
     "d0 d1 d2 n0^, n0^ -> d0 d1 d2 n0^"),  # QK-norm over the head dim
    # Interleaved rotary tables: each frequency repeated twice along the last dim.
    ("torch.repeat_interleave", [(1, 8, 4)], [(1, 8, 8)], (2, -1), "d0 d1 d2 -> d0 d1 (d2 r)"),
    ("torch.Tensor.repeat_interleave", [(2, 8, 4)], [(2, 8, 4)], (1, 1), "d0 d1 d2 -> d0 d1 d2"),
    ("torch.Tensor.repeat", [(2, 4)], [(2, 8)], (1, 2), "x0 x1^ -> x0 x2^"),
    # GPT-2's Conv1D and ALiBi-style batched products: the added input is a summand, the summed dim splits.
    ("torch.addmm", [(96,), (16, 64), (64, 96)], [(16, 96)], (), "+n, m k, k n -> m n"),
    ("torch.baddbmm", [(8, 1, 16), (8, 16, 4), (8, 4, 16)], [(8, 16, 16)], (), "+b 1 n, b m k, b k n -> b m n"),
    # Binary max/min are elementwise (a dim argument makes them reductions).
    ("torch.max", [(2, 8), (2, 8)], [(2, 8)], (), "d0 d1, d0 d1 -> d0 d1"),
    ("torch.Tensor.index_select", [(64, 16), (8,)], [(8, 16)], (0,), "d0^ d1, s^ -> s^ d1"),
    ("torch.scalar_tensor", [], [()], (0.0,), " -> "),  # a 0-d factory (CPM-Ant's fill value)
])
def test_breadth_op_rules(name, inputs, outputs, args, expected):
    assert _annotation(name, inputs, outputs, *args) == expected


def test_zero_dim_tensor_rules():
    # Gemma scales the embedding by a 0-d tensor: cast it, multiply by it.
    assert _annotation("torch.Tensor.to", [()], [()], torch.bfloat16) == "... -> "
    assert _annotation("torch.Tensor.__mul__", [(2, 8, 64), ()], [(2, 8, 64)]) == "d0 d1 d2,  -> d0 d1 d2"
    assert _annotation("torch.Tensor.expand_as", [(1, 64), (8, 64)], [(8, 64)]).endswith("-> x0^ x1")


def test_gemma_style_model_traces_with_scalar_embedding_scale():
    from dimshard.planner.graph.hf import build_on_meta, chunked_causal_lm_forward
    from dimshard.planner.graph.trace import trace

    ids = torch.randint(0, 128, (1, 8))
    graph = trace(build_on_meta(tiny_config("gemma")), {"input_ids": ids, "labels": ids.clone()},
                  forward_fn=chunked_causal_lm_forward())
    assert any(op.name == "dimshard.kernels.attention.attention" for op in graph.ops)


# --------------------------------------------------------------------------------------------
# create_mini_model.py and train.py for other families, from a local folder
# --------------------------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "llama3_128k"


def _create_mini(source: Path, output: Path, **overrides: Any) -> Path:
    """examples/llama3_128k/create_mini_model.py's create_mini_model, called in process."""
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    from create_mini_model import MiniModelArgs, create_mini_model

    return create_mini_model(MiniModelArgs(model_id=str(source), output_id=str(output), **overrides))


@pytest.mark.parametrize("family", ["gemma2", "gpt_neox", "qwen3", "phi"])
def test_create_mini_model_keeps_the_family_and_traces(tmp_path, family):
    from dimshard.planner.graph.hf import build_on_meta, chunked_causal_lm_forward, load_config
    from dimshard.planner.graph.trace import trace

    source = tmp_path / "source"
    tiny_config(family).save_pretrained(source)
    output = _create_mini(source, tmp_path / "mini", num_hidden_layers=1)
    config = load_config(str(output))
    assert config.model_type == family and config.num_hidden_layers == 1
    ids = torch.randint(0, config.vocab_size, (1, 8))
    graph = trace(build_on_meta(config), {"input_ids": ids, "labels": ids.clone()},
                  forward_fn=chunked_causal_lm_forward())
    assert any(op.name == "dimshard.kernels.attention.attention" for op in graph.ops)


@pytest.mark.parametrize("files, needle", [
    ({"config.json": '{"model_type": "gemma2", "hidden_size": '}, "partial or corrupt"),
    ({"config.json": '{"hidden_size": 64}'}, "model_type"),
    ({"config.json": '{"model_type": "llama", "hidden_size": 63, "num_attention_heads": 4}'}, "not a multiple"),
    ({"tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"'}, "tokenizer"),
    ({"tokenizer.json": '{"version": "1.0"}'}, "tokenizer"),
])
def test_create_mini_model_bad_folder_is_one_line_error(tmp_path, files, needle):
    script = EXAMPLE / "create_mini_model.py"
    source = tmp_path / "source"
    tiny_config("gemma2").save_pretrained(source)
    for name, text in files.items():
        (source / name).write_text(text)
    import subprocess

    out = subprocess.run([sys.executable, str(script), "--model_id", str(source), "--output_id", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_train_compiles_another_family_from_a_local_folder(tmp_path):
    import subprocess

    source = tmp_path / "source"
    tiny_config("gemma2").save_pretrained(source)
    output = _create_mini(source, tmp_path / "mini")
    out = subprocess.run([sys.executable, str(EXAMPLE / "train.py"), "--run_mode", "compile", "--model_id", str(output),
                          "--plan_ngpus", "2", "--runtime_ngpus", "2", "--policy", "tp_sp", "--sequence_length", "16",
                          "--compile_dir", str(tmp_path / "compile")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    code = (tmp_path / "compile" / "gencode" / "rank1.py").read_text()
    assert "from dimshard.kernels.attention import attention" in code and "softcap=" in code


def test_breadth_benchmark_runs_on_cpu(tmp_path):
    import json
    import subprocess

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "model_breadth.py"
    out = subprocess.run([sys.executable, str(script), "--device", "cpu", "--tiny", "--seq_len", "32", "--num_layers",
                          "2", "--families", "mistral,gemma2,stablelm", "--compile_dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["family"] for r in records] == ["mistral", "gemma2", "stablelm"]
    assert all("error" not in r and r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0 for r in records), records


# --------------------------------------------------------------------------------------------
# Row-parallel projections with a bias (Starcoder2's o_proj, Jais2's o_proj and down_proj)
# --------------------------------------------------------------------------------------------

# Heads that split over 4 ranks too (TINY's 2 key/value heads do not).
FOUR_WAY_HEADS = {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8}


def _row_split_biased_linears(result: Any) -> list[str]:
    """Biased linears the compiled plan splits along their input features: the bias enters Partial, once."""
    from dimshard.planner.plan.placements import PARTIAL, Shard

    graph, resolved = result.graph, result.resolved
    names = []
    for op in graph.ops:
        if op.name != "torch.nn.functional.linear" or len(op.input_ids()) != 3:
            continue
        [x, weight, bias] = resolved.op_inputs[op.index]
        if weight == (Shard(1),) and bias == (PARTIAL,) and resolved.op_outputs[op.index] == [(PARTIAL,)]:
            names.append(graph.tensors[op.input_ids()[2]].name)
    return names


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("policy", ["tp", "tp_sp"])
@pytest.mark.parametrize("family", ["starcoder2", "jais2"])
def test_tp_row_splits_biased_projections_and_matches_hugging_face(tmp_path, family, policy, ranks):
    """tp (all-reduce after the row split) and tp_sp (reduce-scatter) on 2 and 4 ranks: loss, gradients
    and parameters after one step equal Hugging Face's."""
    from safetensors.torch import save_file

    from dimshard.planner import CompileConfig, compile_model

    reference, ours = _models(family, **({} if ranks == 2 else FOUR_WAY_HEADS))
    # Hugging Face initialises biases to zero, which would hide a bias added twice, or not at all, from the loss.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for (name, mine), theirs in zip(reference.named_parameters(), ours.parameters()):
            if name.endswith(".bias"):
                theirs.copy_(mine.copy_(torch.randn(mine.shape, generator=generator) * 0.5))
    input_ids = torch.randint(0, 128, (BATCH, SEQUENCE), generator=torch.Generator().manual_seed(0))
    config = CompileConfig(plan_ngpus=ranks, policy=policy, loss="chunked_cross_entropy", loss_chunk_size=5)
    result = compile_model(ours, {"input_ids": input_ids, "labels": input_ids.clone()}, tmp_path / "out", config)
    row_split = _row_split_biased_linears(result)
    expected = {"starcoder2": ["o_proj"], "jais2": ["o_proj", "down_proj"]}[family]
    assert sorted({name.split(".")[-2] for name in row_split}) == sorted(expected), row_split
    assert len(row_split) == len(expected) * reference.config.num_hidden_layers, row_split
    src = (tmp_path / "out" / "gencode" / "rank1.py").read_text()
    assert src.count("comm.replicate_to_partial(") == len(row_split)
    assert ("comm.reduce_scatter(" in src) == (policy == "tp_sp")
    save_file({n: p.detach().contiguous() for n, p in ours.named_parameters()}, str(tmp_path / "weights.safetensors"))
    # SGD makes the update proportional to the gradient (a bias summed once per rank would show);
    # AdamW as the trainer's optimizer, with a small first, sign-like step.
    optimizer, lr = ("sgd", 1e-2) if ranks == 2 else ("adamw", 1e-3)
    ref = reference_step(copy.deepcopy(reference), input_ids, optimizer, lr)
    results = run_distributed(rank_step, ranks, str(tmp_path / "out"), str(tmp_path / "weights.safetensors"),
                              input_ids, optimizer, lr)
    assert_matches_reference(results, ref, TOL)
