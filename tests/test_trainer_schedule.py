"""Learning-rate schedules, TrainConfig and the MFU arithmetic."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dimshard.runtime.optimizer.lr_schedule import lr_at
from dimshard.runtime.training.config import TrainConfig, resolve_dtype, resolve_peak_tflops
from dimshard.runtime.training.metrics import flops_per_sequence, model_flops_utilization

LR = 3e-4


def test_warmup_is_linear_and_reaches_lr():
    rates = [lr_at(s, lr=LR, max_steps=100, warmup_steps=4) for s in range(4)]
    assert rates == pytest.approx([LR * 0.25, LR * 0.5, LR * 0.75, LR])


def test_cosine_endpoints_and_midpoint():
    kwargs = {"lr": LR, "max_steps": 21, "warmup_steps": 0, "schedule": "cosine", "min_lr_ratio": 0.1}
    assert lr_at(0, **kwargs) == pytest.approx(LR)
    assert lr_at(10, **kwargs) == pytest.approx(0.1 * LR + 0.9 * LR * 0.5)
    assert lr_at(20, **kwargs) == pytest.approx(0.1 * LR)
    assert lr_at(500, **kwargs) == pytest.approx(0.1 * LR)
    rates = [lr_at(s, **kwargs) for s in range(21)]
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_linear_after_warmup():
    kwargs = {"lr": LR, "max_steps": 12, "warmup_steps": 2, "schedule": "linear", "min_lr_ratio": 0.0}
    # progress runs over steps 2..11
    assert [lr_at(s, **kwargs) for s in (2, 5, 11)] == pytest.approx([LR, LR * (1 - 3 / 9), 0.0])


def test_constant_keeps_lr_after_warmup():
    assert [lr_at(s, lr=LR, max_steps=10, warmup_steps=2, schedule="constant") for s in range(10)] == \
        pytest.approx([LR / 2] + [LR] * 9)


def test_wsd_is_stable_then_decays_linearly():
    kwargs = {"lr": LR, "max_steps": 11, "schedule": "wsd", "wsd_decay_ratio": 0.2, "min_lr_ratio": 0.0}
    rates = [lr_at(s, **kwargs) for s in range(11)]
    # progress = s / 10; the decay covers progress 0.8..1.0, i.e. steps 8..10
    assert rates[:9] == pytest.approx([LR] * 9)
    assert rates[9:] == pytest.approx([LR / 2, 0.0])


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_at(0, lr=LR, max_steps=10, schedule="step")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        lr_at(0, lr=LR, max_steps=10, min_lr_ratio=2.0)


def test_every_config_field_has_help_and_a_default():
    for field in dataclasses.fields(TrainConfig):
        assert field.metadata.get("help"), field.name
        assert field.default is not dataclasses.MISSING, field.name
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {"plan_ngpus", "runtime_ngpus", "resume_path", "lr_schedule", "peak_tflops", "zero", "dtype"} <= names


def test_config_validation_names_the_flag():
    TrainConfig().validate()
    with pytest.raises(ValueError, match="--runtime_ngpus"):
        TrainConfig(plan_ngpus=4, runtime_ngpus=6).validate()
    with pytest.raises(ValueError, match="--lr_schedule"):
        TrainConfig(lr_schedule="poly").validate()
    assert TrainConfig(plan_ngpus=2, runtime_ngpus=8, micro_batch_size=2, grad_accumulation_steps=3) \
        .global_batch_size == 2 * 3 * 4


def test_dtype_and_peak_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_dtype(TrainConfig(), cpu) == torch.float32
    assert resolve_dtype(TrainConfig(dtype="bf16"), cpu) == torch.bfloat16
    assert resolve_peak_tflops(TrainConfig(), cpu) is None
    assert resolve_peak_tflops(TrainConfig(peak_tflops=100.0), cpu) == 100.0
    assert resolve_peak_tflops(TrainConfig(peak_tflops=0.0), cpu) is None


def test_mfu_matches_the_reference_example():
    # docs/design.md, "Measuring: MFU": Llama-3-8B, 131072 tokens, 4 sequences per step on 8 H100s at 41.12 s/step -> 40.96 %.
    stats = {"num_params": 8.03e9, "num_layers": 32, "hidden_size": 4096, "seq_len": 131072}
    assert flops_per_sequence(stats) / 3 / 1e12 == pytest.approx(11104.35, rel=2e-3)
    mfu = model_flops_utilization(4 / 41.12, stats, world_size=8, peak_tflops=989.0)
    assert mfu == pytest.approx(0.4096, abs=2e-3)
    assert model_flops_utilization(1.0, stats, world_size=8, peak_tflops=None) is None
    assert math.isfinite(mfu)
