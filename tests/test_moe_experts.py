"""The experts op (kernels/moe) against plain PyTorch and Hugging Face, its split math, rules and cost."""

from __future__ import annotations

import copy

import pytest
import torch

from dimshard.kernels.moe import experts_reference, grouped_mm, grouped_mm_reference, moe_experts
from dimshard.kernels.moe.experts import CLAMPED_SWIGLU, _experts_grouped
from dimshard.kernels.moe.routing import histc

TOKENS, HIDDEN, WIDTH, EXPERTS, TOP_K = 24, 16, 8, 4, 2
VARIANTS = [  # (gated, interleaved, transposed, biased, activation)
    (True, False, False, False, "silu"),
    (True, True, True, True, CLAMPED_SWIGLU),  # gpt-oss
    (False, False, False, True, "gelu_pytorch_tanh"),
]


def _inputs(gated: bool, transposed: bool, biased: bool, seed: int = 0) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    up = 2 * WIDTH if gated else WIDTH
    hidden = torch.randn(TOKENS, HIDDEN, generator=g)
    scores = torch.randn(TOKENS, EXPERTS, generator=g).softmax(-1)
    weights, index = scores.topk(TOP_K, dim=-1)
    gate_up = torch.randn(EXPERTS, *((HIDDEN, up) if transposed else (up, HIDDEN)), generator=g) * 0.3
    down = torch.randn(EXPERTS, *((WIDTH, HIDDEN) if transposed else (HIDDEN, WIDTH)), generator=g) * 0.3
    biases = [torch.randn(EXPERTS, up, generator=g), torch.randn(EXPERTS, HIDDEN, generator=g)] if biased else [None] * 2
    return [hidden, index, weights, torch.arange(EXPERTS), gate_up, down, *biases]


def _options(gated: bool, interleaved: bool, transposed: bool, activation: str) -> dict:
    extra = dict(swiglu_alpha=1.702, swiglu_limit=0.5) if activation == CLAMPED_SWIGLU else {}
    return dict(gated=gated, interleaved=interleaved, transposed=transposed, activation=activation, **extra)


def _value_and_grads(fn, inputs, options) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    leaves = [t.clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
    out = fn(*leaves, **options)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return out.detach(), [t.grad if t is not None and t.requires_grad else None for t in leaves]


@pytest.mark.smoke
@pytest.mark.parametrize("gated,interleaved,transposed,biased,activation", VARIANTS)
def test_expert_shards_sum_to_the_whole(gated, interleaved, transposed, biased, activation):
    """Split over experts, each shard's output is a partial sum: the shards add up to the whole, gradients too."""
    inputs = _inputs(gated, transposed, biased)
    options = _options(gated, interleaved, transposed, activation)
    whole, whole_grads = _value_and_grads(moe_experts, inputs, options)
    total, grads = torch.zeros_like(whole), [torch.zeros_like(t) if t is not None else None for t in inputs]
    for shard in (slice(0, 1), slice(1, 3), slice(3, 4)):  # uneven on purpose: any slice of experts
        part = [t if i < 3 or t is None else t[shard] for i, t in enumerate(inputs)]
        out, part_grads = _value_and_grads(moe_experts, part, options)
        total += out
        for i, g in enumerate(part_grads):
            if g is not None:
                if i < 3:
                    grads[i] += g
                else:
                    grads[i][shard] += g
    torch.testing.assert_close(total, whole, atol=1e-5, rtol=1e-5)
    for mine, reference in zip(grads, whole_grads):
        if reference is not None:
            torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gated,interleaved,transposed,biased,activation", VARIANTS)
def test_grouped_path_equals_the_loop(gated, interleaved, transposed, biased, activation):
    """The sorted, grouped-product path (CUDA's) equals the per-expert loop, values and gradients, on a shard."""
    inputs = _inputs(gated, transposed, biased, seed=1)
    inputs = inputs[:3] + [t[1:3] if t is not None else None for t in inputs[3:]]  # experts 1 and 2 only
    options = _options(gated, interleaved, transposed, activation)
    out, grads = _value_and_grads(_experts_grouped, inputs, options)
    ref, ref_grads = _value_and_grads(experts_reference, inputs, options)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for mine, reference in zip(grads, ref_grads):
        if reference is not None:
            torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-5)


def test_unpicked_experts_still_get_zero_gradients():
    inputs = _inputs(True, False, False)
    inputs[3] = torch.arange(EXPERTS, EXPERTS + 2)  # ids no token picked
    inputs[4], inputs[5] = inputs[4][:2], inputs[5][:2]
    out, grads = _value_and_grads(moe_experts, inputs, _options(True, False, False, "silu"))
    assert not out.any() and not grads[4].any() and grads[4].shape == inputs[4].shape


def test_grouped_mm_reference_and_dispatch():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(10, 8, generator=g), torch.randn(3, 8, 5, generator=g)
    offsets = torch.tensor([4, 4, 9], dtype=torch.int32)  # an empty group and a trailing row past the last
    expected = torch.cat([x[:4] @ w[0], x[4:9] @ w[2], torch.zeros(1, 5)])
    torch.testing.assert_close(grouped_mm_reference(x, w, offsets), expected)
    torch.testing.assert_close(grouped_mm(x, w, offsets), expected)  # CPU: the reference


