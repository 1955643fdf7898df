"""Hugging Face glue for the compile stage: configs, models on the meta device, the training loss."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100


def load_config(model_id: str) -> Any:
    """The model config from a local folder, a config.json path, or (only if named) a hub id."""
    from transformers import AutoConfig

    path = Path(model_id)
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model_id} has no config.json: point --model_id at a Hugging Face model folder")
    try:
        if path.is_file() and path.suffix == ".json":
            config_dict, _ = AutoConfig.get_config_dict(str(path))
            return AutoConfig.for_model(**config_dict)
        return AutoConfig.from_pretrained(model_id)
    except Exception as error:  # invalid JSON, unknown model_type, inconsistent sizes (transformers' own types)
        reason = " ".join(str(error).split())[:300]
        raise ValueError(f"cannot load the model config of {model_id} ({type(error).__name__}: {reason}); the "
                         "config.json is partial, corrupt or not a model config: restore it, or point --model_id "
                         "at a complete Hugging Face model folder") from None


class UnsupportedModelError(ValueError):
    """The model's architecture is one dimshard cannot partition yet; the message says why and what to do."""


# Config fields that give a mixture-of-experts model its number of (routed) experts.
_EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
                  "n_experts", "ffn_num_experts")


def mixture_of_experts_sign(config: Any) -> str | None:
    """The config field that makes ``config`` a mixture-of-experts model (``num_local_experts=8``), or None."""
    from transformers import PretrainedConfig

    # Sub-configs too: a text_config, DBRX's ffn_config.
    configs = [config] + [v for v in vars(config).values() if isinstance(v, PretrainedConfig)]
    for c in configs:
        signs = [f"{name}={getattr(c, name)}" for name in _EXPERT_FIELDS
                 if isinstance(getattr(c, name, None), int) and getattr(c, name) > 1]
        if getattr(c, "moe_intermediate_size", None):
            signs.append(f"moe_intermediate_size={c.moe_intermediate_size}")
        if "moe" in str(getattr(config, "model_type", "")):
            signs.append(f"model_type {config.model_type}")
        if signs:
            return signs[0]
    return None


def unsupported_reason(config: Any) -> str | None:
    """Why dimshard cannot compile a model of ``config`` (a mixture of experts it cannot express), or None."""
    sign = mixture_of_experts_sign(config)
    if sign is None or experts_interface_used(config):
        return None  # dense, or experts that run as dimshard's experts op (docs/design.md, "Mixture of experts")
    return (f"{config.model_type} is a mixture-of-experts model ({sign}) whose experts are a loop over expert "
            "modules, not transformers' experts interface (@use_experts_implementation), so they cannot run as "
            "dimshard's experts op: pick a family docs/models.md lists as supported")


def experts_interface_used(config: Any) -> bool:
    """Whether the causal LM of ``config`` runs its experts through transformers' experts interface.

    Those models call ``experts_implementation="dimshard"`` (``kernels/hf_experts.py``), one op per
    MoE layer; transformers' own check reads the modeling source for ``@use_experts_implementation``.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (KeyError, ValueError):
        return False
    can_set = getattr(model_class, "_can_set_experts_implementation", None)
    return bool(can_set is not None and can_set())


def check_supported(config: Any) -> None:
    """Raise UnsupportedModelError (one line: what and what to do) for an architecture dimshard cannot compile."""
    reason = unsupported_reason(config)
    if reason is not None:
        raise UnsupportedModelError(reason)


# Buffers above this many elements are built on meta too (a max_positions^2 mask would not fit).
_REAL_BUFFER_LIMIT = 1 << 26


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Inside: every parameter a module registers moves to the meta device; buffers stay real (small ones).

    Parameters are created as the module's code creates them (uninitialised CPU memory that is
    never touched) and replaced at registration, so their initialisation runs on meta, for free;
    buffers (rotary tables, Gemma's embedding scale) keep the values the model computes.
    """
    register_parameter, register_buffer = torch.nn.Module.register_parameter, torch.nn.Module.register_buffer

    def parameter_on_meta(module: torch.nn.Module, name: str, param: Any) -> None:
        if param is not None and not param.is_meta:
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def buffer_in_reach(module: torch.nn.Module, name: str, tensor: Any, persistent: bool = True) -> None:
        if isinstance(tensor, torch.Tensor) and tensor.numel() > _REAL_BUFFER_LIMIT:
            tensor = tensor.to("meta")
        register_buffer(module, name, tensor, persistent)

    torch.nn.Module.register_parameter = parameter_on_meta  # type: ignore[method-assign]
    torch.nn.Module.register_buffer = buffer_in_reach  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
        torch.nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]


