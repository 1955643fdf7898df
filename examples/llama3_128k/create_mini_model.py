"""Create a randomly initialised, smaller copy of a causal language model for debugging.

    python examples/llama3_128k/create_mini_model.py --model_id <model folder> --output_id ./llama3_mini
    python examples/llama3_128k/create_mini_model.py --model_id examples/llama3_128k/configs/llama3_8b.json \\
        --output_id ./llama3_tiny --num_hidden_layers 2 --hidden_size 64 --intermediate_size 128 \\
        --num_attention_heads 4 --num_key_value_heads 2 --vocab_size 2048 --tokenizer_path <tokenizer dir>

The mini model keeps the source architecture (model type, activation, rotary settings, norms) with
fewer decoder layers and the sizes you override. Its weights are random (seeded), saved as
safetensors with ``save_pretrained`` together with the tokenizer when one is available, so that
``AutoModelForCausalLM.from_pretrained(output_id)`` and ``AutoTokenizer.from_pretrained(output_id)``
load it offline. Only weights and config are made up: nothing is downloaded unless ``--model_id``
or ``--tokenizer_path`` names a hub id.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dimshard.cli import UserInputError, looks_like_local_path, parse_dataclass_args

# Files whose presence means a folder holds a tokenizer that AutoTokenizer can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Config fields a user may override; each is a flag of the same name.
SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size")


@dataclass
class MiniModelArgs:
    """Create a randomly initialised copy of a model with fewer layers (and optionally smaller sizes)."""

    model_id: str = field(metadata={
        "help": "source architecture: a model folder with config.json, a config .json file, or a hub id"})
    output_id: str = field(metadata={"help": "folder to save the mini model (and tokenizer) into"})
    num_hidden_layers: int = field(default=4, metadata={"help": "number of decoder layers of the mini model"})
    hidden_size: int | None = field(default=None, metadata={
        "help": "override the hidden size (default: keep the source's)"})
    intermediate_size: int | None = field(default=None, metadata={
        "help": "override the MLP intermediate size (default: keep the source's)"})
    num_attention_heads: int | None = field(default=None, metadata={
        "help": "override the number of attention heads (default: keep the source's)"})
    num_key_value_heads: int | None = field(default=None, metadata={
        "help": "override the number of key/value heads; must divide num_attention_heads (default: keep "
                "the source's, or its heads-per-group ratio when --num_attention_heads is set)"})
    vocab_size: int | None = field(default=None, metadata={
        "help": "override the vocabulary size; must be at least the tokenizer's length (default: keep the source's)"})
    tokenizer_path: str | None = field(default=None, metadata={
        "help": "tokenizer folder (or hub id) to save with the model (default: the source folder's tokenizer)"})
    seed: int = field(default=0, metadata={"help": "random seed of the weight initialisation"})
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={
        "help": "dtype of the saved weights"})


def _one_line(error: BaseException) -> str:
    """An exception as ``Type: message`` on one line (transformers' messages span several)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"[:300]


def load_source_config(model_id: str) -> Any:
    """Load a transformers config from a model folder, a config .json file or a hub id.

    A local path that does not exist, or a folder without config.json, raises UserInputError
    instead of falling back to the hub; so does a partial or corrupt config (invalid JSON, no or
    an unknown model_type, fields transformers rejects), with a one-line reason.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(model_id).expanduser()
    if path.is_file():
        try:
            config_dict = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise UserInputError(f"{path} is not valid JSON ({error}); pass a config.json file") from None
        model_type = config_dict.get("model_type") if isinstance(config_dict, dict) else None
        if model_type not in CONFIG_MAPPING:
            raise UserInputError(f"{path} has model_type {model_type!r}, which this transformers version "
                                 f"does not know; pass a config.json with a known model_type such as 'llama'")
        try:
            return CONFIG_MAPPING[model_type].from_dict(config_dict)
        except Exception as error:  # noqa: BLE001 — whatever transformers rejects, the file is at fault
            raise UserInputError(f"{path} is not a valid {model_type} config ({_one_line(error)}); fix or "
                                 f"replace the file") from None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserInputError(f"model folder {path} has no config.json; pass a folder written by "
                                 f"save_pretrained, or a config .json file such as "
                                 f"examples/llama3_128k/configs/llama3_8b.json")
        try:
            return AutoConfig.from_pretrained(path)
        except Exception as error:  # noqa: BLE001 — invalid JSON, no model_type, rejected fields
            raise UserInputError(f"the config.json in {path} is partial or corrupt ({_one_line(error)}); "
                                 f"restore it from the original model folder") from None
    if looks_like_local_path(model_id):
        raise UserInputError(f"--model_id {model_id} does not exist; pass an existing model folder or "
                             f"config .json file (e.g. examples/llama3_128k/configs/llama3_8b.json)")
    try:
        return AutoConfig.from_pretrained(model_id)
    except OSError as error:
        raise UserInputError(f"could not load the config of hub model {model_id!r} ({error}); without "
                             f"network access pass a local folder or config .json file instead") from None


def _find_tokenizer_source(args: MiniModelArgs) -> str | None:
    """Where to load the tokenizer from: --tokenizer_path, else the source folder or hub id."""
    if args.tokenizer_path is not None:
        path = Path(args.tokenizer_path).expanduser()
        if path.exists() or looks_like_local_path(args.tokenizer_path):
            if not path.is_dir() or not any((path / name).is_file() for name in TOKENIZER_FILES):
                raise UserInputError(f"--tokenizer_path {args.tokenizer_path} is not a tokenizer folder "
                                     f"(it needs one of {', '.join(TOKENIZER_FILES)})")
            return str(path)
        return args.tokenizer_path  # a hub id the user named
    source = Path(args.model_id).expanduser()
    if source.is_dir():
        return str(source) if any((source / name).is_file() for name in TOKENIZER_FILES) else None
    if source.is_file() or looks_like_local_path(args.model_id):
        return None  # a bare config file carries no tokenizer; a missing path fails in load_source_config
    return args.model_id  # hub id: its tokenizer lives next to its config


def _consistent_token_id(config_value: Any, tokenizer_value: int | None, vocab_size: int) -> Any:
    """A special-token id (or list of ids) for the mini config that is a valid row of the embedding.

    The tokenizer's id wins unless the config already names it (e.g. Llama-3-Instruct's list of
    end-of-turn ids); ids past ``vocab_size`` are dropped.
    """
    config_ids = config_value if isinstance(config_value, list) else [config_value]
    config_ids = [token_id for token_id in config_ids if token_id is not None]
    if tokenizer_value is not None and tokenizer_value not in config_ids:
        return tokenizer_value
    in_range = [token_id for token_id in config_ids if 0 <= token_id < vocab_size]
    if isinstance(config_value, list):
        return in_range or None
    return in_range[0] if in_range else None


def build_mini_config(config: Any, args: MiniModelArgs, tokenizer: Any = None) -> Any:
    """Turn the source ``config`` (changed in place and returned) into the mini model's: with
    ``args.num_hidden_layers`` layers and the size overrides of ``args`` applied.

    Checks that heads divide the hidden size and key/value heads divide heads, recomputes
    ``head_dim`` when it followed hidden_size / num_attention_heads in the source, shortens or
    cycles per-layer lists (``layer_types``), and makes special-token ids valid for the vocabulary.
    Raises UserInputError when the result could not be a working model.
    """
    missing = [name for name in ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size")
               if not isinstance(getattr(config, name, None), int)]
    if missing:
        raise UserInputError(f"config of model_type {config.model_type!r} has no integer {', '.join(missing)}; "
                             f"create_mini_model supports decoder-only text models such as Llama, Qwen, Gemma")
    if args.num_hidden_layers < 1:
        raise UserInputError(f"--num_hidden_layers must be at least 1, got {args.num_hidden_layers}")
    old_heads = config.num_attention_heads
    derived_head_dim = getattr(config, "head_dim", None) in (None, config.hidden_size // old_heads)

    for name in SIZE_FIELDS:
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise UserInputError(f"--{name} must be positive, got {value}")
            setattr(config, name, value)
    if args.num_attention_heads is not None and args.num_key_value_heads is None:
        # Keep the source's grouping (e.g. 32 heads / 8 kv heads -> 4 heads per group) when possible.
        group = max(1, old_heads // getattr(config, "num_key_value_heads", old_heads))
        config.num_key_value_heads = max(1, config.num_attention_heads // group)
    if config.hidden_size % config.num_attention_heads:
        raise UserInputError(f"hidden_size {config.hidden_size} is not divisible by num_attention_heads "
                             f"{config.num_attention_heads}; pick sizes such that it is")
    kv_heads = getattr(config, "num_key_value_heads", None)
    if kv_heads is not None and config.num_attention_heads % kv_heads:
        raise UserInputError(f"num_attention_heads {config.num_attention_heads} is not divisible by "
                             f"num_key_value_heads {kv_heads}; pass --num_key_value_heads with a divisor")
    if derived_head_dim and hasattr(config, "head_dim"):
        config.head_dim = config.hidden_size // config.num_attention_heads

    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and layer_types:
        # Cycling keeps patterns such as alternating sliding-window and full attention.
        config.layer_types = [layer_types[index % len(layer_types)] for index in range(args.num_hidden_layers)]
    config.num_hidden_layers = args.num_hidden_layers

    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise UserInputError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                             f"{config.vocab_size}, so some token ids would have no embedding row; "
                             f"pass --vocab_size {len(tokenizer)} (or larger)")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tokenizer_value = getattr(tokenizer, name, None) if tokenizer is not None else None
        old_value = getattr(config, name, None)
        new_value = _consistent_token_id(old_value, tokenizer_value, config.vocab_size)
        if old_value is not None and new_value is None:
            print(f"note: {name} {old_value} does not fit vocab_size {config.vocab_size}; it is left "
                  f"unset (pass --tokenizer_path to take it from a tokenizer)", file=sys.stderr)
        setattr(config, name, new_value)
    config.architectures = None  # from_config fills it in with the class actually built
    return config


def create_mini_model(args: MiniModelArgs) -> Path:
    """Build the mini model described by ``args``, save it to ``args.output_id`` and return that path.

    The folder holds config.json, generation_config.json, model.safetensors (weights in
    ``args.dtype``, initialised from ``torch.manual_seed(args.seed)``, so identical for identical
    arguments) and the tokenizer files when a tokenizer was found. It loads with
    ``AutoModelForCausalLM.from_pretrained``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = Path(args.output_id).expanduser().resolve()
    if output.is_file() or (output.is_dir() and any(output.iterdir()) and not (output / "config.json").is_file()):
        raise UserInputError(f"--output_id {output} exists and is not a model folder; pick a new or empty "
                             f"folder so that nothing else there is overwritten")
    source = Path(args.model_id).expanduser()
    if source.exists() and output in (source.resolve(), source.resolve().parent):
        raise UserInputError(f"--output_id {output} would overwrite the source model; pick another folder")
    source_config = load_source_config(args.model_id)  # first, so that a bad --model_id fails first
    tokenizer_source = _find_tokenizer_source(args)
    tokenizer = None
    if tokenizer_source is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        except Exception as error:  # noqa: BLE001 — corrupt files raise anything from the tokenizers library
            if args.tokenizer_path is not None or Path(tokenizer_source).is_dir():
                raise UserInputError(f"could not load the tokenizer in {tokenizer_source!r} ({_one_line(error)}); "
                                     f"its files are partial or corrupt: restore them, or pass a working "
                                     f"tokenizer folder with --tokenizer_path") from None
            print(f"note: no tokenizer saved: loading one from {tokenizer_source} failed ({_one_line(error)})",
                  file=sys.stderr)
    config = build_mini_config(source_config, args, tokenizer)

    torch.manual_seed(args.seed)
    # Initialise in float32 and cast afterwards, so a bfloat16 mini model is the rounded float32 one.
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as error:  # noqa: BLE001 — an inconsistent config fails somewhere inside the model's init
        raise UserInputError(f"cannot build a {config.model_type} causal LM from this config ({_one_line(error)}); "
                             f"check the size flags and the source config") from None
    model = model.to(getattr(torch, args.dtype))
    model.config.dtype = getattr(torch, args.dtype)

    # Save next to the output folder and swap in, so that no file of an earlier model (a tokenizer,
    # weight shards) survives into the new one, and a failed save leaves the old one intact.
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: parse the flags, build and save the mini model, print a summary."""
    args = parse_dataclass_args(MiniModelArgs, argv)
    try:
        output = create_mini_model(args)
    except UserInputError as error:
        sys.exit(f"error: {error}")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(output)
    print(f"saved {config.model_type} mini model to {output}: {config.num_hidden_layers} layers, "
          f"hidden {config.hidden_size}, heads {config.num_attention_heads}/"
          f"{getattr(config, 'num_key_value_heads', config.num_attention_heads)} kv, "
          f"vocab {config.vocab_size}, dtype {args.dtype}")


if __name__ == "__main__":
    main()
