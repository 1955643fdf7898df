"""The trainer on GPUs over NCCL (skipped without CUDA): the CUDA paths of the reducer, the ZeRO
optimizer (foreach AdamW, all_gather_into_tensor), bf16 with fp32 masters, checkpoints with CUDA
RNG state, and resuming from a merged file under another layout. Uses 2 GPUs when there are,
else 1 (then without the data-parallel cases).

The pytest test launches this file under torchrun; ``_worker`` is what each rank runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS = 4


def _worker(out_dir: str) -> None:
    from test_trainer_toy import RowsDataset, ToyModule, full_state, token_rows, toy_plan

    from dimshard.runtime.checkpointing.merged import merge_checkpoint, save_merged
    from dimshard.runtime.distributed import init_parallel
    from dimshard.runtime.training.config import TrainConfig
    from dimshard.runtime.training.loop import train

    out = Path(out_dir)
    rows = RowsDataset(token_rows())
    results: dict[str, dict] = {}

    def run(name: str, config: TrainConfig, seed: int = 0) -> None:
        config = dataclasses.replace(config, dump_dir=str(out / name))  # a fresh run refuses another's metrics
        plan = toy_plan(config.plan_ngpus, config.micro_batch_size)
        ctx = init_parallel(plan)
        assert ctx.device.type == "cuda"
        module = ToyModule(plan, ctx)
        module.load_full_state_dict(full_state(seed))
        result = train(config, module, ctx, rows, plan)
        dtypes = sorted({str(lp.param.dtype) for lp in module.local_parameters()})
        results[name] = {"start": result.start_step, "losses": [r["loss"] for r in result.records],
                         "norms": [r["grad_norm"] for r in result.records], "dtypes": dtypes,
                         "peak_mem_gb": result.records[-1]["peak_mem_gb"]}

    world = int(os.environ["WORLD_SIZE"])
    base = TrainConfig(runtime_ngpus=world, micro_batch_size=2, max_steps=STEPS, lr=1e-2, warmup_steps=1,
                       lr_schedule="constant", weight_decay=0.1, clip_grad_norm=1.0, log_interval=1,
                       dump_dir=str(out / "dump"), checkpoint_dir="")
    run("tp_fp32", dataclasses.replace(base, plan_ngpus=world, grad_accumulation_steps=2, dtype="fp32"))
    if world == 2:
        run("dp_fp32", dataclasses.replace(base, plan_ngpus=1, dtype="fp32"))
    bf16 = dataclasses.replace(base, plan_ngpus=world, micro_batch_size=4, dtype="bf16",
                               checkpoint_dir=str(out / "ckpt"), checkpoint_interval=2, keep_last_checkpoints=3)
    run("tp_bf16", bf16)
    run("tp_bf16_resumed", dataclasses.replace(bf16, resume_path=str(out / "ckpt" / "step_2"),
                                                checkpoint_dir=str(out / "ckpt_resumed")), seed=7)
    if torch.distributed.get_rank() == 0:
        tensors, metadata = merge_checkpoint(out / "ckpt" / "step_2", progress=False)
        save_merged(out / "merged.safetensors", tensors, metadata)
    torch.distributed.barrier()
    run("dp_bf16_from_merged", dataclasses.replace(bf16, plan_ngpus=1, micro_batch_size=4 // world, checkpoint_dir="",
                                                    resume_path=str(out / "merged.safetensors")), seed=7)
    if torch.distributed.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpus_match_reference_and_resume(tmp_path):
    from test_trainer_toy import reference_run, token_rows

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    world = min(2, torch.cuda.device_count())
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                    __file__, str(tmp_path)], check=True, timeout=600, env=env)
    results = json.loads((tmp_path / "results.json").read_text())
    losses, norms, *_ = reference_run(token_rows(), steps=STEPS, global_batch=4, lr=1e-2, warmup_steps=1,
                                      weight_decay=0.1, clip=1.0)
    for name in ("tp_fp32", "dp_fp32") if world == 2 else ("tp_fp32",):
        assert results[name]["losses"] == pytest.approx(losses, abs=1e-4), name
        assert results[name]["norms"] == pytest.approx(norms, rel=1e-4), name
        assert results[name]["dtypes"] == ["torch.float32"]
    bf16 = results["tp_bf16"]
    assert bf16["dtypes"] == ["torch.bfloat16"]
    assert bf16["losses"] == pytest.approx(losses, abs=5e-2)
    resumed = results["tp_bf16_resumed"]
    assert resumed["start"] == 2 and resumed["losses"] == bf16["losses"][2:]
    merged = results["dp_bf16_from_merged"]
    assert merged["start"] == 2 and merged["losses"] == pytest.approx(bf16["losses"][2:], abs=2e-2)


if __name__ == "__main__":
    _worker(sys.argv[1])
