"""Reading parameter shards straight from a Hugging Face model folder's safetensors files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

Slices = tuple[tuple[int, int], ...]


def has_weights(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds safetensors weights (one file or an indexed set)."""
    d = Path(model_dir)
    return (d / "model.safetensors").is_file() or (d / "model.safetensors.index.json").is_file()


def slice_reader(model_dir: str | Path) -> Callable[[str, Slices], torch.Tensor]:
    """A function ``(name, slices) -> tensor`` reading only that slice of a parameter from disk.

    Every rank reads just its shards, so loading Llama-3-8B on 8 GPUs never holds the full model
    in one process. Raises KeyError naming the parameter when the folder lacks it.
    """
    from safetensors import safe_open

    d = Path(model_dir)
    index_file = d / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
    elif (d / "model.safetensors").is_file():
        with safe_open(str(d / "model.safetensors"), framework="pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118 — safe_open has no __iter__
    else:
        raise FileNotFoundError(f"no model.safetensors(.index.json) in {model_dir}; save the model with save_pretrained")
    handles: dict[str, object] = {}

    def read(name: str, slices: Slices) -> torch.Tensor:
        file = weight_map.get(name)
        if file is None:
            # Tied output embeddings are saved once, under the input embedding's name.
            if name == "lm_head.weight" and "model.embed_tokens.weight" in weight_map:
                return read("model.embed_tokens.weight", slices)
            raise KeyError(f"parameter {name} is not in {model_dir}; is it the model the plan was compiled for?")
        if file not in handles:
            handles[file] = safe_open(str(d / file), framework="pt")
        view = handles[file].get_slice(name)  # type: ignore[attr-defined]
        return view[tuple(slice(a, b) for a, b in slices)]

    return read
