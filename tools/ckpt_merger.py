"""Merge a sharded dimshard checkpoint into one file of full tensors (and optionally a HF model folder).

    python tools/ckpt_merger.py --ckpt_dir ./checkpoints --output_fname ./merged.ckpt
    python tools/ckpt_merger.py --ckpt_dir ./checkpoints --output_fname ./merged.ckpt --hf_output_dir ./hf_model

The merged file is safetensors: parameters under their original names, AdamW moments as
``optimizer.exp_avg.<name>`` / ``optimizer.exp_avg_sq.<name>``, fp32 masters (bf16 runs) as
``master.<name>``, and the step, trainer state and plan as JSON in the file's metadata. Resume
from it under any plan with ``--resume_path <file>``. All rank files must be in the step folder.

The Hugging Face folder holds the weights as ``save_pretrained`` writes them, so that
``from_pretrained`` loads every one: under transformers' own keys (GPT-NeoX's ``lm_head`` is
``embed_out`` on disk), a tied weight once, with the model's persistent buffers. It also gets
the tokenizer files and generation_config.json of the source model folder (``--model_config``
when it is a folder, else the run's ``--model_id``) when it has them, so that
``transformers.pipeline("text-generation", model=<folder>)`` works on it. A missing, partial or
corrupt file gives one ``error:`` line saying what to do, and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from dimshard.runtime.checkpointing.commit import CheckpointError
from dimshard.runtime.checkpointing.merged import merge_checkpoint, save_merged
from dimshard.runtime.checkpointing.sharded import read_json, resolve_checkpoint

# Files of a model folder that belong next to the exported weights: the tokenizer (any of the
# formats transformers saves) and the generation defaults.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
GENERATION_CONFIG = "generation_config.json"


def _find_model_config(step_dir: Path, model_config: str | None, plan: dict) -> dict:
    """The HF config as a dict: --model_config (a config.json or a folder holding one), else the
    checkpoint's config.json, else plan.json's ``model_config``."""
    if model_config:
        path = Path(model_config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise CheckpointError(f"--model_config {model_config}: no config.json there")
        return read_json(path, "pass --model_config <the model folder the run was started from>")
    if (step_dir / "config.json").is_file():
        return read_json(step_dir / "config.json", "pass --model_config <the model folder the run was started from>")
    if isinstance(plan.get("model_config"), dict):
        return plan["model_config"]
    raise CheckpointError(
        f"{step_dir} records no model config (config.json); pass --model_config <model dir or config.json> "
        "(the model the run was started from)"
    )


def source_model_dir(model_config: str | None, trainer_state: dict) -> Path | None:
    """The model folder the run started from: ``--model_config`` if it is a folder, else the
    run's recorded ``--model_id`` if that folder exists here; None otherwise."""
    if model_config and Path(model_config).is_dir():
        return Path(model_config)
    model_id = (trainer_state.get("config") or {}).get("model_id")
    if model_id and Path(model_id).is_dir():
        return Path(model_id)
    return None


def hf_state_dict(tensors: dict, plan: dict, config: dict, source_dir: Path | None = None) -> dict:
    """The tensors ``save_pretrained`` would write for the trained model, keyed as it keys them.

    Each parameter goes under the key transformers gives it on disk (installed version; GPT-NeoX's
    ``lm_head`` is ``embed_out``, a tied weight is written once: ``planner.graph.hf.checkpoint_names``),
    and the model's persistent buffers, which training does not change, come along: the values in
    ``source_dir``'s weights where it has them (what the run loaded), else the config's. Raises
    CheckpointError when the trained parameters and the config's model differ.
    """
    from transformers import AutoConfig

    from dimshard.planner.graph.hf import build_on_meta, checkpoint_names
    from dimshard.runtime.checkpointing.pretrained_weights import has_weights, read_tensors

    try:
        model = build_on_meta(AutoConfig.for_model(**config))
    except Exception as error:  # an unknown model_type, inconsistent sizes: transformers' own error types
        raise CheckpointError(f"cannot build the model of the config for --hf_output_dir ({type(error).__name__}: "
                              f"{' '.join(str(error).split())[:300]}); pass --model_config <the model folder the "
                              "run was started from>") from None
    on_disk = checkpoint_names(model)
    trained = [p["name"] for p in plan["parameters"]]
    buffers = dict(model.named_buffers())
    unplaced = [name for name in trained if name not in on_disk]
    untrained = [name for name in on_disk if name not in trained and name not in buffers]
    if unplaced or untrained:
        raise CheckpointError(
            f"the checkpoint does not hold the parameters of the config's {type(model).__name__}: "
            f"{len(unplaced)} trained parameters have no place in its checkpoint (e.g. {unplaced[:3]}, or "
            f"transformers converts them on load, fused or split, which the export does not do), {len(untrained)} "
            f"of its parameters were not trained (e.g. {untrained[:3]}); pass --model_config <the model folder the "
            "run was started from>")
    state = {on_disk[name]: tensors[name] for name in trained}
    persistent = {on_disk[name]: name for name in on_disk if name in buffers}
    saved = read_tensors(source_dir, persistent) if source_dir is not None and has_weights(source_dir) else {}
    for key, name in persistent.items():
        if key not in saved and buffers[name].is_meta:
            raise CheckpointError(f"buffer {name} is too large to rebuild from the config; pass --model_config "
                                  "<the model folder the run was started from, with its weights>")
        state[key] = saved.get(key, buffers[name])
    return state


