"""The base class of generated per-rank modules, and loading a compile output for one rank."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

Slices = tuple[tuple[int, int], ...]


@dataclass
class LocalParameter:
    """One parameter shard held by this rank, with where it sits in the full tensor."""

    name: str  # original state-dict name
    param: torch.nn.Parameter  # this rank's shard
    full_shape: tuple[int, ...]
    slices: Slices  # [start, stop) per dim of the full tensor
    unit_ranks: tuple[int, ...]  # unit ranks holding a copy of this shard (this rank included)


def take_slice(full: torch.Tensor, slices: Slices) -> torch.Tensor:
    """The view of ``full`` at ``slices`` ([start, stop) per dim)."""
    return full[tuple(slice(a, b) for a, b in slices)]


class ParallelModule(torch.nn.Module):
    """Holds one rank's parameter shards; generated subclasses define ``forward``.

    ``declare_parameter`` and ``declare_buffer`` are called by the generated ``__init__``;
    values come later from ``load_full_state_dict`` and ``load_buffers``.
    """

    unit_rank: int = 0

    def __init__(self, ctx: Any) -> None:
        super().__init__()
        self.ctx = ctx
        self.device = ctx.device
        self._local_parameters: list[LocalParameter] = []
        self._buffer_names: dict[str, str] = {}

    def declare_parameter(self, attr: str, name: str, full_shape: tuple[int, ...], slices: Slices,
                          dtype: torch.dtype, unit_ranks: tuple[int, ...]) -> None:
        """Create this rank's (uninitialised) shard of parameter ``name`` as attribute ``attr``."""
        shape = tuple(b - a for a, b in slices)
        param = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=self.device))
        self.register_parameter(attr, param)
        self._local_parameters.append(LocalParameter(name, param, tuple(full_shape), tuple(slices), tuple(unit_ranks)))

    def declare_buffer(self, attr: str, name: str, full_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Create a full-size buffer (rotary tables, captured constants) filled by ``load_buffers``."""
        self.register_buffer(attr, torch.empty(full_shape, dtype=dtype, device=self.device), persistent=False)
        self._buffer_names[attr] = name

    def local_parameters(self) -> list[LocalParameter]:
        """This rank's parameter shards, in declaration order."""
        return list(self._local_parameters)

    @torch.no_grad()
    def load_full_state_dict(
        self, tensors: Mapping[str, torch.Tensor] | Callable[[str, Slices], torch.Tensor]
    ) -> None:
        """Copy every local shard from full tensors keyed by original names.

        ``tensors`` is a mapping of full tensors, or a function ``(name, slices) -> shard`` so
        that callers can read only the slice from disk (safetensors ``get_slice``).
        """
        missing = []
        for lp in self._local_parameters:
            if callable(tensors):
                shard = tensors(lp.name, lp.slices)
            else:
                if lp.name not in tensors:
                    missing.append(lp.name)
                    continue
                full = tensors[lp.name]
                if tuple(full.shape) != lp.full_shape:
                    raise ValueError(
                        f"parameter {lp.name}: the state dict holds shape {list(full.shape)} but the compiled plan "
                        f"expects {list(lp.full_shape)}; recompile for this model"
                    )
                shard = take_slice(full, lp.slices)
            lp.param.copy_(shard.to(device=lp.param.device, dtype=lp.param.dtype))
        if missing:
            raise KeyError(
                f"{len(missing)} parameters missing from the state dict, e.g. {missing[:3]}; "
                "is it the model this plan was compiled for?"
            )

    def full_buffers(self) -> dict[str, torch.Tensor]:
        """The declared buffers (full tensors, the same on every rank), keyed by their original names."""
        return {name: getattr(self, attr) for attr, name in self._buffer_names.items()}

    @torch.no_grad()
    def load_buffers(self, tensors: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Fill the declared buffers from full tensors keyed by their names.

        ``strict``: every declared buffer must be in ``tensors`` (KeyError otherwise); without it,
        only those present are replaced (a model folder's saved buffers over the compile output's).
        """
        for attr, name in self._buffer_names.items():
            if name not in tensors:
                if not strict:
                    continue
                raise KeyError(f"buffer {name} is missing from the compile output; recompile")
            getattr(self, attr).copy_(tensors[name])


def read_plan(compile_dir: str | Path) -> dict:
    """The parsed ``plan.json`` of a compile output, with a clear error when it is absent."""
    path = Path(compile_dir) / "plan.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no plan.json in {compile_dir}: run train.py --run_mode compile first (or point --compile_dir at it)"
        )
    return json.loads(path.read_text())


def load_parallel_module(compile_dir: str | Path, ctx: Any) -> ParallelModule:
    """Import ``gencode/rank{unit_rank}.py`` from a compile output and build this rank's module.

    Buffers are loaded from ``buffers.safetensors``; parameters stay uninitialised until
    ``load_full_state_dict`` (or a checkpoint) fills them.
    """
    compile_dir = Path(compile_dir)
    read_plan(compile_dir)
    path = compile_dir / "gencode" / f"rank{ctx.unit_rank}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the compile output is incomplete; recompile")
    spec = importlib.util.spec_from_file_location(f"dimshard_gencode_rank{ctx.unit_rank}_{abs(hash(str(path)))}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = getattr(module, f"Rank{ctx.unit_rank}Module")
    instance: ParallelModule = cls(ctx)
    buffers_file = compile_dir / "buffers.safetensors"
    if buffers_file.is_file():
        from safetensors.torch import load_file

        instance.load_buffers(load_file(str(buffers_file)))
    return instance