def build_on_meta(config: Any) -> torch.nn.Module:
    """A causal LM of ``config`` with parameters on the meta device: no memory, built in a second.

    Buffers are real (the values the model computes: rotary tables, embedding scales), except
    any above 2**26 elements, which go to meta and are rebuilt by the compile stage from the
    config if the graph reads them. Attention is dimshard's (``attn_implementation="dimshard"``, see
    ``kernels/hf_attention.py``): one traced op per layer that takes sliding windows, logit
    soft-capping and document ids, and no mask tensor (a family that picks its attention class
    from a fixed table keeps its eager one). Experts are dimshard's too (``experts_implementation="dimshard"``,
    ``kernels/hf_experts.py``) where the family uses transformers' experts interface. Raises
    UnsupportedModelError for a mixture-of-experts config whose experts do not.
    """
    from transformers import AutoModelForCausalLM

    from dimshard.kernels.hf_attention import register

    check_supported(config)
    name = register()
    config._attn_implementation = name
    if experts_interface_used(config):
        from dimshard.kernels.hf_experts import register as register_experts

        config._experts_implementation = register_experts()
    with _parameters_on_meta():
        try:
            return AutoModelForCausalLM.from_config(config, attn_implementation=name)
        except KeyError as error:
            if error.args != (name,):
                raise
        # A family that picks its attention class by name from a fixed table (GPT-Neo; GPT-J and
        # Falcon in transformers 5.17) keeps its eager attention, traced op by op, as
        # tests/test_model_breadth.py checks it.
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.set_attn_implementation(name)
    return model


def checkpoint_names(model: torch.nn.Module) -> dict[str, str]:
    """Where ``save_pretrained`` puts each weight: ``{state-dict name: key in model.safetensors}``.

    Covers every parameter (under the name ``named_parameters`` gives it, i.e. a tied weight
    once) and every persistent buffer. transformers 5 renames some weights between module and
    file (GPT-NeoX's ``lm_head`` is ``embed_out`` on disk, EXAONE's layers are ``transformer.h``:
    its ``conversion_mapping.py``) and writes a tied weight once, under the name it keeps; the
    keys come from transformers' own save path (its tied-weight removal, then its reverted key
    conversion), so they follow the installed version. A weight transformers converts on load
    (fused or split tensors) rather than renames is left out. Empty for a model that is not a
    transformers ``PreTrainedModel``.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return {}
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    # A renamed weight keeps its tensor object; converted ones are new tensors and match nothing.
    state_name = {id(tensor): name for name, tensor in state.items()}
    on_disk = {state_name[id(tensor)]: key for key, tensor in revert_weight_conversion(model, dict(state)).items()
               if id(tensor) in state_name}
    # The state dict may keep a tied weight under another of its names than named_parameters' first one.
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(param), name)
    alias = {name: first[id(param)] for name, param in model.named_parameters(remove_duplicate=False)}
    return {alias.get(name, name): key for name, key in on_disk.items()}


@dataclass
class OutputHead:
    """What a causal LM's final projection computes: ``softcap(logit_scale * (h @ weight.T + bias))``.

    ``weight`` is the output embedding (the input embedding when tied); None fields are absent.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float | None = None
    softcap: float | None = None


