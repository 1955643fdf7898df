"""tools/ckpt_merger.py: merged state equals the single-process model; merged files resume under
other layouts; Hugging Face export loads with from_pretrained."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from safetensors import safe_open
from test_trainer_toy import SEQ, make_module, reference_run, save_dataset, token_rows, toy_plan

from dimshard.runtime.checkpointing.merged import read_merged_metadata
from dimshard.runtime.checkpointing.sharded import save_checkpoint
from dimshard.runtime.data.prepared import load_token_dataset
from dimshard.runtime.distributed import init_parallel
from dimshard.runtime.module import ParallelModule
from dimshard.runtime.optimizer.zero_adamw import ZeroAdamW
from dimshard.runtime.training.config import TrainConfig
from dimshard.runtime.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
MERGER = ROOT / "tools" / "ckpt_merger.py"
LR, WARMUP, WD = 1e-2, 2, 0.1


def _merger():
    spec = importlib.util.spec_from_file_location("ckpt_merger", MERGER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(config: TrainConfig, dataset_path: str) -> list[dict]:
    plan = toy_plan(config.plan_ngpus, config.micro_batch_size)
    ctx, module = make_module(plan, seed=5 if config.resume_path else 0)  # resumed weights must not matter
    return train(config, module, ctx, load_token_dataset(dataset_path, SEQ), plan).records


def _config(tmp_path, name: str, **overrides) -> TrainConfig:
    values = {"micro_batch_size": 2, "max_steps": 3, "lr": LR, "warmup_steps": WARMUP, "lr_schedule": "constant",
              "weight_decay": WD, "clip_grad_norm": 1.0, "dtype": "fp32", "dump_dir": str(tmp_path / name / "dump"),
              "checkpoint_dir": str(tmp_path / name / "ckpt")}
    values.update(overrides)
    return TrainConfig(**values)


def test_merged_state_equals_reference_and_resumes_under_other_layouts(tmp_path):
    rows = token_rows()
    dataset = save_dataset(tmp_path / "data", rows)
    kwargs = {"global_batch": 4, "lr": LR, "warmup_steps": WARMUP, "weight_decay": WD, "clip": 1.0}
    losses, norms, *_ = reference_run(rows, steps=4, **kwargs)
    _, _, state, reference_optimizer, params = reference_run(rows, steps=3, **kwargs)

    # 4 processes: plan_ngpus 2 x 2 data-parallel copies with ZeRO.
    config = _config(tmp_path, "run", plan_ngpus=2, runtime_ngpus=4)
    run_distributed(_train, 4, config, dataset, timeout_s=90)
    merged = tmp_path / "merged.safetensors"
    assert _merger().main(["--ckpt_dir", config.checkpoint_dir, "--output_fname", str(merged), "--no_progress"]) == 0

    metadata = read_merged_metadata(merged)
    assert metadata["step"] == 3 and metadata["optimizer"]["step_count"] == 3
    with safe_open(str(merged), framework="pt") as f:
        keys = set(f.keys())
        for name, value in state.items():
            adam = reference_optimizer.state[params[name]]
            assert (f.get_tensor(name) - value).abs().max() <= 1e-5, name
            assert (f.get_tensor(f"optimizer.exp_avg.{name}") - adam["exp_avg"]).abs().max() <= 1e-5, name
            assert (f.get_tensor(f"optimizer.exp_avg_sq.{name}") - adam["exp_avg_sq"]).abs().max() <= 1e-6, name
    assert not any(k.startswith("master.") for k in keys)  # fp32 parameters are their own masters
    assert len(keys) == 3 * len(state)

    # Resume the merged file with 2 processes (plan_ngpus 1, 2 copies) and with 1 process.
    for world_size, plan_ngpus, name in ((2, 1, "two"), (1, 1, "one")):
        resumed = _config(tmp_path, name, plan_ngpus=plan_ngpus, runtime_ngpus=world_size, max_steps=4,
                          micro_batch_size=4 // world_size, resume_path=str(merged))
        if world_size == 1:
            records = _train(resumed, dataset)
        else:
            records = run_distributed(_train, world_size, resumed, dataset, timeout_s=60)[0]
        assert [r["step"] for r in records] == [4]
        assert records[0]["loss"] == pytest.approx(losses[3], abs=1e-5)
        assert records[0]["grad_norm"] == pytest.approx(norms[3], rel=1e-5)


def _save_llama_shards(config_dict: dict, state: dict[str, torch.Tensor], checkpoint_dir: str) -> None:
    """Shard an HF model's weights (2-D split by rows over 2 unit ranks) and checkpoint them in bf16."""
    parameters = []
    for name, value in state.items():
        shape = list(value.shape)
        if value.dim() == 2:
            half = shape[0] // 2
            shards = [{"slices": [[u * half, (u + 1) * half], [0, shape[1]]], "unit_ranks": [u]} for u in (0, 1)]
        else:
            shards = [{"slices": [[0, shape[0]]], "unit_ranks": [0, 1]}]
        parameters.append({"name": name, "full_shape": shape, "dtype": "float32", "shards": shards})
    plan = {"format_version": 1, "plan_ngpus": 2, "mesh": {"axis_names": ["tp"], "shape": [2]},
            "unit_rank_coords": [[0], [1]], "axis_groups": {"tp": [[0, 1]]}, "parameters": parameters,
            "fingerprint": "llama-test"}
    ctx = init_parallel(plan)
    module = ParallelModule(ctx)
    for index, p in enumerate(parameters):
        shard = next(s for s in p["shards"] if ctx.unit_rank in s["unit_ranks"])
        module.declare_parameter(f"p{index}", p["name"], tuple(p["full_shape"]),
                                 tuple(tuple(s) for s in shard["slices"]), torch.float32, tuple(shard["unit_ranks"]))
    module.load_full_state_dict(state)
    optimizer = ZeroAdamW(module.local_parameters(), ctx, param_dtype=torch.bfloat16)
    save_checkpoint(checkpoint_dir, 0, local_params=module.local_parameters(), optimizer=optimizer, ctx=ctx,
                    plan=plan, trainer_state={}, model_config=config_dict)


