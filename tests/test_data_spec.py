"""Bad data specs fail before any compile or GPU work, each with one line that says what to fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DIR = ROOT / "examples" / "llama3_128k"
if str(EXAMPLE_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLE_DIR))

import demo_data  # noqa: E402

from dimshard.runtime.data.spec import DataSpecError, check_data_spec, parse_data_spec  # noqa: E402

VOCAB = 300


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spec")
    corpus = demo_data.build_corpus(root / "corpus.jsonl", max_chars=8_000)
    tokenizer = demo_data.train_tokenizer(corpus, root / "tokenizer", vocab_size=VOCAB)
    empty = root / "empty.jsonl"
    empty.write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(5)))
    texts = root / "texts"
    texts.mkdir()
    for i in range(3):
        (texts / f"doc{i}.txt").write_text(f"document number {i}\nwith two lines")
    return {"root": root, "corpus": corpus, "tokenizer": tokenizer, "empty": empty, "texts": texts,
            "cache": root / "cache"}


def _check(files: dict[str, Path], sources: str, probs: str = "", vocab: int | None = VOCAB, **options) -> None:
    options.setdefault("tokenizer", str(files["tokenizer"]))
    spec = parse_data_spec(sources, probs, cache_dir=str(files["cache"]), **options)
    check_data_spec(spec, vocab)


def test_good_specs_pass_and_probabilities_are_normalised(files):
    spec = parse_data_spec(f"{files['corpus']},{files['texts']}", "3,1", tokenizer="t")
    assert [s.probability for s in spec.sources] == [0.75, 0.25]
    assert parse_data_spec("a,b", tokenizer="t").sources[1].probability == 0.5
    _check(files, f"{files['corpus']},{files['texts']}", "0.7,0.3")
    _check(files, f"{files['root']}/**/*.txt,{files['texts']}/doc*.txt", streaming=True)  # globs; .txt one per file


BAD_SPECS = [
    # (sources, probs, options, words the one-line error must contain)
    ("{root}/missing.jsonl", "", {}, "no such file"),
    ("{corpus},{texts}", "0.7", {}, "one probability per source"),
    ("{corpus},{texts}", "0.7,-0.3", {}, ">= 0"),
    ("{corpus},{texts}", "0,0", {}, "all zero"),
    ("{corpus}", "x", {}, "not a number"),
    ("{corpus}", "", {"text_columns": "body"}, "no column 'body'"),
    ("{corpus},{texts}", "", {"text_columns": "text,text,text"}, "one entry per source"),
    ("{empty}", "", {}, "is empty"),
    ("{empty}", "", {"streaming": True}, "is empty"),
    ("{root}", "", {}, "mixes data formats"),
    ("{corpus}", "", {"tokenizer": "{root}/no_tokenizer"}, "no such folder"),
    ("", "", {}, "--data_sources is empty"),
]


@pytest.mark.parametrize("sources,probs,options,words", BAD_SPECS)
def test_bad_spec_is_one_line_naming_the_fix(files, sources, probs, options, words):
    fill = {k: str(v) for k, v in files.items()}
    options = {k: v.format(**fill) if isinstance(v, str) else v for k, v in options.items()}
    with pytest.raises(DataSpecError, match=words) as error:
        _check(files, sources.format(**fill), probs, **options)
    assert "\n" not in str(error.value)


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(files):
    with pytest.raises(DataSpecError, match=f"has {VOCAB} tokens but the model's vocab_size is 128"):
        _check(files, str(files["corpus"]), vocab=128)


def test_unreachable_hub_name_is_refused(files, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read these at import; once imported (by other tests) only their constants count,
    # and without them each lookup waits on the network until it times out.
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataSpecError, match="could not open it as a hub dataset") as error:
        _check(files, "no-such-owner-dimshard/no-such-dataset")
    assert "\n" not in str(error.value)


def test_train_py_stops_on_a_bad_spec_before_compiling(files, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, str(EXAMPLE_DIR / "train.py"), "--model_id", str(EXAMPLE_DIR / "configs" / "llama3_8b.json"),
         "--data_sources", f"{files['corpus']},{files['texts']}", "--data_probs", "0.5",
         "--sequence_length", "64", "--tokenizer", str(files["tokenizer"]), "--compile_dir", str(tmp_path / "c"),
         "--run_mode", "compile"],
        capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --data_probs has 1 entries") and len(lines) == 1, out.stderr[-2000:]
    assert not (tmp_path / "c").exists()
