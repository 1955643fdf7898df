"""Merge a sharded dimshard checkpoint into one file of full tensors (and optionally a HF model folder).

    python tools/ckpt_merger.py --ckpt_dir ./checkpoints --output_fname ./merged.ckpt
    python tools/ckpt_merger.py --ckpt_dir ./checkpoints --output_fname ./merged.ckpt --hf_output_dir ./hf_model

The merged file is safetensors: parameters under their original names, AdamW moments as
``optimizer.exp_avg.<name>`` / ``optimizer.exp_avg_sq.<name>``, fp32 masters (bf16 runs) as
``master.<name>``, and the step, trainer state and plan as JSON in the file's metadata. Resume
from it under any plan with ``--resume_path <file>``. All rank files must be in the step folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dimshard.runtime.checkpoint import CheckpointError, merge_checkpoint, resolve_checkpoint, save_merged


def _find_model_config(step_dir: Path, model_config: str | None, plan: dict) -> dict:
    """The HF config as a dict: --model_config (a config.json or a folder holding one), else the
    checkpoint's config.json, else plan.json's ``model_config``."""
    if model_config:
        path = Path(model_config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise CheckpointError(f"--model_config {model_config}: no config.json there")
        return json.loads(path.read_text())
    if (step_dir / "config.json").is_file():
        return json.loads((step_dir / "config.json").read_text())
    if isinstance(plan.get("model_config"), dict):
        return plan["model_config"]
    raise CheckpointError(
        f"{step_dir} records no model config (config.json); pass --model_config <model dir or config.json> "
        "(the model the run was started from)"
    )


def export_hf(tensors: dict, metadata: dict, config: dict, output_dir: str | Path) -> None:
    """Write a folder loadable by ``AutoModelForCausalLM.from_pretrained``: config.json plus the
    parameters (in their trained dtype, sharded safetensors with an index when large)."""
    from huggingface_hub import save_torch_state_dict

    names = [p["name"] for p in metadata["plan"]["parameters"]]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict({name: tensors[name] for name in names}, output_dir)
    (output_dir / "config.json").write_text(json.dumps(config, indent=2))


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
            config = _find_model_config(step_dir, args.model_config, json.loads((step_dir / "plan.json").read_text()))
        print(f"merging {step_dir}", file=sys.stderr)
        include_optimizer = bool(args.output_fname) and not args.params_only
        tensors, metadata = merge_checkpoint(step_dir, include_optimizer=include_optimizer,
                                             progress=not args.no_progress)
        if args.output_fname:
            save_merged(args.output_fname, tensors, metadata)
            print(f"wrote {args.output_fname} (step {metadata['step']}, {len(tensors)} tensors)", file=sys.stderr)
        if args.hf_output_dir:
            assert config is not None
            export_hf(tensors, metadata, config, args.hf_output_dir)
            print(f"wrote Hugging Face model folder {args.hf_output_dir}", file=sys.stderr)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
