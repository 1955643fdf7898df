"""Transformers' causal-LM families, each with a status for dimshard and a tiny config to test it with.

The list is transformers' own (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), so a newer transformers
brings its new families into tests/test_model_breadth.py by itself. ``family_status`` sorts each
into: ``dense`` (a dense decoder-only LM: it must trace, compile and match Hugging Face),
``moe`` (mixture of experts: ``MOE_EXPERTS_OP`` when its experts run as dimshard's experts op, else
refused at compile time with planner.graph.hf's message) or
``other`` (not a dense decoder-only LM, or needing something beyond dimshard's ops; with the
reason).
"""

from __future__ import annotations

import functools
from typing import Any

# Tiny sizes every family gets where its config has the field: heads split over 2 ranks, a
# sliding window shorter than the test sequence, a vocabulary small enough for fast references.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64)
SEQUENCE = 16
WINDOW = 6
# Per-family fields beyond TINY (rotary dims within the head, windows on, MLA ranks).
EXTRA = {
    "gptj": {"rotary_dim": 8}, "codegen": {"rotary_dim": 8},
    "qwen2": {"use_sliding_window": True, "max_window_layers": 1, "sliding_window": WINDOW},
    "qwen3": {"use_sliding_window": True, "max_window_layers": 1, "sliding_window": WINDOW},
    "mistral": {"sliding_window": WINDOW}, "ministral": {"sliding_window": WINDOW},
    "phi3": {"sliding_window": WINDOW}, "starcoder2": {"sliding_window": WINDOW},
    "gemma2": {"sliding_window": WINDOW, "query_pre_attn_scalar": 16},
    "gemma3_text": {"sliding_window": WINDOW, "query_pre_attn_scalar": 16},
    "cohere2": {"sliding_window": WINDOW},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": WINDOW},
    # Multi-head latent attention: small ranks, the rotary part within the head.
    **{name: {"head_dim": 8, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "kv_lora_rank": 16,
              "q_lora_rank": 32, "num_key_value_heads": 4} for name in ("minicpm3", "youtu")},
    # Per-layer head dims: the family's own (None drops a TINY field).
    # Per-layer input embeddings: a small vocabulary there too (the default, 262144, is 134M parameters).
    "gemma4_text": {"head_dim": None, "vocab_size_per_layer_input": 128},
    "gemma4_unified_text": {"head_dim": None, "vocab_size_per_layer_input": 128},
    # Recurrent mixers (kernels/recurrent/): head groups that split over 4 ranks, chunks shorter than the
    # sequence, small states; one recurrent and one attention layer in the hybrids.
    "mamba": {"state_size": 8, "time_step_rank": 8},
    "falcon_mamba": {"state_size": 8, "time_step_rank": 8},
    "mamba2": {"num_heads": 8, "head_dim": 16, "n_groups": 4, "state_size": 8, "chunk_size": 8, "time_step_rank": 8},
    "bamba": {"mamba_n_heads": 8, "mamba_d_head": 16, "mamba_n_groups": 4, "mamba_d_state": 8, "mamba_chunk_size": 8,
              "attn_layer_indices": [1]},
    "falcon_h1": {"mamba_n_heads": 8, "mamba_d_head": 16, "mamba_n_groups": 4, "mamba_d_state": 8, "mamba_d_ssm": 128,
                  "mamba_chunk_size": 8},
    "lfm2": {"layer_types": ["conv", "full_attention"]}, "lfm3": {"layer_types": ["conv", "full_attention"]},
    # Qwen3.5's full attention fills its rotary table through a view (planner/graph/functionalize.py).
    "qwen3_5_text": {"layer_types": ["linear_attention", "full_attention"]},
}

# The reason of a mixture-of-experts family whose experts run as dimshard's experts op (kernels/moe).
MOE_EXPERTS_OP = ("its experts run as dimshard's experts op (transformers' experts interface); "
                  "tests/test_moe_families.py checks mixtral, qwen2_moe, qwen3_moe, glm4_moe, olmoe and deepseek_v3")
ENCODER_AS_DECODER = "a bidirectional encoder with an LM head (is_decoder), not a decoder-only LM"
STATE_SPACE = "state-space, recurrent or linear-attention layers (conv1d and scans): no op rules for them yet"
# Hybrids whose recurrent layers run as dimshard's recurrent ops but whose default config routes to experts.
HYBRID_EXPERTS = ("recurrent layers covered (tests/test_recurrent_families.py, experts turned off); its default "
                  "config routes to experts, which the mixture-of-experts work covers")
