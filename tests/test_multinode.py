"""Several nodes: two torchrun launches with ``--nnodes 2`` on this machine stand for two nodes.

Each launch is one "node" of one process (gloo, c10d rendezvous on localhost); torchrun gives the
two launches different node ranks (GROUP_RANK), which is how the runtime tells the nodes apart.
Trained across the two nodes, a tensor-parallel plan and a data split log one process's losses;
a launch that splits a mesh axis the plan keeps inside a node stops every rank with one line; a
run stopped on two nodes resumes on one node; node-local checkpoint folders are refused; and the
plan report of Llama-3-8B on 16 and 32 GPUs says which mesh axes cross nodes and what that costs.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from mini_run import prepare_mini_run

from dimshard.runtime.checkpointing.commit import CheckpointError
from dimshard.runtime.node_layout import RankPlace, layout_error

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "llama3_128k"
PROFILES = ROOT / "planner" / "cost" / "hw_profiles"
SEQ = 64


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


def _python(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tokenizer, a packed dataset, a 2-layer mini Llama (tests/mini_run.py) and
    hardware profiles of 1 and 2 GPUs per node."""
    work = tmp_path_factory.mktemp("multinode")
    prepare_mini_run(work, _python, SEQ, max_chars=100000)
    h100 = json.loads((PROFILES / "h100.json").read_text())
    for per_node in (1, 2):
        profile = {**h100, "name": f"h100_{per_node}_per_node", "gpus_per_node": per_node}
        (work / f"{per_node}_per_node.json").write_text(json.dumps(profile))
    return work


def _flags(work: Path, tag: str, *flags: str) -> list[str]:
    return [str(EXAMPLE / "train.py"), "--model_id", str(work / "model"), "--dataset_path", str(work / "data"),
            "--compile_dir", str(work / tag / "compile"), "--checkpoint_dir", str(work / tag / "ckpt"),
            "--dump_dir", str(work / tag / "dump"), "--lr", "2e-3", "--lr_schedule", "constant",
            "--log_interval", "1", "--dtype", "fp32", "--loss_chunk_size", "48", *flags]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(work: Path, tag: str, *flags: str, node1_flags: tuple[str, ...] = (),
               check: bool = True) -> list[tuple[int, str]]:
    """Launch train.py as two nodes of one process each, concurrently; each launch's (status, stderr)."""
    port, logs, procs = _free_port(), [], []
    for node in (0, 1):
        log = work / f"{tag}.node{node}.log"
        logs.append(log)
        with open(log, "w") as f:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                 "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                 "--rdzv-id", tag, *_flags(work, tag, *flags), *(node1_flags if node else ())],
                stdout=f, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=_env()))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [(code, log.read_text()) for code, log in zip(codes, logs)]
    if check and any(code for code, _ in outs):
        raise AssertionError("\n".join(text[-4000:] for _, text in outs))
    return outs


def _losses(work: Path, tag: str) -> list[float]:
    lines = (work / tag / "dump" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if line]


def _close(a: list[float], b: list[float], tolerance: float = 1e-4) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tolerance * abs(y) for x, y in zip(a, b))


SINGLE = ["--plan_ngpus", "1", "--runtime_ngpus", "1", "--policy", "dp", "--micro_batch_size", "4"]
DP_ACROSS = ["--plan_ngpus", "1", "--runtime_ngpus", "2", "--policy", "dp", "--micro_batch_size", "2"]


@pytest.fixture(scope="module")
def reference(workdir) -> list[float]:
    """Six steps of one process (global batch 4)."""
    _python(*_flags(workdir, "single", *SINGLE, "--max_steps", "6", "--checkpoint_dir", ""))
    return _losses(workdir, "single")


@pytest.fixture(scope="module")
def data_split_across_nodes(workdir) -> list[float]:
    """Six steps of one copy per node (plan_ngpus 1, runtime_ngpus 2), checkpointed at step 3."""
    _two_nodes(workdir, "dp_across", *DP_ACROSS, "--max_steps", "6", "--checkpoint_interval", "3")
    return _losses(workdir, "dp_across")


