"""Offload through train.py (torchrun, gloo, CPU): same losses as without it, exact resume, merge unchanged.

On the CPU machine host memory is on both sides of every copy, so this runs the offload code path
of the trainer: AdamW state in host buffers updated chunk by chunk under ZeRO-1, recomputed layers
whose inputs wait in host buffers, checkpoints with the usual keys, resume, and the merger.
"""

from __future__ import annotations

import json

from test_train_e2e import LAYOUTS, ROOT, _losses, _python, _train, workdir  # noqa: F401 (workdir: fixture)

DP2 = [*LAYOUTS["dp2"][1], "--recompute", "layer"]


def test_offload_trains_like_without_it_and_resumes_and_merges(workdir):  # noqa: F811
    _train(workdir, "plain", 1, *LAYOUTS["single"][1], "--recompute", "layer", "--max_steps", "4",
           "--checkpoint_dir", "")
    plain = _losses(workdir, "plain")
    _train(workdir, "offload", 2, *DP2, "--offload", "all", "--max_steps", "4", "--checkpoint_interval", "2")
    offloaded = _losses(workdir, "offload")
    plan = json.loads((workdir / "offload" / "compile" / "plan.json").read_text())
    assert plan["offload"] == {"optimizer": True, "activation_scopes": ["model.layers.0", "model.layers.1"]}
    assert len(offloaded) == 4
    for a, b in zip(offloaded, plain):
        assert abs(a - b) <= 1e-4 * abs(b), (offloaded, plain)  # as test_train_e2e's layouts

    # Resumed from the step-2 checkpoint, with the optimizer updated on the other device: the same losses.
    step2 = workdir / "offload" / "ckpt" / "step_2"
    _train(workdir, "offload_resumed", 2, *DP2, "--offload", "all", "--max_steps", "4", "--resume_path", str(step2),
           "--optimizer_update_device", "gpu", "--compile_dir", str(workdir / "offload" / "compile"))
    resumed = _losses(workdir, "offload_resumed")
    assert resumed == offloaded[2:], (resumed, offloaded)

    # The checkpoint holds the usual keys: the merger reads it, and a run without offload (one
    # process, gradient accumulation) continues from the merged file.
    merged = workdir / "offload_merged.safetensors"
    _python(str(ROOT / "tools" / "ckpt_merger.py"), "--ckpt_dir", str(step2), "--output_fname", str(merged))
    _train(workdir, "from_offload_merged", 1, *LAYOUTS["accumulate"][1], "--max_steps", "3",
           "--resume_path", str(merged))
    assert abs(_losses(workdir, "from_offload_merged")[0] - offloaded[2]) <= 1e-5 * abs(offloaded[2])
