"""The data-spec loader: packing, mixture, determinism, exact resume, disjoint copies (offline, tiny files)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "llama3_128k"
if str(EXAMPLE_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLE_DIR))

import demo_data  # noqa: E402

from dimshard.runtime.data.packed_loader import PackedBatchLoader  # noqa: E402
from dimshard.runtime.data.packed_stream import DocumentReader, Mixture, PackedSequenceStream  # noqa: E402
from dimshard.runtime.data.spec import load_tokenizer, open_source, parse_data_spec  # noqa: E402

SEQ = 48


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tokenizer, a JSONL source of long documents and a parquet source of short ones."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("data")
    corpus = demo_data.build_corpus(root / "corpus.jsonl", max_chars=20_000)
    tokenizer = demo_data.train_tokenizer(corpus, root / "tokenizer", vocab_size=300)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    short = [" ".join(words[(i + j) % 10] for j in range(i % 4 + 1)) + f" {i}" for i in range(30)]
    pq.write_table(pa.table({"body": short, "id": list(range(30))}), root / "short.parquet")
    return {"root": root, "long": corpus, "short": root / "short.parquet", "tokenizer": tokenizer,
            "cache": root / "cache"}


def _spec(files: dict[str, Path], **overrides):
    options = dict(tokenizer=str(files["tokenizer"]), text_columns="text,body", cache_dir=str(files["cache"]),
                   shuffle_buffer=16)
    options.update(overrides)
    return parse_data_spec(f"{files['long']},{files['short']}", options.pop("probs", "0.6,0.4"), **options)


def _loader(spec, **overrides) -> PackedBatchLoader:
    options = dict(sequence_length=SEQ, micro_batch_size=2, dp_size=1, copy_index=0, seed=5, workers=0)
    options.update(overrides)
    return PackedBatchLoader(spec, **options)


def _take(loader: PackedBatchLoader, count: int) -> list[dict[str, torch.Tensor]]:
    try:
        return [next(loader) for _ in range(count)]
    finally:
        loader.close()


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("streaming,masking", [(False, True), (True, True)])
def test_resumed_loader_sees_the_same_token_stream(files, streaming, masking):
    spec = _spec(files, streaming=streaming, document_masking=masking)
    uninterrupted = _take(_loader(spec), 9)
    first = _loader(spec)
    head = [next(first) for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))  # as trainer_state.json stores it
    first.close()
    resumed = _loader(spec)
    resumed.load_state_dict(state)
    assert _same(head + _take(resumed, 5), uninterrupted)
    keys = {"input_ids", "labels", "position_ids", "document_ids"} if masking else {"input_ids", "labels"}
    assert set(uninterrupted[0]) == keys and uninterrupted[0]["input_ids"].shape == (2, SEQ)


def test_worker_processes_do_not_change_the_tokens(files):
    spec = _spec(files, document_masking=True)
    in_thread = _take(_loader(spec, workers=0), 6)
    assert _same(_take(_loader(spec, workers=1), 6), in_thread)


def test_seed_sets_the_order(files):
    spec = _spec(files)
    assert _same(_take(_loader(spec), 4), _take(_loader(spec), 4))
    assert not _same(_take(_loader(spec, seed=6), 4), _take(_loader(spec), 4))


def test_packing_concatenates_whole_documents_in_order(files):
    """One source, stream order: the sequences are [bos] doc [eos] ... cut every SEQ tokens."""
    spec = parse_data_spec(str(files["long"]), tokenizer=str(files["tokenizer"]), streaming=True, shuffle_buffer=0,
                           document_masking=True)
    tokenizer = load_tokenizer(str(files["tokenizer"]))
    texts = [json.loads(line)["text"] for line in files["long"].read_text().splitlines()]
    expected: list[int] = []
    starts: list[int] = []
    for text in texts[:20]:
        starts.append(len(expected))
        expected += [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"],
                     tokenizer.eos_token_id]
    stream = PackedSequenceStream(spec, sequence_length=SEQ, copy_index=0, dp_size=1, seed=0)
    count = len(expected) // SEQ
    sequences = [next(stream) for _ in range(count)]
    tokens = np.concatenate([s["input_ids"] for s in sequences])
    assert tokens.tolist() == expected[:count * SEQ]
    positions = np.concatenate([s["position_ids"] for s in sequences])
    # Positions restart at every document and at every sequence start (a document running on).
    restarts = sorted({p for p in starts if p < count * SEQ} | set(range(0, count * SEQ, SEQ)))
    assert np.flatnonzero(positions == 0).tolist() == restarts
    for s in sequences:
        assert (np.diff(s["document_ids"]) == (s["position_ids"][1:] == 0)).all()


@pytest.mark.parametrize("streaming", [False, True])
def test_data_parallel_copies_read_disjoint_documents(files, streaming):
    spec = _spec(files, streaming=streaming)
    dataset = open_source(spec.sources[1], streaming, spec.cache_dir)
    seen = []
    for copy_index in range(2):
        reader = DocumentReader(dataset, text_column="body", streaming=streaming, shuffle_buffer=8, seed=1,
                                source_index=1, copy_index=copy_index, dp_size=2, name="short")
        seen.append([reader.next_text() for _ in range(15)])  # one epoch of this copy's half
        assert reader.epoch == 0
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 30


def test_mixture_follows_the_probabilities_and_the_seed():
    mixture = Mixture([0.7, 0.3], seed=3, copy_index=0)
    draws = [mixture.next_source() for _ in range(20_000)]
    assert abs(np.mean(draws) - 0.3) < 0.015
    again = Mixture([0.7, 0.3], seed=3, copy_index=0)
    again.draws = 12_345  # any draw is recomputed from its index: resume without replaying
    assert again.next_source() == draws[12_345]
    other = Mixture([0.7, 0.3], seed=3, copy_index=1)
    assert [other.next_source() for _ in range(100)] != draws[:100]


def test_long_documents_resume_inside_a_document(files):
    """A state taken while a document spans sequences resumes at the same token of it."""
    spec = parse_data_spec(str(files["long"]), tokenizer=str(files["tokenizer"]), cache_dir=str(files["cache"]))
    stream = PackedSequenceStream(spec, sequence_length=8, copy_index=0, dp_size=1, seed=2)
    for _ in range(5):
        next(stream)
    state = stream.state_dict()
    assert state["offset"] > 0
    rest = [next(stream)["input_ids"] for _ in range(6)]
    resumed = PackedSequenceStream(spec, sequence_length=8, copy_index=0, dp_size=1, seed=2)
    resumed.load_state_dict(state)
    assert all((next(resumed)["input_ids"] == r).all() for r in rest)


def test_state_of_another_layout_is_refused(files):
    spec = _spec(files)
    loader = _loader(spec)
    _take(loader, 1)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="sequence_length"):
        _loader(spec, sequence_length=SEQ * 2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        _loader(spec, seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset_path"):
        _loader(spec).load_state_dict({"epoch": 0, "position": 0, "seed": 5})
