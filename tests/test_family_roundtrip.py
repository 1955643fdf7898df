"""Every family docs/models.md calls supported round-trips a Hugging Face checkpoint through train.py.

The supported families are the breadth test's (tests/model_families.py: dense, not a known gap).
For each, a tiny model (the breadth test's config) is saved with ``save_pretrained``, its
persistent buffers first moved off the values the config gives, so that loading them is seen;
examples/llama3_128k/train.py trains it 2 steps in this process (one rank, policy dp); the weights
it loaded at step 0 must equal the saved model's. tools/ckpt_merger.py then merges the checkpoint
and exports a Hugging Face folder, which ``from_pretrained`` must load with no missing,
unexpected or mismatched key, every parameter equal to the merged (trained) one and every
buffer to the saved model's, bit for bit.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from model_families import KNOWN_GAPS, SEQUENCE, causal_lm_families, family_status, tiny_config

ROOT = Path(__file__).resolve().parent.parent
SUPPORTED = [f for f in causal_lm_families() if family_status(f)[0] == "dense" and f not in KNOWN_GAPS]
# The smoke subset (also run on the oldest supported transformers): a renamed head, a tied
# embedding with soft-capping, a persistent buffer.
SMOKE = {"gpt_neox", "gemma2", "apertus"}


def _load_script(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scripts() -> tuple[ModuleType, ModuleType]:
    """(examples/llama3_128k/train.py, tools/ckpt_merger.py), imported once."""
    return (_load_script(ROOT / "examples" / "llama3_128k" / "train.py", "roundtrip_train"),
            _load_script(ROOT / "tools" / "ckpt_merger.py", "roundtrip_ckpt_merger"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """8 rows of SEQUENCE random token ids (every tiny vocabulary holds 128), as bookcorpus.py saves them."""
    import datasets

    path = tmp_path_factory.mktemp("roundtrip_data") / "data"
    rows = torch.randint(0, 128, (8, SEQUENCE), generator=torch.Generator().manual_seed(0))
    datasets.Dataset.from_dict({"input_ids": rows.tolist()}).save_to_disk(str(path))
    return str(path)


def _saved_model(family: str, folder: Path) -> torch.nn.Module:
    """The tiny model of ``family``, saved to ``folder``; persistent buffers moved off their initial values."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    persistent = set(model.state_dict())
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in persistent and buffer.is_floating_point():
                buffer.add_(0.25)  # a checkpoint's own value (Gemma 4's layer_scalar is not the config's 1)
    model.save_pretrained(folder)
    return model


# About 0.4 s a family on 2 CPU cores, 45 s for all (gemma4_text alone 25 s: its tiny config keeps a
# 262144-word per-layer embedding).
@pytest.mark.slow
@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.smoke) if f in SMOKE else f
                                    for f in SUPPORTED])
def test_family_loads_trains_and_exports(family, scripts, dataset, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    train, merger = scripts
    saved = _saved_model(family, tmp_path / "model")
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    init_weights = train._init_weights

    def record_step_0(module, args, plan):
        init_weights(module, args, plan)
        loaded["parameters"] = {lp.name: lp.param.detach().clone() for lp in module.local_parameters()}
        loaded["buffers"] = {name: value.clone() for name, value in module.full_buffers().items()}

    monkeypatch.setattr(train, "_init_weights", record_step_0)
    run = tmp_path / "run"
    code = train.main(["--model_id", str(tmp_path / "model"), "--dataset_path", dataset,
                       "--compile_dir", str(run / "compile"), "--checkpoint_dir", str(run / "ckpt"),
                       "--dump_dir", str(run / "dump"), "--plan_ngpus", "1", "--runtime_ngpus", "1", "--policy", "dp",
                       "--micro_batch_size", "2", "--max_steps", "2", "--lr", "1e-2", "--dtype", "fp32"])
    assert code == 0, f"{family}: train.py failed (its error line is in the captured stderr)"

    # Step 0: every parameter and buffer the saved model holds, read from its folder.
    saved_state = saved.state_dict()
    assert loaded["parameters"].keys() == dict(saved.named_parameters()).keys()
    for name, value in loaded["parameters"].items():
        assert torch.equal(value, saved_state[name]), f"{family}: {name} at step 0 is not the saved model's"
    for name, value in loaded["buffers"].items():
        if name in saved_state:  # persistent: the checkpoint's value, not the config's
            assert torch.equal(value, saved_state[name]), f"{family}: buffer {name} at step 0 is not the saved one"

    hf_dir = tmp_path / "hf"
    assert merger.main(["--ckpt_dir", str(run / "ckpt"), "--output_fname", str(tmp_path / "merged.safetensors"),
                        "--hf_output_dir", str(hf_dir), "--params_only", "--no_progress"]) == 0
    trained = load_file(str(tmp_path / "merged.safetensors"))
    assert any(not torch.equal(trained[n], loaded["parameters"][n]) for n in trained), "training changed nothing"

    exported, info = AutoModelForCausalLM.from_pretrained(str(hf_dir), output_loading_info=True)
    assert not any(info.values()), f"{family}: from_pretrained reports {info}"
    assert dict(exported.named_parameters()).keys() == trained.keys()
    for name, value in trained.items():
        assert torch.equal(exported.get_parameter(name), value), f"{family}: exported {name} is not the trained one"
    for name, value in exported.named_buffers():
        if name in saved_state:  # persistent: training leaves it as the saved model had it
            assert torch.equal(value, saved_state[name]), f"{family}: exported buffer {name} differs"