MULTIMODAL = "a multimodal model (vision, audio or speech tower): only its text decoder would be dense"
# Families that are not dense decoder-only LMs, or need more than dimshard's ops, with the reason.
OTHER = {
    **{name: ENCODER_AS_DECODER for name in (
        "bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert",
        "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta", "xlm-roberta-xl",
        "xmod", "xlm", "xlnet", "reformer", "modernbert-decoder")},
    **{name: STATE_SPACE for name in ("zamba", "zamba2", "rwkv", "recurrent_gemma", "xlstm", "qwen3_5")},
    **{name: HYBRID_EXPERTS for name in ("jamba", "qwen3_next", "granitemoehybrid", "nemotron_h")},
    **{name: "a hybrid whose default config routes to experts; no config of it without experts is tested yet"
       for name in ("bailing_hybrid", "lfm2_moe")},
    "olmo_hybrid": ("recurrent layers covered (tests/test_recurrent_families.py); its checkpoint holds the q/k/v "
                    "short convolutions as one tensor transformers converts on load, which plan.json's checkpoint "
                    "names leave out, so a save_pretrained folder does not load into train.py"),
    "kimi_linear": HYBRID_EXPERTS + "; its latent attention layers too (keys written into views)",
    **{name: MULTIMODAL for name in (
        "gemma3", "gemma3n", "gemma3n_text", "gemma4", "gemma4_unified", "mllama", "got_ocr2", "fuyu", "emu3", "git",
        "moshi", "musicgen", "musicgen_melody", "moss_transcribe_diarize", "phi4_multimodal", "blt",
        "dots3_note", "qwen4_exp", "minimax_m3_vl_text", "gemma4_assistant", "gemma4_unified_assistant")},
    "bloom": "ALiBi position biases: dimshard's attention takes no additive bias",
    "mpt": "ALiBi position biases: dimshard's attention takes no additive bias",
    "granite_swa": "attention sinks (s_aux): dimshard's attention has no sink logits",
    "gpt_oss": "attention sinks (s_aux): dimshard's attention has no sink logits (its experts, with biases and the "
               "clamped SwiGLU, run as dimshard's experts op: tests/test_moe_experts.py)",
    "dory": "a per-word learned logit scale in the output head: the chunked loss takes one scalar",
}


# Dense decoder-only families that do not pass yet, with why (tests/test_model_breadth.py expects them
# to fail and says so when one starts passing).
KNOWN_GAPS = {
    "hrm_text": "recurrent reasoning cycles run partly without gradient; the compiled gradient of its "
                "initial state differs",
    "trocr": "a parameter the training loss never reaches gets no gradient, which the runtime does not expect",
    "cohere_compass_text": "its config builds no model at other sizes (rotary parameters per layer type)",
    "cpmant": "its own attention (scores plus a relative position bias, masked_fill with 0-d tensors) compiles, "
              "but the loss under tp differs from Hugging Face's: not yet explained",
}


def tiny_config(model_type: str) -> Any:
    """A tiny config of ``model_type``: TINY sizes where the family has the field, dropouts 0, pad id 0."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.utils import logging

    logging.set_verbosity_error()  # tiny sizes make configs warn about token ids and rope factors
    cls = CONFIG_MAPPING[model_type]
    defaults = _defaults(model_type)
    # Fields of the config, or aliases of them (gpt2's n_embd answers to hidden_size); not properties.
    fields = set(defaults.to_dict()) | set(getattr(cls, "attribute_map", {}))
    kwargs = {k: v for k, v in TINY.items() if k in fields}
    kwargs.update(EXTRA.get(model_type, {}))
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    for name, value in defaults.to_dict().items():
        # Dropout would make the parallel run and the reference draw different masks.
        if isinstance(value, float) and ("dropout" in name or "pdrop" in name):
            kwargs[name] = 0.0
    if getattr(defaults, "pad_token_id", None) is not None:
        kwargs["pad_token_id"] = 0
    config = cls(**kwargs)
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= config.vocab_size:
            setattr(config, name, 1)
    return config


@functools.cache
def _defaults(model_type: str) -> Any:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]()


@functools.cache
def family_status(model_type: str) -> tuple[str, str]:
    """(``dense`` | ``moe`` | ``other``, reason) for a causal-LM model type."""
    from dimshard.planner.graph.hf import mixture_of_experts_sign, unsupported_reason

    if model_type in OTHER:
        return "other", OTHER[model_type]
    try:
        config = _defaults(model_type)
    except Exception as error:  # noqa: BLE001 — a config class that cannot build is listed, not fatal
        return "other", f"its default config does not build ({type(error).__name__}: {str(error)[:80]})"
    if getattr(config, "is_encoder_decoder", False):
        return "other", "an encoder-decoder model: its decoder is not a decoder-only LM"
    if mixture_of_experts_sign(config) is not None:
        return "moe", unsupported_reason(config) or MOE_EXPERTS_OP
    return "dense", ""


def causal_lm_families() -> list[str]:
    """Every model type transformers maps to a causal-LM class, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
