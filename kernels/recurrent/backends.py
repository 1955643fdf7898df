"""Which implementation runs a recurrent op on a device: a verified fused kernel, else the PyTorch reference.

Each op module lists its GPU candidates in order (``candidates``: a name and a loader returning the
kernel function or None when its package is absent or refuses this stack). On the first CUDA call of
an op, ``select`` loads the candidates in turn and keeps the first that also passes the op's own
check against its reference (forward and backward on a small problem, on that device); the answer
is cached per op and device. A candidate that fails to load, raises or differs is skipped with one
warning naming it and why, so a wrong kernel is never used silently. Off CUDA (and when no
candidate passes) the op runs its reference, the chunked PyTorch form. dimshard's own Triton chunk
kernels slot in here as further candidates.

Known refusals are checked before any kernel runs: flash-linear-attention states that Triton >= 3.4.0
and < 3.7.1 produces incorrect gated-delta-rule gradients on Hopper (compute capability 9.x);
``fla_refusal`` reports that stack without calling the kernel.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings
from collections.abc import Callable

import torch

Candidate = tuple[str, Callable[[], "Callable | None"]]


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def fla_refusal(device: torch.device, gated: bool) -> str | None:
    """Why flash-linear-attention must not run a (gated) op on ``device`` with the installed Triton, or None."""
    if importlib.util.find_spec("fla") is None:
        return "flash-linear-attention (fla) is not installed"
    try:
        import triton
    except ImportError:
        return "Triton is not installed"
    major, _ = torch.cuda.get_device_capability(device)
    if gated and major == 9 and (3, 4, 0) <= _version(triton.__version__) < (3, 7, 1):
        return (f"fla's gated chunk backward is incorrect with Triton {triton.__version__} on Hopper "
                "(fla: Triton >= 3.4.0 and < 3.7.1)")
    return None


def load_attribute(module: str, name: str) -> Callable | None:
    """``module.name`` when the module imports (its package installed and built for this stack), else None."""
    try:
        return getattr(importlib.import_module(module), name, None)
    except Exception:  # noqa: BLE001 — any import failure (missing package, ABI, Triton) means "not available"
        return None


_CHOSEN: dict[tuple[str, str], tuple[str, Callable] | None] = {}


def select(op: str, device: torch.device, candidates: list[Candidate],
           check: Callable[[Callable, torch.device], float], tolerance: float) -> tuple[str, Callable] | None:
    """The first candidate of ``op`` that loads and whose ``check(kernel, device)`` error is within ``tolerance``.

    Returns (name, kernel) or None (run the reference). CUDA only; cached per op and device.
    """
    if device.type != "cuda":
        return None
    key = (op, str(device))
    if key not in _CHOSEN:
        _CHOSEN[key] = _first_passing(op, device, candidates, check, tolerance)
    return _CHOSEN[key]


def _first_passing(op: str, device: torch.device, candidates: list[Candidate],
                   check: Callable[[Callable, torch.device], float],
                   tolerance: float) -> tuple[str, Callable] | None:
    for name, load in candidates:
        kernel = load()
        if kernel is None:
            continue
        try:
            error = check(kernel, device)
        except Exception as exc:  # noqa: BLE001 — a kernel that raises on this stack is skipped, with the reason
            _warn_once(op, f"{name} raised {type(exc).__name__}: {str(exc)[:200]}")
            continue
        if error <= tolerance:
            return name, kernel
        _warn_once(op, f"{name} differs from the reference by {error:.3g} (tolerance {tolerance:g})")
    return None


@functools.cache
def _warn_once(op: str, why: str) -> None:
    warnings.warn(f"dimshard {op}: {why}; running the PyTorch reference instead", stacklevel=3)


def relative_error(run_kernel: Callable[..., torch.Tensor], run_reference: Callable[..., torch.Tensor],
                   inputs: list[torch.Tensor]) -> float:
    """Largest error of ``run_kernel`` against ``run_reference`` on ``inputs``, output and every input gradient,
    each relative to the reference tensor's largest entry (a check for ``select``)."""
    def forward_backward(run: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        out = run(*leaves)
        weights = torch.linspace(-1.0, 1.0, out.numel(), device=out.device, dtype=torch.float32).view(out.shape)
        (out.float() * weights).sum().backward()
        return [out.detach().float()] + [x.grad.float() for x in leaves if x.grad is not None]

    worst = 0.0
    for got, want in zip(forward_backward(run_kernel), forward_backward(run_reference), strict=True):
        scale = want.abs().max().clamp_min(1e-6)
        worst = max(worst, float(((got - want).abs().max() / scale).item()))
    return worst
