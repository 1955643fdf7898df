"""End to end through examples/llama3_128k/train.py under torchrun (gloo, CPU).

The same global batch trained under different layouts logs the same losses; a stopped run
resumes exactly; a merged checkpoint resumes under another plan and exports to Hugging Face (a
text-generation pipeline runs on the export); bad inputs and bad files fail with one line that
says what to change; runs keep their outputs under ./runs/<name>/ and never touch another's;
``--resume_path auto`` with nothing to resume is a fresh run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mini_run import prepare_mini_run

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "llama3_128k"
SEQ = 64


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


def _python(*args: str, check: bool = True, timeout: int = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=_env(),
                         timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tokenizer, a packed dataset and a 2-layer mini Llama, built offline."""
    work = tmp_path_factory.mktemp("e2e")
    prepare_mini_run(work, _python, SEQ, max_chars=200000)
    return work


def _train(work: Path, tag: str, nproc: int, *flags: str, check: bool = True) -> subprocess.CompletedProcess:
    args = ["--model_id", str(work / "model"), "--dataset_path", str(work / "data"),
            "--compile_dir", str(work / tag / "compile"), "--checkpoint_dir", str(work / tag / "ckpt"),
            "--dump_dir", str(work / tag / "dump"), "--lr", "2e-3", "--lr_schedule", "constant",
            "--log_interval", "1", "--dtype", "fp32", "--loss_chunk_size", "48", *flags]
    if nproc == 1:
        return _python(str(EXAMPLE / "train.py"), *args, check=check)
    return _python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   str(EXAMPLE / "train.py"), *args, check=check)


def _losses(work: Path, tag: str) -> list[float]:
    lines = (work / tag / "dump" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if line]


LAYOUTS = {
    # tag: (processes, flags) — all with a global batch of 4 sequences per step
    "single": (1, ["--plan_ngpus", "1", "--runtime_ngpus", "1", "--policy", "dp", "--micro_batch_size", "4"]),
    "dp2": (2, ["--plan_ngpus", "1", "--runtime_ngpus", "2", "--policy", "dp", "--micro_batch_size", "2"]),
    "tp2": (2, ["--plan_ngpus", "2", "--runtime_ngpus", "2", "--policy", "tp", "--micro_batch_size", "4"]),
    "tp2x2_zero": (4, ["--plan_ngpus", "2", "--runtime_ngpus", "4", "--policy", "tp_sp", "--micro_batch_size", "2"]),
    # The planner's own choice of mesh, splits and recompute must train exactly the same.
    "auto2": (2, ["--plan_ngpus", "2", "--runtime_ngpus", "2", "--policy", "auto", "--micro_batch_size", "4",
                  "--hw_profile", "h100"]),
    "accumulate": (1, ["--plan_ngpus", "1", "--runtime_ngpus", "1", "--policy", "dp", "--micro_batch_size", "2",
                       "--grad_accumulation_steps", "2"]),
}


def test_layouts_log_the_same_losses(workdir):
    results = {}
    for tag, (nproc, flags) in LAYOUTS.items():
        _train(workdir, tag, nproc, *flags, "--max_steps", "5", "--checkpoint_dir", "")
        results[tag] = _losses(workdir, tag)
    reference = results["single"]
    assert len(reference) == 5 and reference[-1] < reference[0]
    # Every compile explains its plan; auto's report names the search and its runner-ups.
    for tag in LAYOUTS:
        assert (workdir / tag / "compile" / "plan_report.md").is_file(), tag
    report = (workdir / "auto2" / "compile" / "plan_report.md").read_text()
    assert "policy `auto`" in report and "## Runner-up plans" in report
    for tag, losses in results.items():
        for a, b in zip(losses, reference):
            assert abs(a - b) <= 1e-4 * abs(b), (tag, losses, reference)


