"""Reading parameter shards (and saved buffers) straight from a Hugging Face model folder's safetensors files.

The folder's keys are the ones ``save_pretrained`` writes, which are not always the module's
names: transformers renames some weights on the way to disk (GPT-NeoX's ``lm_head`` is saved as
``embed_out``) and writes a tied weight once. The compile stage records each weight's key as
``checkpoint_name`` in plan.json (docs/contract.md); this module reads by it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

Slices = tuple[tuple[int, int], ...]


def has_weights(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds safetensors weights (one file or an indexed set)."""
    d = Path(model_dir)
    return (d / "model.safetensors").is_file() or (d / "model.safetensors.index.json").is_file()


def plan_checkpoint_names(plan: Mapping) -> dict[str, str]:
    """``{parameter or buffer name: its key in a Hugging Face checkpoint}`` from plan.json.

    Every parameter and persistent buffer of a Hugging Face model has a ``checkpoint_name``;
    entries without one (a plan of another kind of model) are left out and read under their own name.
    """
    entries = [*plan.get("parameters", ()), *plan.get("buffers", ())]
    return {e["name"]: e["checkpoint_name"] for e in entries if "checkpoint_name" in e}


def _weight_map(model_dir: Path) -> dict[str, str]:
    """``{key: safetensors file name}`` of every tensor in the folder."""
    from safetensors import safe_open

    index_file = model_dir / "model.safetensors.index.json"
    if index_file.is_file():
        return json.loads(index_file.read_text())["weight_map"]
    if (model_dir / "model.safetensors").is_file():
        with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
            return {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118 — safe_open has no __iter__
    raise FileNotFoundError(f"no model.safetensors(.index.json) in {model_dir}; save the model with save_pretrained")


def slice_reader(model_dir: str | Path,
                 names: Mapping[str, str] | None = None) -> Callable[[str, Slices], torch.Tensor]:
    """A function ``(name, slices) -> tensor`` reading only that slice of a parameter from disk.

    ``names`` maps a parameter's name to its key in the folder (``plan_checkpoint_names(plan)``); a
    parameter is read under that key, else under its own name (a folder written with the
    module's names). Every rank reads just its shards, so loading Llama-3-8B on 8 GPUs never
    holds the full model in one process. Raises KeyError naming the parameter when the folder
    has it under neither name.
    """
    from safetensors import safe_open

    d = Path(model_dir)
    weight_map = _weight_map(d)
    names = names or {}
    handles: dict[str, object] = {}

    def read(name: str, slices: Slices) -> torch.Tensor:
        key = next((k for k in (names.get(name, name), name) if k in weight_map), None)
        if key is None:
            saved_as = f" (saved as {names[name]})" if names.get(name, name) != name else ""
            raise KeyError(f"parameter {name}{saved_as} is not in {model_dir}; is it the model the plan was "
                           "compiled for?")
        file = weight_map[key]
        if file not in handles:
            handles[file] = safe_open(str(d / file), framework="pt")
        view = handles[file].get_slice(key)  # type: ignore[attr-defined]
        return view[tuple(slice(a, b) for a, b in slices)]

    return read


def read_tensors(model_dir: str | Path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The full tensors of ``keys`` that the folder holds, by key (keys it lacks are left out)."""
    from safetensors import safe_open

    d = Path(model_dir)
    weight_map = _weight_map(d)
    by_file: dict[str, list[str]] = {}
    for key in keys:
        if key in weight_map:
            by_file.setdefault(weight_map[key], []).append(key)
    out = {}
    for file, file_keys in by_file.items():
        with safe_open(str(d / file), framework="pt") as f:
            out.update({key: f.get_tensor(key) for key in file_keys})
    return out


def read_buffers(model_dir: str | Path, plan: Mapping) -> dict[str, torch.Tensor]:
    """The persistent buffers of ``plan`` that the folder holds, full, keyed by buffer name.

    A Hugging Face checkpoint carries the model's persistent buffers (Gemma 4's per-layer
    ``layer_scalar``); the compile output's values are the ones the config gives, so a
    checkpoint's own must replace them. Buffers the folder lacks are left out.
    """
    wanted = {b["name"]: b["checkpoint_name"] for b in plan.get("buffers", ()) if "checkpoint_name" in b}
    found = read_tensors(model_dir, wanted.values())
    return {name: found[key] for name, key in wanted.items() if key in found}