# Families whose causal-LM head scales the logits by a config number: model_type -> (field, divides).
_LOGIT_SCALES = {
    "cohere": ("logit_scale", False), "cohere2": ("logit_scale", False), "granite": ("logits_scaling", True),
    "granite_swa": ("logits_scaling", True), "hyperclovax": ("logits_scaling", False),
    # MiniCPM3 divides the hidden states; its head has no bias, so that is the logits divided.
    "minicpm3": ("logits_scaling", True),
}


def output_head(model: torch.nn.Module) -> OutputHead:
    """The final projection of ``model`` as the chunked loss takes it: weight, bias, logit scale, soft-cap.

    Reads the output embedding module (its weight and bias), the family's logit scaling
    (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``, ...) and
    ``final_logit_softcapping`` (Gemma 2 and later) from the model's config.
    """
    head = model.get_output_embeddings()
    config = model.config
    scale = None
    field_name, divides = _LOGIT_SCALES.get(getattr(config, "model_type", ""), (None, False))
    if field_name is not None and getattr(config, field_name, None) is not None:
        value = float(getattr(config, field_name))
        scale = 1.0 / value if divides else value
    softcap = getattr(config, "final_logit_softcapping", None)
    bias = getattr(head, "bias", None)
    return OutputHead(head.weight, bias if isinstance(bias, torch.Tensor) else None, scale,
                      None if softcap is None else float(softcap))


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token targets: position i gets labels[i + 1]; the last position is ignored."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)


def chunked_causal_lm_forward(chunk_size: int | None = None) -> Callable[..., torch.Tensor]:
    """A ``forward_fn`` for ``compile_model``: decoder, then the chunked linear cross-entropy.

    ``chunk_size`` tokens per chunk of logits; None or 0: the kernel's automatic choice.

    Returns the mean loss over non-ignored next-token targets, like the model's own loss, but
    never materialises the [batch, sequence, vocabulary] logits. Packed documents: the optional
    ``position_ids`` and ``document_ids`` [b, l] inputs (runtime/data/packed_loader.py's batches under
    --document_masking) go to the decoder, whose "dimshard" attention keeps documents apart.
    """
    from dimshard.kernels import chunk_linear_cross_entropy

    from .hf_mixers import recurrent_mixers

    chunk_size = chunk_size or None

    def forward(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        packed = {name: value for name, value in (("position_ids", position_ids), ("document_ids", document_ids))
                  if value is not None}
        # Recurrent mixers run dimshard's scan and convolution ops: one op each (docs/design.md, "Recurrent layers").
        with recurrent_mixers(model):
            decoded = model.get_decoder()(input_ids=input_ids, use_cache=False, **packed)
        hidden = decoded.last_hidden_state
        targets = shift_labels(labels)
        head = output_head(model)
        per_token = chunk_linear_cross_entropy(hidden, head.weight, targets, IGNORE_INDEX, chunk_size, bias=head.bias,
                                               logit_scale=head.logit_scale, softcap=head.softcap)
        loss = per_token.sum() / targets.ne(IGNORE_INDEX).sum()
        aux_loss = router_aux_loss(model, decoded)
        return loss if aux_loss is None else loss + aux_loss

    return forward


def router_aux_loss(model: torch.nn.Module, decoded: Any) -> torch.Tensor | None:
    """The mixture-of-experts load-balancing term the model's own loss adds, or None where it adds none.

    With ``config.output_router_logits`` the decoder returns each MoE layer's router logits and a
    transformers MoE causal LM adds ``router_aux_loss_coef * load_balancing_loss_func(...)``: the
    same function of its modeling module is called here, with the model's own numbers, so the
    chunked loss equals the model's (docs/design.md, "Mixture of experts").
    """
    import sys

    router_logits = getattr(decoded, "router_logits", None)
    if not router_logits or not getattr(model.config, "output_router_logits", False):
        return None
    balance = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
    coefficient = getattr(model, "router_aux_loss_coef", None)
    if balance is None or coefficient is None:
        return None
    return coefficient * balance(router_logits, model.num_experts, model.num_experts_per_tok, None)