def export_hf(tensors: dict, metadata: dict, config: dict, output_dir: str | Path,
              source_dir: Path | None = None) -> list[str]:
    """Write a folder loadable by ``AutoModelForCausalLM.from_pretrained`` with every weight:
    config.json plus ``hf_state_dict`` (in the trained dtype, sharded safetensors with an index
    when large), and the tokenizer files and generation_config.json found in ``source_dir``;
    returns the copied names."""
    from huggingface_hub import save_torch_state_dict

    output_dir = Path(output_dir)
    state = hf_state_dict(tensors, metadata["plan"], config, source_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(state, output_dir)
    (output_dir / "config.json").write_text(json.dumps(config, indent=2))
    copied = []
    if source_dir is not None and source_dir.resolve() != output_dir.resolve():
        for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
            if (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, output_dir / name)
                copied.append(name)
    return copied


def main(argv: list[str] | None = None) -> int:
    """Run the merger CLI; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", required=True,
                        help="checkpoint_dir of a run (its newest complete step is merged) or one step_<N> folder")
    parser.add_argument("--output_fname", default=None,
                        help="merged safetensors file to write (full parameters, optimizer state, metadata)")
    parser.add_argument("--hf_output_dir", default=None,
                        help="also write a Hugging Face model folder (config.json + weights) here")
    parser.add_argument("--model_config", default=None,
                        help="config.json (or a model folder holding one) for --hf_output_dir; default: the "
                             "config recorded in the checkpoint")
    parser.add_argument("--params_only", action="store_true",
                        help="leave optimizer state and fp32 masters out (smaller file, needs less memory)")
    parser.add_argument("--no_progress", action="store_true", help="do not show progress bars")
    args = parser.parse_args(argv)
    if not args.output_fname and not args.hf_output_dir:
        parser.error("nothing to write: pass --output_fname and/or --hf_output_dir")
    try:
        step_dir = resolve_checkpoint(args.ckpt_dir)
        config = None
        if args.hf_output_dir:  # fail before the (long) merge when no config can be found
            config = _find_model_config(step_dir, args.model_config,
                                        read_json(step_dir / "plan.json", "merge another step_<N> folder"))
        print(f"merging {step_dir}", file=sys.stderr)
        include_optimizer = bool(args.output_fname) and not args.params_only
        tensors, metadata = merge_checkpoint(step_dir, include_optimizer=include_optimizer,
                                             progress=not args.no_progress)
        if args.output_fname:
            save_merged(args.output_fname, tensors, metadata)
            print(f"wrote {args.output_fname} (step {metadata['step']}, {len(tensors)} tensors)", file=sys.stderr)
        if args.hf_output_dir:
            assert config is not None
            source = source_model_dir(args.model_config, metadata["trainer_state"])
            copied = export_hf(tensors, metadata, config, args.hf_output_dir, source)
            also = f" with {', '.join(copied)} from {source}" if copied else ""
            print(f"wrote Hugging Face model folder {args.hf_output_dir}{also}", file=sys.stderr)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (OSError, KeyError, TypeError, ValueError) as error:
        # A rank file or trainer_state.json that parses but lacks a field, an unwritable output, ...
        detail = f"{type(error).__name__}: {error}"
        print(f"error: merging {args.ckpt_dir} failed ({detail}); check that it is a complete dimshard "
              "checkpoint (step_<N> folder) and that the output folders are writable", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