@pytest.mark.slow
def test_two_nodes_train_like_one_process(workdir, reference, data_split_across_nodes):
    assert len(reference) == 6 and reference[-1] < reference[0]
    assert _close(data_split_across_nodes, reference), (data_split_across_nodes, reference)
    # tp's axis crosses the nodes, as a profile of one GPU per node costed it.
    tp = ["--plan_ngpus", "2", "--runtime_ngpus", "2", "--policy", "tp", "--micro_batch_size", "4",
          "--hw_profile", str(workdir / "1_per_node.json"), "--max_steps", "3", "--checkpoint_dir", ""]
    _two_nodes(workdir, "tp_across", *tp)
    nodes = json.loads((workdir / "tp_across" / "compile" / "plan.json").read_text())["nodes"]
    assert nodes == {"hw_profile": "h100_1_per_node", "gpus_per_node": 1, "axes_across_nodes": ["tp"]}
    assert _close(_losses(workdir, "tp_across"), reference[:3]), (_losses(workdir, "tp_across"), reference)


@pytest.mark.slow
def test_a_launch_that_splits_an_axis_kept_in_a_node_stops_every_rank_with_one_line(workdir):
    # Costed for 2 GPUs per node, tp (size 2) stays inside a node; 2 nodes x 1 would split it.
    tp = ["--plan_ngpus", "2", "--runtime_ngpus", "2", "--policy", "tp", "--micro_batch_size", "4",
          "--hw_profile", str(workdir / "2_per_node.json"), "--max_steps", "1", "--checkpoint_dir", ""]
    for code, text in _two_nodes(workdir, "tp_split", *tp, check=False):
        errors = [line for line in text.splitlines() if line.startswith("error: ")]
        assert code != 0 and len(errors) == 1, text[-4000:]
        for needle in ("--nproc_per_node 1 gives 1 GPU per node", "costed for 2 per node", "mesh axis 'tp'",
                       '--hw_profile <a profile JSON with "gpus_per_node": 1>', "launch 2 per node"):
            assert needle in errors[0], (needle, errors[0])
        assert f'File "{ROOT}' not in text, text[-4000:]


@pytest.mark.slow
def test_a_run_stopped_on_two_nodes_resumes_on_one(workdir, reference, data_split_across_nodes):
    step3 = workdir / "dp_across" / "ckpt" / "step_3"
    # One node of two processes: the same plan and world size, so the sharded checkpoint loads as it is.
    _python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            *_flags(workdir, "one_node", *DP_ACROSS, "--max_steps", "6", "--resume_path", str(step3),
                    "--compile_dir", str(workdir / "dp_across" / "compile")))
    assert _losses(workdir, "one_node") == data_split_across_nodes[3:]
    # One process, another data-parallel degree: through the merged checkpoint, as on one node.
    merged = workdir / "merged.safetensors"
    _python(str(ROOT / "tools" / "ckpt_merger.py"), "--ckpt_dir", str(step3), "--output_fname", str(merged))
    _python(*_flags(workdir, "one_process", *SINGLE, "--max_steps", "6", "--resume_path", str(merged),
                    "--compile_dir", str(workdir / "single" / "compile")))
    assert _close(_losses(workdir, "one_process"), data_split_across_nodes[3:]), _losses(workdir, "one_process")


def _shared_check(tmp: str, per_rank_folders: bool, resume_per_rank: bool) -> str:
    from dimshard.runtime.checkpointing.shared_folder import check_shared_checkpoints

    rank = dist.get_rank()
    folder = Path(tmp) / (f"node{rank}" if per_rank_folders else "shared")
    resume = str(Path(tmp) / f"node{rank}") if resume_per_rank else None
    try:
        check_shared_checkpoints(str(folder), resume, rank, dist.get_world_size())
    except CheckpointError as error:
        return str(error)
    return "" if not list(folder.iterdir()) else "probe left behind"


def test_checkpoint_folders_that_nodes_do_not_share_are_refused_on_every_rank(tmp_path):
    assert run_distributed(_shared_check, 2, str(tmp_path), False, False) == ["", ""]
    errors = run_distributed(_shared_check, 2, str(tmp_path), True, False)
    assert all("is not there on" in e and "--checkpoint_dir" in e and "every node shares" in e for e in errors), errors
    errors = run_distributed(_shared_check, 2, str(tmp_path), False, True)
    assert errors[0] == errors[1] and "resume from different checkpoints" in errors[0], errors


