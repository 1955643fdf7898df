"""Trace Hugging Face blocks as fused kernels: RMSNorm, SwiGLU MLP activation, rotary embedding.

Inside ``fused_kernels(model)`` the recognised modules call dimshard's registered kernels instead
of their eager ops, so each appears in the graph as one op with its own annotation and the
generated code calls the kernel (Triton on GPU, the PyTorch reference on CPU). Values are the
same as the eager modules' (each kernel is tested against them); the model is restored on exit.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator
from typing import Any

import torch


def _same_code(fn: Any, reference: Any) -> bool:
    """Whether ``fn`` runs ``reference``'s code: transformers copies Llama's blocks into other families verbatim,
    and a family whose block differs (Gemma's ``x * (1 + w)`` norm, Cohere's interleaved rotary, partial rotary)
    must keep its own ops, since the fused kernels compute Llama's function."""
    # Decorators (deprecation shims, hub kernels) wrap the function: compare what they wrap.
    fn, reference = inspect.unwrap(fn) if callable(fn) else fn, inspect.unwrap(reference)
    code, ref = getattr(fn, "__code__", None), getattr(reference, "__code__", None)
    if code is None or ref is None:
        return False

    def key(c: Any) -> tuple:
        return c.co_code, c.co_names, c.co_varnames, tuple(x for x in c.co_consts if not isinstance(x, str))

    return key(code) == key(ref)


def _llama() -> Any:
    from transformers.models.llama import modeling_llama

    return modeling_llama


def _is_rms_norm(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "weight") and (
        hasattr(module, "variance_epsilon") or hasattr(module, "eps")) and _same_code(
        type(module).forward, _llama().LlamaRMSNorm.forward)


def _is_swiglu_mlp(module: torch.nn.Module) -> bool:
    config = getattr(module, "config", None)
    return (all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and getattr(config, "hidden_act", None) == "silu"
            and _same_code(type(module).forward, _llama().LlamaMLP.forward))


def _is_llama_rotary(source: Any, function: Any) -> bool:
    """``apply_rotary_pos_emb`` (and the ``rotate_half`` it calls) of ``source`` are Llama's."""
    llama = _llama()
    return _same_code(function, llama.apply_rotary_pos_emb) and _same_code(
        getattr(source, "rotate_half", None), llama.rotate_half)


@contextlib.contextmanager
def fused_kernels(model: torch.nn.Module) -> Iterator[list[str]]:
    """Patch ``model`` (instance-level) to call fused kernels; yields what was fused, restores on exit."""
    from dimshard.kernels import apply_rotary, rms_norm, swiglu

    fused: list[str] = []
    patched_forwards: list[torch.nn.Module] = []
    patched_functions: list[tuple[Any, str, Any]] = []
    for name, module in model.named_modules():
        if _is_rms_norm(module):
            eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
            module.forward = (lambda m, e: lambda hidden_states: rms_norm(hidden_states, m.weight, e))(module, eps)
            patched_forwards.append(module)
            fused.append(f"{name}: rms_norm")
        elif _is_swiglu_mlp(module):
            module.forward = (lambda m: lambda x: m.down_proj(swiglu(m.gate_proj(x), m.up_proj(x))))(module)
            patched_forwards.append(module)
            fused.append(f"{name}: swiglu")
        source = sys.modules.get(type(module).__module__)
        original = getattr(source, "apply_rotary_pos_emb", None) if source is not None else None
        if (original is not None and not any(s is source for s, _, _ in patched_functions)
                and _is_llama_rotary(source, original)):

            def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       *args: Any, _original: Any = original, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
                unsqueeze_dim = args[1] if len(args) > 1 else kwargs.get("unsqueeze_dim", 1)
                if unsqueeze_dim != 1 or cos.dim() != 3:
                    return _original(q, k, cos, sin, *args, **kwargs)
                return apply_rotary(q, k, cos, sin)

            source.apply_rotary_pos_emb = rotary
            patched_functions.append((source, "apply_rotary_pos_emb", original))
            fused.append(f"{source.__name__}.apply_rotary_pos_emb: apply_rotary")
    try:
        yield fused
    finally:
        for module in patched_forwards:
            del module.forward
        for source, attr, original in patched_functions:
            setattr(source, attr, original)
