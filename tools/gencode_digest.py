"""Digest of what the planner writes for reference models, to prove a refactor changes no output.

    python tools/gencode_digest.py --output before.json            # record
    python tools/gencode_digest.py --check before.json             # compare; exit 1 on any change

Compiles the demo's mini Llama (2-rank ``tp``, as ``examples/llama3_128k/demo.py`` does) and the
Llama-3-8B config under every built-in policy (``dp`` on one GPU at 8K tokens, ``tp`` and
``tp_sp`` on 8 GPUs at 128K, ``tp_batch`` on 8 GPUs with 4 x 32K) and ``auto`` (8 GPUs at 128K,
and the one-GPU offload plan at 128K), and records the SHA-256 of every generated file (``gencode/rank*.py``,
``plan.json``, ``plan_report.md``) or the error a case raises. Budgets and hardware profiles are
given explicitly so the digest does not depend on the machine it runs on. Takes a few minutes on
two cores (the 8B auto searches dominate).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from dimshard.cli import parse_dataclass_args

ROOT = Path(__file__).resolve().parent.parent
CONFIG_8B = ROOT / "examples" / "llama3_128k" / "configs" / "llama3_8b.json"
# The demo's mini model (examples/llama3_128k/demo.py passes these to create_mini_model.py).
MINI = {"num_hidden_layers": 4, "hidden_size": 128, "intermediate_size": 384, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 2048}


@dataclass
class DigestArgs:
    output: str = field(default="", metadata={"help": "write the digest (JSON) to this file"})
    check: str = field(default="", metadata={"help": "compare with this earlier digest; exit 1 if anything differs"})
    only: str = field(default="", metadata={"help": "run only the cases whose name contains this text"})


def _cases() -> list[tuple[str, dict, int, dict]]:
    """(name, config overrides, batch x sequence, CompileConfig keywords) for every reference compile."""
    cases = [("demo_tp2", MINI, (1, 256), dict(plan_ngpus=2, policy="tp", loss_chunk_size=128))]
    gpu = dict(param_dtype=torch.bfloat16, fused_kernels=True, hw_profile="h100", memory_budget_gb=80.0)
    cases.append(("8b_8k_1gpu_dp", {}, (1, 8192), dict(plan_ngpus=1, policy="dp", recompute="layer", **gpu)))
    for policy in ("tp", "tp_sp"):
        cases.append((f"8b_128k_8gpu_{policy}", {}, (1, 131072), dict(plan_ngpus=8, policy=policy, recompute="layer",
                                                                       **gpu)))
    # tp_batch splits the batch over one mesh axis: four sequences for its 4 x 2 mesh.
    cases.append(("8b_32k_8gpu_tp_batch", {}, (4, 32768), dict(plan_ngpus=8, policy="tp_batch", recompute="layer",
                                                                **gpu)))
    cases.append(("8b_128k_8gpu_auto", {}, (1, 131072),
                  dict(plan_ngpus=8, policy="auto", recompute="auto", policy_options={"host_memory_budget_gb": 1000},
                       **gpu)))
    cases.append(("8b_128k_1gpu_auto_offload", {}, (1, 131072),
                  dict(plan_ngpus=1, policy="auto", recompute="auto", policy_options={"host_memory_budget_gb": 130},
                       **gpu)))
    return cases


def _compile(work: Path, overrides: dict, shape: tuple[int, int], keywords: dict) -> dict[str, str]:
    from dimshard.planner import CompileConfig, compile_model
    from dimshard.planner.graph.hf import build_on_meta, load_config

    folder = work / "model"
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads(CONFIG_8B.read_text())
    (folder / "config.json").write_text(json.dumps({**config, **overrides}))
    model = build_on_meta(load_config(str(folder)))
    ids = torch.zeros(*shape, dtype=torch.long)
    inputs = {"input_ids": ids, "labels": ids.clone()}
    config = CompileConfig(loss="chunked_cross_entropy", **keywords).for_model(model, inputs)
    out = work / "out"
    try:
        compile_model(model, inputs, out, config)
    except Exception as error:  # the error a case raises is part of the behaviour under test
        return {"error": f"{type(error).__name__}: {error}"}
    files = sorted([*out.glob("gencode/*.py"), out / "plan.json", out / "plan_report.md"])
    return {str(f.relative_to(out)): hashlib.sha256(_stable(f).encode()).hexdigest() for f in files if f.is_file()}


def _stable(path: Path) -> str:
    """The file's text without what differs between two runs of the same compile (the search's time)."""
    return re.sub(r"Searched in [0-9.]+ s", "Searched in <seconds> s", path.read_text())


def main(argv: list[str] | None = None) -> int:
    """Compile every case and write or check the digest; returns 1 when ``--check`` finds a change."""
    args = parse_dataclass_args(DigestArgs, argv, description=__doc__.split("\n\n")[0])
    digest = {}
    cases = [c for c in _cases() if args.only in c[0]]
    for name, overrides, shape, keywords in tqdm(cases, desc="compiling", unit="case"):
        # A fixed folder: the model folder's path is part of the config and so of plan.json's digests.
        work = Path(tempfile.gettempdir()) / "dimshard-gencode-digest" / name
        shutil.rmtree(work, ignore_errors=True)
        try:
            digest[name] = _compile(work, overrides, shape, keywords)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if args.output:
        Path(args.output).write_text(json.dumps(digest, indent=1, sort_keys=True) + "\n")
    if not args.check:
        return 0
    before = json.loads(Path(args.check).read_text())
    changed = [f"{case}/{f}" for case in digest for f in sorted(set(digest[case]) | set(before.get(case, {})))
               if digest[case].get(f) != before.get(case, {}).get(f)]
    for item in changed:
        print(f"changed: {item}")
    print(f"{len(digest)} cases, {sum(len(d) for d in digest.values())} files: "
          f"{'identical' if not changed else f'{len(changed)} changed'}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