@pytest.mark.smoke
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss", "olmoe"])
def test_hugging_face_experts_match(family):
    """A whole tiny model with experts_implementation="dimshard" equals its eager experts: loss and gradients.

    gpt_oss is here for its biases and clamped SwiGLU (its attention sinks keep it from compiling).
    """
    from test_moe_families import moe_config
    from transformers import AutoModelForCausalLM

    from dimshard.kernels.hf_experts import register

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(moe_config(family, True), attn_implementation="eager").float()
    with torch.no_grad():
        for p in reference.parameters():
            if not p.any():
                p.normal_(0.0, 0.5)
    reference.config._experts_implementation = "eager"
    ours = copy.deepcopy(reference)
    ours.set_experts_implementation(register())
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for model in (reference, ours):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-5
    for (name, a), b in zip(reference.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_rules():
    from dimshard.planner.ops.registry import OpCall, TensorMeta, get_rule, op_record

    f32, i64 = torch.float32, torch.int64

    def call(name, args, kwargs, shapes, outs):
        metas = [TensorMeta(s, f32) for s in shapes]
        return OpCall(name, args, kwargs, metas, [TensorMeta(s, i64) for s in outs])

    experts = op_record("dimshard.kernels.moe.experts.moe_experts")
    assert experts.cost == "grouped_matmul" and experts.role == "experts"
    shapes = [(8, 4), (8, 2), (8, 2), (3,), (3, 6, 4), (3, 4, 3)]
    assert experts.rule(call("moe_experts", (), {}, shapes, [(8, 4)])) == \
        "t d^, t k^, t k^, e, e g^ d^, e d^ f^ -> t d^"
    assert experts.rule(call("moe_experts", (), {"transposed": True, "gate_up_bias": 1, "down_bias": 1},
                             shapes, [(8, 4)])) == "t d^, t k^, t k^, e, e d^ g^, e f^ d^, e g^, e d^ -> t d^"
    assert get_rule("torch.topk")(call("torch.topk", ("x", 2), {"dim": -1}, [(8, 4)], [(8, 2), (8, 2)])) == \
        "d0 d1^ -> d0 k^, d0 k^"
    assert get_rule("torch.histc")(call("torch.histc", (), {}, [(16,)], [(4,)])) == "d0 -> b^"
    assert get_rule("torch.Tensor.scatter_")(call("scatter_", ("x", 1), {}, [(8, 4), (8, 2)], [(8, 4)])) == \
        "d0 d1^, d0 s^ -> d0 d1^"


def test_histc_drop_in_counts_integers_on_cpu():
    picks = torch.tensor([0, 3, 3, 1, 3], dtype=torch.int32)
    counts = histc(picks, bins=4, min=0, max=3)
    assert counts.tolist() == [1, 1, 0, 3] and counts.dtype == torch.int32
    torch.testing.assert_close(histc(picks.float(), bins=4, min=0, max=3), torch.histc(picks.float(), 4, 0, 3))


def test_bincount_has_a_meta_kernel_of_minlength_bins():
    """transformers 5.17 counts expert picks with bincount: the trace runs it on meta, sized by minlength."""
    picks = torch.empty(12, dtype=torch.int64, device="meta")
    assert torch.bincount(picks, minlength=4).shape == (4,)
    assert torch.bincount(picks, torch.empty(12, device="meta"), minlength=4).dtype == torch.float32
    with pytest.raises(NotImplementedError, match="minlength"):
        torch.bincount(picks)
    assert torch.bincount(torch.tensor([0, 3, 3]), minlength=2).tolist() == [1, 0, 0, 2]  # CPU untouched


def test_cost_prices_the_local_share_of_experts():
    from dimshard.planner.cost.op_costs import EXPERT_IMBALANCE, grouped_matmul_flops

    whole = [(32, 64), (32, 2), (32, 2), (8,), (8, 256, 64), (8, 64, 128)]
    half = whole[:3] + [(4,), (4, 256, 64), (4, 64, 128)]
    flops = grouped_matmul_flops(whole, 8)
    assert flops == 2.0 * 32 * 2 * (256 * 64 + 64 * 128)
    assert grouped_matmul_flops(half, 8) == pytest.approx(flops / 2 * EXPERT_IMBALANCE)


def test_grouped_path_only_takes_consecutive_expert_ids():
    from dimshard.kernels.moe.experts import _consecutive

    assert _consecutive(torch.arange(4, 8)) and not _consecutive(torch.tensor([0, 2]))
    assert not _consecutive(torch.arange(0))


def test_backward_keeps_no_more_than_the_inputs():
    """The op recomputes its experts in backward: autograd keeps at most its inputs (the cost model's "inputs")."""
    leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in _inputs(True, False, False)[:6]]
    options = _options(True, False, False, "silu")

    def saved_numel(fn) -> int:
        saved: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            assert fn(*leaves, **options).requires_grad
        return sum(saved)

    inputs_numel = sum(t.numel() for t in leaves)
    assert saved_numel(moe_experts) <= inputs_numel
    assert saved_numel(experts_reference) > inputs_numel  # the loop alone keeps its intermediates


