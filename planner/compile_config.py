"""``CompileConfig``: everything that determines a compile output, and its fingerprint.

A compile output (``plan.json``, ``gencode/``, buffers, ``plan_report.md``) is a pure function of
the model (class, config, parameter shapes and dtypes), the example inputs' shapes and dtypes,
the planning options, the hardware profile's contents and the library versions. The config holds
all of them, so ``fingerprint()`` can tell a reusable output from a stale one. What cannot be
hashed (the model's weights, a ``forward_fn``) stays out: the weights never reach the compile
output, and a custom ``forward_fn`` is named by the ``loss`` field.

Build one with the planning options, then ``compile_model`` binds it to the model and inputs
(``for_model``); ``compile_status`` compares a folder's ``plan.json`` with a bound config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

# Bumped when the compile output's layout or meaning changes, so older outputs read as stale.
FORMAT_VERSION = 2  # 2: plan.json names where each weight sits in a Hugging Face checkpoint

# ``loss`` values compile_model knows how to build; any other value names a caller's forward_fn.
MODEL_LOSS = "model"  # model(**inputs): the Hugging Face model's own loss
CHUNKED_LOSS = "chunked_cross_entropy"  # planner.graph.hf.chunked_causal_lm_forward(loss_chunk_size)

# --fp8 modes and recipes (planner/search/fp8_choice.py, kernels/fp8/scaling.py), named here so the
# config validates without importing either.
FP8_MODES = ("off", "auto", "all")
FP8_RECIPES = ("tensorwise", "rowwise", "rowwise_gw_hp")

# describe() keys too long to print when they change: what to say instead.
_SUMMARIZED = {"model_digest": "the model (config or parameter shapes)",
               "hw_profile_contents": "the hardware profile's contents", "versions": "library versions",
               "host_memory_budget_gb_default": "this machine's host memory per GPU (auto's offload budget)",
               "memory_budget_source": "where the GPU memory budget came from"}
# Fields filled from the model and example inputs by ``for_model``.
_MODEL_FIELDS = ("model", "model_digest", "inputs")


def library_versions() -> tuple[tuple[str, str], ...]:
    """``(("dimshard", v), ("torch", v), ("transformers", v))`` of the running process."""
    from .. import __version__

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "absent"

    return (("dimshard", __version__), ("torch", version("torch")), ("transformers", version("transformers")))


def canonical(value: Any, where: str) -> Any:
    """``value`` as plain JSON data (dicts with string keys, lists, numbers, strings, None).

    Raises TypeError for anything whose text could differ between processes (objects whose repr
    holds an address, sets), naming ``where``.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (torch.dtype, Path)):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): canonical(v, f"{where}[{k!r}]") for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return canonical(dataclasses.asdict(value), where)
    raise TypeError(f"{where} is a {type(value).__name__}; give plain values (numbers, strings, lists, dicts) "
                    "so the compile output can be fingerprinted")


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _model_config(model: torch.nn.Module) -> dict | None:
    """The Hugging Face config of ``model`` or of the first submodule that has one (a loss wrapper)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None:
            d = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
            return canonical(json.loads(json.dumps(d, sort_keys=True, default=str)), "model config")
    return None


def model_digest(model: torch.nn.Module) -> str:
    """A hash of what the compile output depends on in the model: its config, parameter and buffer shapes and dtypes.

    Values are left out (they never reach the compile output, and a meta-built model has none).
    """
    tensors = [[name, list(t.shape), str(t.dtype)] for name, t in model.named_parameters()]
    tensors += [[name, list(t.shape), str(t.dtype)] for name, t in model.named_buffers()]
    return _digest({"config": _model_config(model), "tensors": tensors})


@dataclass(frozen=True)
class CompileConfig:
    """Everything that determines a compile output besides the model itself; see the module docstring.

    ``policy`` is a registered policy's name (``planner.search.policies.register_policy``);
    ``policy_options`` go to it as ``PolicyContext.extra`` (for ``auto``: ``dp_size``, ``zero``,
    ``mesh_shapes``; for every policy: ``grad_accumulation_steps``, which sets plan.json's
    ``gradients`` entry). ``hw_profile`` names the cost model's hardware profile (a shipped name or a
    JSON file; None: ``hardware.default_hw_profile()``); its contents, not its name, are
    fingerprinted. ``memory_budget_gb`` (10^9 bytes per GPU; None: no limit) is what the ``auto``
    policy plans within; ``memory_budget_source`` says where it came from, for ``plan_report.md``
    and plan.json (``budgets.default_gpu_budget`` gives both). ``loss`` says what the traced forward returns: ``"model"`` (the model's own
    loss), ``"chunked_cross_entropy"`` (decoder, then dimshard's chunked linear cross-entropy
    with ``loss_chunk_size`` tokens per chunk, 0: automatic) or the name of a ``forward_fn``
    passed to ``compile_model``. ``model``, ``model_digest`` and ``inputs`` are filled by
    ``for_model``; ``versions`` defaults to the running libraries'.
    ``fp8`` (``off``, ``auto``: priced per linear, ``all``: every eligible linear) and ``fp8_recipe``
    (``tensorwise``, ``rowwise``, ``rowwise_gw_hp``) choose the linears whose products run in FP8
    (``planner/search/fp8_choice.py``, docs/design.md, "FP8").
    """

    plan_ngpus: int = 1
    policy: str = "dp"
    policy_options: Mapping[str, Any] = field(default_factory=dict)
    recompute: str = "none"
    memory_budget_gb: float | None = None
    memory_budget_source: str = ""
    param_dtype: torch.dtype | None = None
    fused_kernels: bool = False
    loss: str = MODEL_LOSS
    loss_chunk_size: int = 0
    hw_profile: str | None = None
    fp8: str = "off"
    fp8_recipe: str = "tensorwise"
    model: str = ""
    model_digest: str = ""
    inputs: tuple[tuple[str, tuple[int, ...], str], ...] = ()
    versions: tuple[tuple[str, str], ...] = field(default_factory=library_versions)

    def __post_init__(self) -> None:
        if not isinstance(self.plan_ngpus, int) or self.plan_ngpus < 1:
            raise ValueError(f"plan_ngpus must be a positive integer, got {self.plan_ngpus!r}")
        if not isinstance(self.policy, str) or not self.policy:
            raise ValueError(f"policy must be a registered policy's name, got {self.policy!r}; "
                             "register a function with planner.register_policy and pass its name")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise ValueError(f"memory_budget_gb must be positive or None (no limit), got {self.memory_budget_gb}")
        if self.param_dtype is not None and not isinstance(self.param_dtype, torch.dtype):
            raise ValueError(f"param_dtype must be a torch.dtype such as torch.bfloat16 or None, got {self.param_dtype!r}")
        if self.loss_chunk_size < 0:
            raise ValueError(f"loss_chunk_size must be >= 0 (0: automatic), got {self.loss_chunk_size}")
        if self.loss_chunk_size and self.loss != CHUNKED_LOSS:
            raise ValueError(f"loss_chunk_size applies to loss='{CHUNKED_LOSS}' only (loss is '{self.loss}')")
        if self.fp8 not in FP8_MODES:
            raise ValueError(f"fp8 must be one of {FP8_MODES}, got {self.fp8!r}")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ValueError(f"fp8_recipe must be one of {FP8_RECIPES}, got {self.fp8_recipe!r}")
        if "hw_profile" in self.policy_options:
            raise ValueError("give the hardware profile as CompileConfig(hw_profile=...), not as a policy option")
        options = canonical(dict(self.policy_options), "policy option")
        # Frozen all the way down: a read-only view of a private copy.
        object.__setattr__(self, "policy_options", types.MappingProxyType(options))
        object.__setattr__(self, "inputs", tuple((n, tuple(s), d) for n, s, d in self.inputs))
        object.__setattr__(self, "versions", tuple((n, v) for n, v in self.versions))

    def __hash__(self) -> int:  # policy_options is a mapping; hash what identifies the config instead
        return hash(json.dumps(self.describe(hardware=False), sort_keys=True))

    def __reduce__(self) -> tuple:  # a mapping proxy does not pickle: rebuild from the fields
        values = [getattr(self, f.name) for f in dataclasses.fields(self)]
        return type(self), tuple(dict(v) if isinstance(v, types.MappingProxyType) else v for v in values)

    def for_model(self, model: torch.nn.Module, example_inputs: Mapping[str, torch.Tensor]) -> CompileConfig:
        """This config with the model's class, digest and the example inputs' shapes and dtypes filled in.

        Raises ValueError when the config was already bound to a different model or inputs.
        """
        bound = dataclasses.replace(
            self, model=f"{type(model).__module__}.{type(model).__qualname__}", model_digest=model_digest(model),
            inputs=tuple((k, tuple(v.shape), str(v.dtype)) for k, v in example_inputs.items()))
        if self.model_digest and any(getattr(self, f) != getattr(bound, f) for f in _MODEL_FIELDS):
            raise ValueError("this CompileConfig was bound to another model or other example inputs; "
                             "build a new one (or bind the original with for_model)")
        return bound

    def describe(self, hardware: bool = True) -> dict[str, Any]:
        """Every field as plain JSON data, plus the hardware profile's contents (what ``fingerprint`` hashes).

        It is written into ``plan.json`` as ``compile_config`` so a stale output can say what changed.
        """
        d = {f.name: canonical(getattr(self, f.name), f.name) for f in dataclasses.fields(self)}
        d["format_version"] = FORMAT_VERSION
        if self.fp8 == "off":  # what compiles wrote before FP8 existed: their fingerprints stay valid
            del d["fp8"], d["fp8_recipe"]
        if hardware:
            from .cost.hardware import load_hw_profile

            hw = load_hw_profile(self.hw_profile)
            d["hw_profile_contents"] = canonical(hw.to_dict(), "hardware profile")
            if self.policy == "auto" and "host_memory_budget_gb" not in self.policy_options:
                from .cost.budgets import default_host_budget

                # Without the option, auto's offload budget comes from this machine's RAM and GPUs.
                d["host_memory_budget_gb_default"] = default_host_budget(hw).gb
        return d

    def fingerprint(self) -> str:
        """sha256 of ``describe()``: equal exactly when the compile output would be the same.

        Stable across processes and machines (plain JSON with sorted keys, no object ids).
        Raises ValueError when the config is not bound to a model yet (see ``for_model``).
        """
        if not self.model_digest:
            raise ValueError("a CompileConfig fingerprints a model's compile output: bind it first with "
                             "config.for_model(model, example_inputs) (compile_model does this)")
        return _digest(self.describe())


def compile_status(output_dir: str | Path, config: CompileConfig) -> tuple[bool, str]:
    """``(True, "matches")`` when ``output_dir`` holds a complete compile output of ``config``, else ``(False, why)``.

    ``config`` must be bound (``for_model``). ``why`` names the fields that changed, e.g.
    ``memory_budget_gb changed (70.0 -> 60.0)``.
    """
    plan_file = Path(output_dir) / "plan.json"
    if not plan_file.is_file():
        return False, f"no compile output in {output_dir}"
    try:
        saved = json.loads(plan_file.read_text())
    except json.JSONDecodeError as e:
        return False, f"{plan_file} is not valid JSON ({e})"
    if saved.get("fingerprint") == config.fingerprint():
        return True, "matches"
    before = saved.get("compile_config")
    if not isinstance(before, dict):
        return False, f"the compile output in {output_dir} was written by an older dimshard"
    now = config.describe()
    changed = []
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            if key in _SUMMARIZED:
                changed.append(f"{_SUMMARIZED[key]} changed")
            else:
                changed.append(f"{key} changed ({before.get(key)!r} -> {now.get(key)!r})")
    return False, f"the compile output in {output_dir} is stale: " + ", ".join(changed or ["fingerprint differs"])