def _places(nodes: list[str], per_node: int, fingerprint: str = "f") -> list[RankPlace]:
    return [RankPlace(node, "host", per_node, fingerprint) for node in nodes]


def _plan(shape: dict[str, int], axis_groups: dict, across: list[str], per_node: int = 8) -> dict:
    return {"plan_ngpus": math.prod(shape.values()),
            "mesh": {"axis_names": list(shape), "shape": list(shape.values())}, "axis_groups": axis_groups,
            "nodes": {"hw_profile": "h100", "gpus_per_node": per_node, "axes_across_nodes": across}}


def test_layout_error_names_what_to_change():
    tp4 = _plan({"tp": 4}, {"tp": [[0, 1, 2, 3]]}, [])
    assert layout_error(tp4, _places(["node 0"] * 4 + ["node 1"] * 4, 4)) == ""  # two copies, one per node
    error = layout_error(tp4, _places(["node 0", "node 0", "node 1", "node 1"], 2))
    assert error.startswith("--nproc_per_node 2 gives 2 GPUs per node, but the plan was costed for 8 per node"), error
    # Launched as costed, but copies of 3 straddle nodes of 4.
    tp3 = _plan({"tp": 3}, {"tp": [[0, 1, 2]]}, [], per_node=4)
    error = layout_error(tp3, _places(["node 0"] * 4 + ["node 1"] * 4 + ["node 2"] * 4, 4))
    assert "ranks [3, 4, 5]" in error and "--plan_ngpus that divides 4" in error, error
    # An axis the plan lets cross nodes may; an older plan.json without `nodes` is not checked.
    assert layout_error(_plan({"tp": 4}, {"tp": [[0, 1, 2, 3]]}, ["tp"]), _places(["node 0", "node 1"] * 2, 2)) == ""
    assert layout_error({k: v for k, v in tp4.items() if k != "nodes"}, _places(["node 0", "node 1"] * 2, 2)) == ""
    error = layout_error(tp4, _places(["node 0"] * 3 + ["node 1"], 3))
    assert "different numbers of processes" in error and "--nproc_per_node" in error, error
    places = _places(["node 0"] * 4 + ["node 1"] * 4, 4)
    places[5] = RankPlace("node 1", "host", 4, "stale")
    assert "another compile output" in layout_error(tp4, places) and "--compile_dir" in layout_error(tp4, places)


@pytest.mark.slow
@pytest.mark.parametrize("ngpus, crossing", [(16, ["tp"]), (32, ["tp", "batch"])])
def test_plan_report_of_llama3_8b_says_which_axes_cross_nodes(tmp_path, ngpus, crossing):
    from dimshard.planner import CompileConfig, compile_model
    from dimshard.planner.graph.hf import build_on_meta, load_config

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text((EXAMPLE / "configs" / "llama3_8b.json").read_text())
    model = build_on_meta(load_config(str(tmp_path / "model")))
    # tp_batch's mesh is tp 2 x batch ngpus/2: batch groups are consecutive ranks, tp groups stride ngpus/2.
    ids = torch.zeros(ngpus // 2, 256, dtype=torch.long)
    inputs = {"input_ids": ids, "labels": ids.clone()}
    config = CompileConfig(plan_ngpus=ngpus, policy="tp_batch", loss="chunked_cross_entropy", hw_profile="h100",
                           param_dtype=torch.bfloat16, fused_kernels=True, recompute="layer")
    compile_model(model, inputs, tmp_path / "out", config)
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["nodes"] == {"hw_profile": "h100", "gpus_per_node": 8, "axes_across_nodes": crossing}
    report = (tmp_path / "out" / "plan_report.md").read_text()
    section = report[report.index("## Nodes"):]
    section = section[:section.index("\n## ")]
    assert f"{ngpus} GPUs ({ngpus} per copy) on {ngpus // 8} nodes of 8" in section, section
    rows = {line.split(" | ")[0].strip("| "): line for line in section.splitlines() if line.startswith("| ")}
    assert "**2 nodes**" in rows["tp"] and ("**2 nodes**" in rows["batch"]) == ("batch" in crossing), section
    # Crossing nodes costs time: the step is dearer than on one node of the same size.
    assert "so crossing nodes costs" in section and "inside one node" in section, section