@pytest.mark.smoke
def test_hf_export_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run_distributed(_save_llama_shards, 2, config.to_dict(), state, str(tmp_path / "ckpt"), timeout_s=60)

    merger = _merger()
    merged, hf_dir = tmp_path / "merged.safetensors", tmp_path / "hf"
    assert merger.main(["--ckpt_dir", str(tmp_path / "ckpt"), "--output_fname", str(merged),
                        "--hf_output_dir", str(hf_dir), "--no_progress"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(str(hf_dir))
    for name, value in loaded.state_dict().items():
        assert torch.equal(value.float(), state[name].to(torch.bfloat16).float()), name
    with safe_open(str(merged), framework="pt") as f:
        for name, value in state.items():  # fp32 masters kept the unrounded values
            assert torch.equal(f.get_tensor(f"master.{name}"), value), name
            assert f.get_tensor(name).dtype == torch.bfloat16

    # --model_config wins over the recorded config; a checkpoint without one needs the flag.
    (tmp_path / "ckpt" / "step_0" / "config.json").unlink()
    assert merger.main(["--ckpt_dir", str(tmp_path / "ckpt"), "--hf_output_dir", str(tmp_path / "hf2"),
                        "--no_progress"]) == 1
    assert merger.main(["--ckpt_dir", str(tmp_path / "ckpt"), "--hf_output_dir", str(tmp_path / "hf2"),
                        "--model_config", str(hf_dir), "--no_progress"]) == 0
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf2")).config.hidden_size == 16


def test_bad_checkpoint_files_give_one_line_errors(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    state = {k: v.detach().clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
    run_distributed(_save_llama_shards, 2, config.to_dict(), state, str(tmp_path / "ckpt"), timeout_s=60)
    good = tmp_path / "ckpt" / "step_0"
    merger = _merger()

    def damaged(name: str, file: str, change) -> Path:
        folder = tmp_path / name / "step_0"
        shutil.copytree(good, folder)
        (folder / file).write_bytes(change((folder / file).read_bytes()))
        return folder

    def error_line(argv: list[str]) -> str:
        capsys.readouterr()
        assert merger.main([*argv, "--no_progress"]) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, errors
        return errors[0]

    out = ["--output_fname", str(tmp_path / "merged.safetensors")]
    cases = {
        "trainer_state.json": damaged("state", "trainer_state.json", lambda b: b[:30]),
        "rank1.json": damaged("rank_json", "rank1.json", lambda b: b'{"file": {}}'),
        "rank0.safetensors": damaged("shard", "rank0.safetensors", lambda b: b[:-20]),
        "plan.json": damaged("plan", "plan.json", lambda b: b"\x00\x01"),
    }
    for needle, folder in cases.items():
        flags = ["--hf_output_dir", str(tmp_path / "hf")] if needle == "plan.json" else out
        line = error_line(["--ckpt_dir", str(folder), *flags])
        assert needle in line or "rank1" in line, (needle, line)
    bad_config = tmp_path / "bad_config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text('{"model_type": ')
    line = error_line(["--ckpt_dir", str(good), "--hf_output_dir", str(tmp_path / "hf"),
                       "--model_config", str(bad_config)])
    assert "config.json" in line and "--model_config" in line
    # Another family's config: the trained parameters have no place in its checkpoint.
    from transformers import GPTNeoXConfig

    other = tmp_path / "other_config"
    GPTNeoXConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2).save_pretrained(other)
    line = error_line(["--ckpt_dir", str(good), "--hf_output_dir", str(tmp_path / "hf"), "--model_config", str(other)])
    assert "GPTNeoXForCausalLM" in line and "model.embed_tokens.weight" in line and "--model_config" in line


def test_cli_help_lists_every_flag():
    completed = subprocess.run([sys.executable, str(MERGER), "--help"], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0
    for flag in ("--ckpt_dir", "--output_fname", "--hf_output_dir", "--model_config", "--params_only"):
        assert flag in completed.stdout