@pytest.mark.smoke
def test_resume_merge_export(workdir):
    tp = LAYOUTS["tp2"][1]
    _train(workdir, "full", 2, *tp, "--max_steps", "6")
    full = _losses(workdir, "full")
    # Stopped after the step-3 checkpoint, then resumed from it: the same later losses, exactly.
    _train(workdir, "stopped", 2, *tp, "--max_steps", "3", "--checkpoint_interval", "3")
    _train(workdir, "stopped", 2, *tp, "--max_steps", "6", "--resume_path", "auto")
    resumed = _losses(workdir, "stopped")
    assert resumed[:3] == full[:3] and resumed[3:] == full[3:], (resumed, full)

    # A truncated shard is refused with a message naming the file.
    step3 = workdir / "stopped" / "ckpt" / "step_3"
    shard = step3 / "rank1.safetensors"
    broken = workdir / "broken"
    (broken / "step_3").mkdir(parents=True)
    for f in step3.iterdir():
        (broken / "step_3" / f.name).write_bytes(f.read_bytes())
    (broken / "step_3" / "rank1.safetensors").write_bytes(shard.read_bytes()[:-100])
    out = _train(workdir, "broken_run", 2, *tp, "--max_steps", "6", "--resume_path", str(broken / "step_3"),
                 check=False)
    assert out.returncode != 0 and "rank1.safetensors" in out.stderr

    # Merge step 3, resume under another plan (one process, dp): the next loss matches.
    merged = workdir / "merged.safetensors"
    _python(str(ROOT / "tools" / "ckpt_merger.py"), "--ckpt_dir", str(step3), "--output_fname", str(merged),
            "--hf_output_dir", str(workdir / "hf"), "--model_config", str(workdir / "model"))
    _train(workdir, "from_merged", 1, *LAYOUTS["single"][1], "--max_steps", "4", "--resume_path", str(merged))
    assert abs(_losses(workdir, "from_merged")[0] - full[3]) <= 1e-5 * abs(full[3])

    # The Hugging Face export is the trained model: same loss on step 4's batch as the parallel run.
    from transformers import AutoModelForCausalLM

    from dimshard.runtime.data.prepared import MicroBatchStream, load_token_dataset

    stream = MicroBatchStream(load_token_dataset(str(workdir / "data")), micro_batch_size=4, dp_size=1,
                              copy_index=0, seed=0)
    for _ in range(3):
        next(stream)
    batch = next(stream)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(workdir / "hf", dtype=torch.float32)
    with torch.no_grad():
        loss = hf(input_ids=batch, labels=batch).loss.item()
    assert abs(loss - full[3]) <= 1e-4 * abs(full[3]), (loss, full[3])

    # The export carries the source folder's tokenizer and generation config: a pipeline runs on it.
    from transformers import pipeline

    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (workdir / "hf" / name).is_file(), name
    generate = pipeline("text-generation", model=str(workdir / "hf"), device="cpu")
    text = generate("def main():", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("def main():") and len(text) > len("def main():"), text


def test_bad_inputs_fail_before_training_and_say_what_to_change(workdir):
    base = ["--model_id", str(workdir / "model"), "--dataset_path", str(workdir / "data")]
    out = _python(str(EXAMPLE / "train.py"), *base, "--plan_ngpus", "2", "--runtime_ngpus", "3", check=False)
    assert out.returncode == 2 and "--runtime_ngpus (3) must be a positive multiple of --plan_ngpus (2)" in out.stderr

    out = _python(str(EXAMPLE / "train.py"), "--run_mode", "compile", *base, "--plan_ngpus", "2",
                  "--runtime_ngpus", "2", "--policy", "tp_sp", "--sequence_length", "63",
                  "--compile_dir", str(workdir / "odd"), check=False)
    assert out.returncode == 2 and "evenly" in out.stderr and "63" in out.stderr, out.stderr

    out = _python(str(EXAMPLE / "train.py"), "--model_id", str(workdir / "model"), "--dataset_path",
                  str(workdir / "no_such_data"), check=False)
    assert out.returncode == 2 and "does not exist" in out.stderr and "bookcorpus.py" in out.stderr

    # A compile output made for another plan is detected as stale and replaced before training.
    flags = LAYOUTS["single"][1]
    _python(str(EXAMPLE / "train.py"), "--run_mode", "compile", *base, "--plan_ngpus", "1", "--runtime_ngpus", "1",
            "--policy", "dp", "--micro_batch_size", "2", "--compile_dir", str(workdir / "stale" / "compile"))
    out = _train(workdir, "stale", 1, *flags, "--max_steps", "1", "--checkpoint_dir", "")
    assert "is stale" in out.stdout and "compiling" in out.stdout, out.stdout


def _one_line_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    """The process failed with status 2 and one ``error:`` line holding every needle, no traceback."""
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(errors) == 1, out.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_runs_keep_their_own_folders_and_resume_auto_without_a_checkpoint_is_a_fresh_run(workdir):
    cwd = workdir / "cwd"
    cwd.mkdir()
    base = [str(EXAMPLE / "train.py"), "--model_id", str(workdir / "model"), "--dataset_path", str(workdir / "data"),
            "--lr", "2e-3", "--lr_schedule", "constant", "--dtype", "fp32", "--loss_chunk_size", "48",
            "--plan_ngpus", "1", "--runtime_ngpus", "1", "--policy", "dp", "--micro_batch_size", "4",
            "--max_steps", "2"]
    _python(*base, "--name", "plain", cwd=cwd)
    # What a preemptible job always passes: with nothing to resume it is the same fresh run, weights included.
    _python(*base, "--name", "auto", "--resume_path", "auto", cwd=cwd)
    runs = cwd / "runs"
    plain, auto = _metrics(runs / "plain" / "metrics.jsonl"), _metrics(runs / "auto" / "metrics.jsonl")
    assert [r["loss"] for r in auto] == [r["loss"] for r in plain] and all(math.isfinite(r["loss"]) for r in auto)
    for name in ("plain", "auto"):
        assert (runs / name / "compile" / "plan.json").is_file()
        assert (runs / name / "checkpoints" / "step_2" / "trainer_state.json").is_file()

    # A fresh run under a name that has checkpoints refuses, and names the ways out; nothing changes.
    out = _python(*base, "--name", "plain", check=False, cwd=cwd)
    _one_line_error(out, "--resume_path auto", "--name", "--checkpoint_dir")
    assert _metrics(runs / "plain" / "metrics.jsonl") == plain
    # Resumed, it appends to its own metrics.
    _python(*base, "--name", "plain", "--resume_path", "auto", "--max_steps", "3", cwd=cwd)
    resumed = _metrics(runs / "plain" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3] and resumed[:2] == plain

    # A checkpoint whose trainer_state.json was cut short, and a truncated merged file: one line each.
    bad = cwd / "bad" / "step_3"
    shutil.copytree(runs / "plain" / "checkpoints" / "step_3", bad)
    state = bad / "trainer_state.json"
    state.write_text(state.read_text()[:40])
    reuse = ["--compile_dir", str(runs / "plain" / "compile"), "--max_steps", "4"]
    out = _python(*base, *reuse, "--name", "bad_state", "--resume_path", str(bad), check=False, cwd=cwd)
    _one_line_error(out, "trainer_state.json", "another step_<N>")
    merged = cwd / "merged.safetensors"
    _python(str(ROOT / "tools" / "ckpt_merger.py"), "--ckpt_dir", str(runs / "plain" / "checkpoints"),
            "--output_fname", str(merged), "--no_progress")
    merged.write_bytes(merged.read_bytes()[:1000])
    out = _python(*base, *reuse, "--name", "bad_merged", "--resume_path", str(merged), check=False, cwd=cwd)
    _one_line_error(out, "merged.safetensors", "truncated or corrupt")


def test_bad_model_and_dataset_files_give_one_line_errors(workdir):
    bad = workdir / "bad_files"
    compile_flags = ["--run_mode", "compile", "--plan_ngpus", "1", "--runtime_ngpus", "1", "--policy", "dp",
                     "--compile_dir", str(bad / "compile")]

    def model_with(config_text: str, name: str) -> Path:
        folder = bad / name
        shutil.copytree(workdir / "model", folder)
        (folder / "config.json").write_text(config_text)
        return folder

    config = (workdir / "model" / "config.json").read_text()
    inconsistent = json.dumps({**json.loads(config), "num_attention_heads": 5})
    for name, text in (("partial", config[: len(config) // 2]), ("garbage", "\x00not json"),
                       ("inconsistent", inconsistent)):
        out = _python(str(EXAMPLE / "train.py"), *compile_flags, "--model_id", str(model_with(text, name)),
                      "--sequence_length", str(SEQ), check=False)
        _one_line_error(out, "config.json", "--model_id")

    for damage in ("arrow", "state"):
        data = bad / f"data_{damage}"
        shutil.copytree(workdir / "data", data)
        if damage == "arrow":
            arrow = next(data.glob("*.arrow"))
            arrow.write_bytes(arrow.read_bytes()[:200])
        else:
            (data / "state.json").write_text('{"_data_files": [')
        out = _python(str(EXAMPLE / "train.py"), *compile_flags, "--model_id", str(workdir / "model"),
                      "--dataset_path", str(data), check=False)
        _one_line_error(out, str(data), "bookcorpus.py")

    # Truncated weights in the model folder: found when they are loaded, before training.
    model = model_with(config, "truncated_weights")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    out = _python(str(EXAMPLE / "train.py"), "--model_id", str(model), "--dataset_path", str(workdir / "data"),
                  "--plan_ngpus", "1", "--runtime_ngpus", "1", "--policy", "dp", "--micro_batch_size", "2",
                  "--dtype", "fp32", "--max_steps", "1", "--checkpoint_dir", "", "--compile_dir", str(bad / "c2"),
                  "--dump_dir", str(bad / "dump"), check=False)
    _one_line_error(out, "--model_id", "save_pretrained")


def test_a_model_with_an_op_without_a_rule_stops_every_rank_with_one_line(workdir):
    # tests/train_without_a_rule.py is train.py with silu's rule removed: the tracer's error for an
    # unsupported model must reach the user as one line, whatever the launch.
    script = str(ROOT / "tests" / "train_without_a_rule.py")
    needle = "no dim annotation for torch.nn.functional.silu"
    base = ["--model_id", str(workdir / "model"), "--dataset_path", str(workdir / "data"), "--dtype", "fp32",
            "--max_steps", "1", "--checkpoint_dir", "", "--dump_dir", str(workdir / "norule" / "dump")]
    out = _python(script, "--run_mode", "compile", *base, "--compile_dir", str(workdir / "norule" / "c0"),
                  check=False)
    _one_line_error(out, needle, "set_rule")
    out = _python(script, *base, "--compile_dir", str(workdir / "norule" / "c1"), check=False)
    _one_line_error(out, needle, "set_rule")

    out = _python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *base,
                  "--plan_ngpus", "2", "--runtime_ngpus", "2", "--policy", "tp",
                  "--compile_dir", str(workdir / "norule" / "c2"), check=False)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode != 0 and len(errors) == 2 and all(needle in e for e in errors), out.stderr[-4000:]
    # torchrun's own summary follows (ChildFailedError), but no frame of ours is printed.
    assert f'File "{ROOT}' not in out.stderr, out.stderr[-4000:]
