"""plan_report.md's "FP8" section: which linears run their products in FP8, and why the others do not."""

from __future__ import annotations

from pathlib import Path

from ..search.fp8_choice import Fp8Choice


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:,.1f} us"


def report_lines(choice: Fp8Choice) -> list[str]:
    """Markdown lines of the section (none when FP8 is off and no op asks for it)."""
    if choice.mode == "off" and not choice.decisions:
        return []
    chosen = sum(d.fp8 for d in choice.decisions)
    lines = ["", "## FP8", "",
             f"`--fp8 {choice.mode}`, recipe `{choice.recipe}` (docs/design.md, \"FP8\"): {chosen} of "
             f"{len(choice.decisions)} linear layers run their products in FP8; weights, gradients, "
             f"checkpoints and exports keep their dtype. Estimated saving: {_us(choice.saved_s)} per step "
             "(not in the step estimate above)."]
    if choice.unavailable:
        lines += ["", f"FP8 unavailable: {choice.unavailable}."]
    lines += ["", "| op | scope | local m x n x k | FP8 | bf16 time | FP8 time | why |", "|---|---|---|---|---|---|---|"]
    for d in choice.decisions:
        m, n, k = d.local_mnk
        lines.append(f"| {d.op_index} | `{d.scope}` | {m} x {n} x {k} | {'yes' if d.fp8 else 'no'} | "
                     f"{_us(d.bf16_s)} | {_us(d.fp8_s)} | {d.reason} |")
    return lines


def append_fp8_report(path: Path, choice: Fp8Choice) -> None:
    """Append the section to the plan report at ``path`` (nothing when there is nothing to say)."""
    lines = report_lines(choice)
    if lines:
        with Path(path).open("a") as report:
            report.write("\n".join(lines) + "\n")