def _check_dispatched_equals_unsplit() -> None:
    """One rank: its tokens and its slice of the experts through the all-to-all form, against the unsplit op."""
    import torch.distributed as dist

    from dimshard.kernels.moe.dispatch import moe_experts_dispatched
    from dimshard.runtime import comm

    ranks, rank = dist.get_world_size(), dist.get_rank()
    for variant in VARIANTS:
        gated, interleaved, transposed, biased, activation = variant
        inputs = _inputs(gated, transposed, biased, seed=3)
        inputs[1][: TOKENS // ranks] = 0  # rank 0's tokens all pick expert 0 first: uneven counts
        options = _options(gated, interleaved, transposed, activation)
        whole, whole_grads = _value_and_grads(moe_experts, inputs, options)
        tokens = slice(rank * TOKENS // ranks, (rank + 1) * TOKENS // ranks)
        experts = slice(rank * EXPERTS // ranks, (rank + 1) * EXPERTS // ranks)
        mine = [t[tokens] if i < 3 else t[experts] if t is not None else None for i, t in enumerate(inputs)]
        leaves = [t.clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in mine]
        out = moe_experts_dispatched(*leaves, group=None, comm=comm, **options)
        out.backward(torch.linspace(-1, 1, whole.numel()).view_as(whole)[tokens])
        torch.testing.assert_close(out, whole[tokens], atol=1e-5, rtol=1e-5, msg=str(variant))
        for i, (leaf, reference) in enumerate(zip(leaves, whole_grads)):
            if reference is not None:
                expected = reference[tokens] if i < 3 else reference[experts]
                torch.testing.assert_close(leaf.grad, expected, atol=1e-5, rtol=1e-5, msg=f"{variant} input {i}")


@pytest.mark.parametrize("world_size", [2, 4])
def test_dispatched_experts_equal_the_unsplit_op(world_size):
    """Tokens and experts split over the same ranks, pairs sent by all-to-all: output and every gradient
    equal the unsplit op's on this rank's tokens and experts (uneven counts, every weight variant)."""
    from dist_utils import run_distributed

    run_distributed(_check_dispatched_equals_unsplit, world_size, timeout_s=120)


def test_route_to_ranks_orders_pairs_by_destination():
    from dimshard.kernels.moe.dispatch import route_to_ranks

    order, counts = route_to_ranks(torch.tensor([[3, 0], [1, 2], [0, 3]]), experts_per_rank=2, ranks=2)
    assert counts.tolist() == [3, 3] and order.tolist() == [1, 2, 4, 0, 3, 5]


def test_dispatch_cost_against_gather_and_reduce_scatter():
    """All-to-all bytes are tokens x hidden x top-k per direction (x the imbalance); gather + reduce-scatter
    moves the axis' tokens twice, whatever k: the dispatch is cheaper at top-2 and dearer at top-8 on 8 ranks."""
    from dimshard.planner.cost.hardware import load_hw_profile
    from dimshard.planner.cost.op_costs import EXPERT_IMBALANCE, redistribution_cost, token_dispatch_cost
    from dimshard.planner.plan.placements import PARTIAL, REPLICATE, Mesh, Shard

    hw, mesh, tokens, hidden = load_hw_profile("h100"), Mesh(("ep",), (8,)), 4096, 2048
    gathered = redistribution_cost((8 * tokens, hidden), 2, (Shard(0),), (REPLICATE,), mesh, hw, True)
    reduced = redistribution_cost((8 * tokens, hidden), 2, (PARTIAL,), (Shard(0),), mesh, hw, True)
    gather_s = gathered.forward_s + gathered.backward_s + reduced.forward_s + reduced.backward_s
    for slots, cheaper in ((2, True), (8, False)):
        cost = token_dispatch_cost(tokens, hidden, slots, 2, mesh, 0, hw)
        assert [b for _, _, b, _ in cost.forward] == [tokens * slots * hidden * 2 * EXPERT_IMBALANCE * 7 // 8] * 2
        assert ((cost.forward_s + cost.backward_s) < gather_s) == cheaper, slots
    assert token_dispatch_cost(tokens, hidden, 2, 2, Mesh(("ep",), (1,)), 0, hw).forward == ()


def test_autograd_graph_does_not_depend_on_the_routing():
    """One node with the same edges whether the rank's experts were picked or not: ranks holding different
    experts must build the same graph, or the backward's collectives on two groups may run in different orders."""
    def node(expert_ids: torch.Tensor):
        inputs = _inputs(True, False, False)
        inputs[3], inputs[4], inputs[5] = expert_ids, inputs[4][:2], inputs[5][:2]
        leaves = [t.clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
        return moe_experts(*leaves, **_options(True, False, False, "silu")).grad_fn

    hit, missed = node(torch.arange(2)), node(torch.arange(EXPERTS, EXPERTS + 2))
    assert type(hit) is type(missed) and len(hit.next_functions) == len(missed.next_functions)
    assert all(type(a[0]) is type(b[0]) for a, b in zip(hit.next_functions, missed.next_functions))
