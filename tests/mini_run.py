"""The inputs of an end-to-end run, built offline with the example's own scripts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "llama3_128k"


def prepare_mini_run(work: Path, python: Callable[..., Any], sequence_length: int, max_chars: int) -> None:
    """Write into ``work`` a corpus and its tokenizer (``corpus/``), the packed dataset (``data/``)
    and a 2-layer mini Llama with the Llama-3-8B architecture (``model/``). ``python(*args)`` runs
    one script (it must raise when the script fails)."""
    python(str(EXAMPLE / "demo_data.py"), "--output_dir", str(work / "corpus"), "--max_chars", str(max_chars),
           "--vocab_size", "512")
    python(str(EXAMPLE / "bookcorpus.py"), "--data_path_or_name", str(work / "corpus" / "corpus.jsonl"),
           "--tokenizer_path_or_name", str(work / "corpus" / "tokenizer"), "--save_path", str(work / "data"),
           "--sequence_length", str(sequence_length))
    python(str(EXAMPLE / "create_mini_model.py"), "--model_id", str(EXAMPLE / "configs" / "llama3_8b.json"),
           "--output_id", str(work / "model"), "--num_hidden_layers", "2", "--hidden_size", "64",
           "--intermediate_size", "128", "--num_attention_heads", "4", "--num_key_value_heads", "2",
           "--vocab_size", "512", "--tokenizer_path", str(work / "corpus" / "tokenizer"))
