"""Throughput of the data-spec loader alone (read, mix, tokenize, pack) against what training needs.

    python benchmarks/data_loader.py                                   # demo corpus, 128K sequences
    python benchmarks/data_loader.py --data_sources a.jsonl,b.parquet --data_probs 0.7,0.3 \
        --tokenizer <Llama-3 tokenizer dir> --workers 0,1,2,4 --document_masking

Without ``--data_sources`` it builds the offline demo corpus (Python docstrings) and its BPE tokenizer
(examples/llama3_128k/demo_data.py) in a temporary folder. For each ``--workers`` value it starts a
``PackedBatchLoader`` as the trainer does, takes ``--warmup`` micro-batches (process start, first
reads), then times ``--batches`` more, and prints tokens/s next to the rate one loader must keep up:
``micro_batch_size * sequence_length / step_seconds`` tokens per data-parallel copy. The default
``--step_seconds 6.67`` is the planner's estimate for Llama-3-8B at 128K on 8 GPUs (one copy over 8
GPUs, one 131072-token sequence per step; benchmarks/RESULTS.md), an estimate, not a measurement.
Every rank of a copy runs its own loader, so a node of 8 GPUs runs 8 of them.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from dimshard.cli import parse_dataclass_args

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class LoaderArgs:
    """Flags of the benchmark (one field per flag)."""

    data_sources: str = field(default="", metadata={
        "help": "comma-separated sources as train.py --data_sources takes them; default: the demo corpus"})
    data_probs: str = field(default="", metadata={"help": "mixing probabilities, one per source (default: equal)"})
    data_text_columns: str = field(default="", metadata={"help": "text column per source (default text)"})
    data_streaming: bool = field(default=False, metadata={"help": "stream the sources instead of an Arrow copy"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer folder; default: the demo tokenizer"})
    document_masking: bool = field(default=False, metadata={"help": "also build position_ids / document_ids"})
    sequence_length: int = field(default=131072, metadata={"help": "tokens per packed sequence"})
    micro_batch_size: int = field(default=1, metadata={"help": "sequences per micro-batch"})
    workers: str = field(default="0,1,2", metadata={"help": "tokenizer worker counts to measure, comma-separated"})
    prefetch: int = field(default=4, metadata={"help": "micro-batches the loader keeps ready"})
    warmup: int = field(default=2, metadata={"help": "untimed micro-batches first"})
    batches: int = field(default=10, metadata={"help": "timed micro-batches per worker count"})
    step_seconds: float = field(default=6.67, metadata={
        "help": "seconds per optimizer step the loader must keep up with (default: the planner's estimate for "
                "8B at 128K on 8 GPUs, one sequence per step)"})
    demo_chars: int = field(default=2_000_000, metadata={"help": "size of the demo corpus in characters"})


def _demo_sources(folder: Path, max_chars: int) -> tuple[str, str]:
    sys.path.insert(0, str(ROOT / "examples" / "llama3_128k"))
    import demo_data

    corpus = demo_data.build_corpus(folder / "corpus.jsonl", max_chars=max_chars)
    return str(corpus), str(demo_data.train_tokenizer(corpus, folder / "tokenizer", vocab_size=2048))


def measure(spec, args: LoaderArgs, workers: int) -> dict:
    """Tokens/s of one loader with ``workers`` tokenizer processes, after warmup."""
    from dimshard.runtime.data.packed_loader import PackedBatchLoader

    loader = PackedBatchLoader(spec, sequence_length=args.sequence_length, micro_batch_size=args.micro_batch_size,
                               dp_size=1, copy_index=0, seed=0, workers=workers, prefetch=args.prefetch)
    try:
        start = time.perf_counter()
        for _ in range(args.warmup):
            next(loader)
        started = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(args.batches):
            next(loader)
        elapsed = time.perf_counter() - start
    finally:
        loader.close()
    tokens = args.batches * args.micro_batch_size * args.sequence_length
    return {"workers": workers, "startup_s": round(started, 2), "tokens_per_s": round(tokens / elapsed, 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure every worker count; print one JSON line each and return them."""
    from dimshard.runtime.reliability.gpu_memory import enable_expandable_segments

    enable_expandable_segments()  # before CUDA starts, as every rank of a training run
    from dimshard.runtime.data.spec import parse_data_spec

    args = parse_dataclass_args(LoaderArgs, argv, description=__doc__.split("\n\n")[0])
    with tempfile.TemporaryDirectory() as tmp:
        sources, tokenizer = args.data_sources, args.tokenizer
        if not sources:
            sources, demo_tokenizer = _demo_sources(Path(tmp), args.demo_chars)
            tokenizer = tokenizer or demo_tokenizer
        spec = parse_data_spec(sources, args.data_probs, tokenizer=tokenizer, text_columns=args.data_text_columns,
                               streaming=args.data_streaming, document_masking=args.document_masking,
                               cache_dir=str(Path(tmp) / "cache"))
        need = args.micro_batch_size * args.sequence_length / args.step_seconds
        records = []
        for workers in (int(w) for w in args.workers.split(",")):
            record = measure(spec, args, workers)
            record.update(sequence_length=args.sequence_length, needed_tokens_per_s=round(need, 1),
                          headroom=round(record["tokens_per_s"] / need, 1), document_masking=args.document_masking,
                          streaming=args.data_streaming)
            print(json.dumps(record), flush=True)
            records.append(record)
    return records


if __name__ == "__main__":
    main()
