"""Hugging Face glue for the compile stage: configs, models on the meta device, the training loss."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100


def load_config(model_id: str) -> Any:
    """The model config from a local folder, a config.json path, or (only if named) a hub id."""
    from transformers import AutoConfig

    path = Path(model_id)
    if path.is_file() and path.suffix == ".json":
        config_dict, _ = AutoConfig.get_config_dict(str(path))
        return AutoConfig.for_model(**config_dict)
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model_id} has no config.json: point --model_id at a Hugging Face model folder")
    return AutoConfig.from_pretrained(model_id)


def build_on_meta(config: Any) -> torch.nn.Module:
    """A causal LM of ``config`` with parameters on the meta device: no memory, built in a second.

    Buffers end up on meta too; the compile stage rebuilds the ones it needs (rotary tables)
    from the config. Attention is dimshard's (``attn_implementation="dimshard"``, see
    ``kernels/hf_attention.py``): one traced op per layer that takes sliding windows, logit
    soft-capping and document ids, and no mask tensor.
    """
    from transformers import AutoModelForCausalLM

    from dimshard.kernels.hf_attention import register

    name = register()
    config._attn_implementation = name
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation=name)


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token targets: position i gets labels[i + 1]; the last position is ignored."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)


def chunked_causal_lm_forward(chunk_size: int | None = None) -> Callable[..., torch.Tensor]:
    """A ``forward_fn`` for ``compile_model``: decoder, then the chunked linear cross-entropy.

    ``chunk_size`` tokens per chunk of logits; None or 0: the kernel's automatic choice.

    Returns the mean loss over non-ignored next-token targets, like the model's own loss, but
    never materialises the [batch, sequence, vocabulary] logits. Packed documents: the optional
    ``position_ids`` and ``document_ids`` [b, l] inputs (runtime/data_loader.py's batches under
    --document_masking) go to the decoder, whose "dimshard" attention keeps documents apart.
    """
    from dimshard.kernels import chunk_linear_cross_entropy

    chunk_size = chunk_size or None

    def forward(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        packed = {name: value for name, value in (("position_ids", position_ids), ("document_ids", document_ids))
                  if value is not None}
        hidden = model.get_decoder()(input_ids=input_ids, use_cache=False, **packed).last_hidden_state
        targets = shift_labels(labels)
        per_token = chunk_linear_cross_entropy(hidden, model.get_output_embeddings().weight, targets,
                                               IGNORE_INDEX, chunk_size)
        return per_token.sum() / targets.ne(IGNORE_INDEX).sum()

    return forward
