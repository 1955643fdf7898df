"""End-to-end tests of the example's data and model preparation scripts, on tiny offline data.

demo_data.py builds a docstring corpus and a BPE tokenizer; bookcorpus.py packs the corpus into
fixed-length sequences; create_mini_model.py builds a tiny Llama from configs/llama3_8b.json.
Every result is compared with a plain reference computation (tokenizing documents one by one,
loading with from_pretrained), and re-runs must reproduce the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

from dimshard import cli

pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DIR = REPO_ROOT / "examples" / "llama3_128k"
if str(EXAMPLE_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLE_DIR))

import bookcorpus  # noqa: E402
import create_mini_model  # noqa: E402
import demo_data  # noqa: E402

MAX_CHARS = 60_000
VOCAB_SIZE = 512
SEQUENCE_LENGTH = 256
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small corpus.jsonl and the tokenizer trained on it, built once for the module."""
    root = tmp_path_factory.mktemp("demo")
    corpus = demo_data.build_corpus(root / "corpus.jsonl", max_chars=MAX_CHARS)
    tokenizer = demo_data.train_tokenizer(corpus, root / "tokenizer", vocab_size=VOCAB_SIZE)
    return {"root": root, "corpus": corpus, "tokenizer": tokenizer, "cache": root / "hf_cache"}


def corpus_args(demo: dict[str, Path], save_path: Path, **overrides) -> bookcorpus.CorpusArgs:
    values = dict(data_path_or_name=str(demo["corpus"]), tokenizer_path_or_name=str(demo["tokenizer"]),
                  save_path=str(save_path), sequence_length=SEQUENCE_LENGTH, cache_dir=str(demo["cache"]))
    values.update(overrides)
    return bookcorpus.CorpusArgs(**values)


def read_texts(corpus: Path) -> list[str]:
    return [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]


def reference_stream(texts: list[str], tokenizer_dir: Path) -> list[int]:
    """What packing must produce, computed the slow obvious way: [bos] + tokens + [eos] per document."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    stream: list[int] = []
    for text in texts:
        if text.strip():
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    return stream


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# ---------------------------------------------------------------------------------------------- cli


@dataclasses.dataclass
class _ExampleArgs:
    """Example flags."""

    name: str = dataclasses.field(metadata={"help": "a required string"})
    steps: int = dataclasses.field(default=3, metadata={"help": "an int"})
    rate: float = dataclasses.field(default=0.5, metadata={"help": "a float, 100% sure"})
    limit: int | None = dataclasses.field(default=None, metadata={"help": "an optional int"})
    mode: Literal["fast", "slow"] = dataclasses.field(default="fast", metadata={"help": "a choice"})
    verbose: bool = dataclasses.field(default=False, metadata={"help": "a switch"})
    shuffle: bool = dataclasses.field(default=True, metadata={"help": "a switch that is on"})
    sizes: list[int] = dataclasses.field(default_factory=lambda: [1, 2], metadata={"help": "some ints"})


def test_parse_dataclass_args_types_defaults_and_bools() -> None:
    args = cli.parse_dataclass_args(_ExampleArgs, ["--name", "x"])
    assert args == _ExampleArgs(name="x")
    args = cli.parse_dataclass_args(_ExampleArgs, [
        "--name", "y", "--steps", "7", "--rate", "1e-3", "--limit", "5", "--mode", "slow",
        "--verbose", "--no-shuffle", "--sizes", "4", "8"])
    assert args == _ExampleArgs(name="y", steps=7, rate=1e-3, limit=5, mode="slow", verbose=True,
                                shuffle=False, sizes=[4, 8])
    args = cli.parse_dataclass_args(_ExampleArgs, ["--name", "z", "--verbose", "false", "--shuffle", "true",
                                                   "--limit", "none"])
    assert (args.verbose, args.shuffle, args.limit) == (False, True, None)
    help_text = cli.build_parser(_ExampleArgs).format_help()
    assert "a choice (default: fast)" in help_text and "100% sure" in help_text


@pytest.mark.parametrize("argv", [[], ["--name", "x", "--mode", "medium"], ["--name", "x", "--steps", "two"],
                                  ["--name", "x", "--verbose", "maybe"]])
def test_parse_dataclass_args_rejects_bad_flags(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        cli.parse_dataclass_args(_ExampleArgs, argv)


def test_parse_dataclass_args_requires_help() -> None:
    @dataclasses.dataclass
    class NoHelp:
        steps: int = 3

    with pytest.raises(TypeError, match="NoHelp.steps has no help text"):
        cli.build_parser(NoHelp)


def test_every_script_flag_has_help() -> None:
    for cls in (bookcorpus.CorpusArgs, create_mini_model.MiniModelArgs, demo_data.DemoDataArgs):
        parser = cli.build_parser(cls)
        for action in parser._actions:
            assert action.help, f"{cls.__name__}: {action.option_strings} has no help"


# -------------------------------------------------------------------------------------- demo_data


def test_demo_corpus_and_tokenizer(demo: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    texts = read_texts(demo["corpus"])
    assert len(texts) > 20 and 0.5 * MAX_CHARS < sum(map(len, texts)) <= MAX_CHARS
    assert texts[0].startswith("abc\n\n")  # the first module of the fixed list

    again = demo_data.build_corpus(tmp_path / "corpus.jsonl", max_chars=MAX_CHARS)
    assert again.read_bytes() == demo["corpus"].read_bytes()
    tokenizer_again = demo_data.train_tokenizer(again, tmp_path / "tokenizer", vocab_size=VOCAB_SIZE)
    assert folder_bytes(tokenizer_again) == folder_bytes(demo["tokenizer"])

    tokenizer = AutoTokenizer.from_pretrained(demo["tokenizer"])
    assert len(tokenizer) == VOCAB_SIZE
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    sample = "Return the sum of a and b — naïve café ∑ 🙂\n\tindented"
    ids = tokenizer(sample)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == sample
    # Merges were learned: the corpus takes well under one token per byte.
    joined = "\n".join(texts)
    assert len(tokenizer(joined)["input_ids"]) < 0.6 * len(joined.encode())


def test_demo_data_cli(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "examples/llama3_128k/demo_data.py", "--output_dir", str(tmp_path / "out"),
         "--max_chars", "20000", "--vocab_size", "300"],
        cwd=REPO_ROOT, env=OFFLINE_ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "corpus.jsonl").is_file()
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").is_file()

    result = subprocess.run(
        [sys.executable, "examples/llama3_128k/demo_data.py", "--output_dir", str(tmp_path / "bad"),
         "--vocab_size", "100"], cwd=REPO_ROOT, env=OFFLINE_ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "error: --vocab_size 100 is too small" in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------- bookcorpus


def test_bookcorpus_packs_exact_sequences(demo: dict[str, Path], tmp_path: Path) -> None:
    import datasets

    packed = bookcorpus.prepare_dataset(corpus_args(demo, tmp_path / "packed"))
    assert packed.column_names == ["input_ids"]
    assert packed.features["input_ids"].feature == datasets.Value("int32")
    rows = packed["input_ids"]
    assert len(rows) > 10
    assert all(len(row) == SEQUENCE_LENGTH for row in rows)

    expected = reference_stream(read_texts(demo["corpus"]), demo["tokenizer"])
    flat = [token for row in rows for token in row]
    assert len(flat) == len(expected) // SEQUENCE_LENGTH * SEQUENCE_LENGTH
    assert flat == expected[: len(flat)]
    assert flat.count(1) > 10  # EOS closes every document
    assert flat.count(1) == flat.count(0) or flat.count(1) == flat.count(0) - 1  # each bos has its eos

    # Re-running reproduces the same bytes, into the same folder or a fresh one.
    first = folder_bytes(tmp_path / "packed")
    bookcorpus.prepare_dataset(corpus_args(demo, tmp_path / "packed"))
    assert folder_bytes(tmp_path / "packed") == first
    bookcorpus.prepare_dataset(corpus_args(demo, tmp_path / "packed_again"))
    assert folder_bytes(tmp_path / "packed_again") == first
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.packing"))


def test_bookcorpus_options(demo: dict[str, Path], tmp_path: Path) -> None:
    texts = read_texts(demo["corpus"])
    packed = bookcorpus.prepare_dataset(corpus_args(demo, tmp_path / "no_bos", add_bos=False, max_samples=40,
                                                    sequence_length=64, num_proc=2))
    expected = [token for token in reference_stream(texts[:40], demo["tokenizer"]) if token != 0]
    flat = [token for row in packed["input_ids"] for token in row]
    assert flat == expected[: len(flat)] and len(expected) - len(flat) < 64


def test_bookcorpus_reads_txt_parquet_and_saved_datasets(demo: dict[str, Path], tmp_path: Path) -> None:
    import datasets

    texts = read_texts(demo["corpus"])[:60]
    expected = reference_stream(texts, demo["tokenizer"])
    expected = expected[: len(expected) // 128 * 128]

    def packed_tokens(source: Path, **overrides) -> list[int]:
        args = corpus_args(demo, tmp_path / f"out_{source.name}", data_path_or_name=str(source),
                           sequence_length=128, **overrides)
        return [token for row in bookcorpus.prepare_dataset(args)["input_ids"] for token in row]

    table = datasets.Dataset.from_dict({"id": list(range(len(texts))), "body": texts})
    table.to_parquet(str(tmp_path / "corpus.parquet"))
    assert packed_tokens(tmp_path / "corpus.parquet", text_column="body") == expected

    table.save_to_disk(str(tmp_path / "saved"))
    assert packed_tokens(tmp_path / "saved", text_column="body") == expected
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved_dict"))
    assert packed_tokens(tmp_path / "saved_dict", text_column="body") == expected

    # A folder of .txt files, one document per file, read in sorted path order (README.md skipped).
    folder = tmp_path / "txt_folder"
    (folder / "part").mkdir(parents=True)
    for index, text in enumerate(texts):
        (folder / "part" / f"{index:03d}.txt").write_text(text, encoding="utf-8")
    (folder / "README.md").write_text("not data", encoding="utf-8")
    assert packed_tokens(folder, txt_sample_by="document") == expected


def test_bookcorpus_errors(demo: dict[str, Path], tmp_path: Path) -> None:
    error = cli.UserInputError
    with pytest.raises(error, match="no such file or folder; check the path"):
        bookcorpus.prepare_dataset(corpus_args(demo, tmp_path / "a", data_path_or_name=str(tmp_path / "nope.jsonl")))
    with pytest.raises(error, match=r"no column 'body'; its columns are \['name', 'text'\]"):
        bookcorpus.prepare_dataset(corpus_args(demo, tmp_path / "b", text_column="body"))
    with pytest.raises(error, match=r"only \d+ tokens \(\d+ documents\), fewer than one sequence of 10000000"):
        bookcorpus.prepare_dataset(corpus_args(demo, tmp_path / "c", sequence_length=10_000_000))
    with pytest.raises(error, match="--sequence_length must be positive"):
        corpus_args(demo, tmp_path / "d", sequence_length=0)

    no_eos = tmp_path / "tokenizer_without_eos"
    shutil.copytree(demo["tokenizer"], no_eos)
    config = json.loads((no_eos / "tokenizer_config.json").read_text())
    config.pop("eos_token")
    (no_eos / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(error, match="has no EOS token"):
        bookcorpus.prepare_dataset(corpus_args(demo, tmp_path / "e", tokenizer_path_or_name=str(no_eos)))
    with pytest.raises(error, match="tokenizer_path_or_name .*: no such folder"):
        bookcorpus.prepare_dataset(corpus_args(demo, tmp_path / "f", tokenizer_path_or_name=str(tmp_path / "t")))

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    with pytest.raises(error, match="exists and is not a saved dataset"):
        bookcorpus.prepare_dataset(corpus_args(demo, occupied))
    assert (occupied / "notes.txt").read_text() == "keep me"


def _cli_error(argv: list[str]) -> str:
    """bookcorpus.main's exit message, which must be one ``error:`` line."""
    with pytest.raises(SystemExit) as stopped:
        bookcorpus.main(argv)
    message = str(stopped.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_bookcorpus_bad_files_give_one_line_errors(demo: dict[str, Path], tmp_path: Path) -> None:
    def argv(corpus: Path | str, tokenizer: Path | str, save: str) -> list[str]:
        return ["--data_path_or_name", str(corpus), "--tokenizer_path_or_name", str(tokenizer),
                "--save_path", str(tmp_path / save), "--sequence_length", "64", "--cache_dir", str(demo["cache"])]

    # A tokenizer whose files were cut short or overwritten.
    for name, damage in (("tokenizer.json", lambda text: text[: len(text) // 3]),
                         ("tokenizer_config.json", lambda text: "{\"eos_token\": ")):
        broken = tmp_path / f"broken_{name}"
        shutil.copytree(demo["tokenizer"], broken)
        (broken / name).write_text(damage((broken / name).read_text()))
        assert "could not load tokenizer" in _cli_error(argv(demo["corpus"], broken, f"out_{name}"))

    # A corpus file cut in the middle of a record.
    partial = tmp_path / "partial.jsonl"
    partial.write_text(demo["corpus"].read_text()[:5000])
    assert "could not read 1 json file(s)" in _cli_error(argv(partial, demo["tokenizer"], "out_partial"))

    # A save_to_disk corpus with a truncated Arrow file, or a corrupt state.json.
    saved = tmp_path / "saved"
    bookcorpus.prepare_dataset(corpus_args(demo, saved, sequence_length=64))
    for damage in ("arrow", "state"):
        copy = tmp_path / f"saved_{damage}"
        shutil.copytree(saved, copy)
        if damage == "arrow":
            arrow = next(copy.glob("*.arrow"))
            arrow.write_bytes(arrow.read_bytes()[:200])
        else:
            (copy / "state.json").write_text("{\"_data_files\": [")
        assert "cannot be read" in _cli_error(argv(copy, demo["tokenizer"], f"out_{damage}"))


def test_bookcorpus_cli(demo: dict[str, Path], tmp_path: Path) -> None:
    command = [sys.executable, "examples/llama3_128k/bookcorpus.py",
               "--data_path_or_name", str(demo["corpus"]), "--tokenizer_path_or_name", str(demo["tokenizer"]),
               "--save_path", str(tmp_path / "packed"), "--sequence_length", "512",
               "--cache_dir", str(tmp_path / "cache")]
    result = subprocess.run(command, cwd=REPO_ROOT, env=OFFLINE_ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "sequences of 512 tokens" in result.stdout

    result = subprocess.run(command + ["--text_column", "missing"], cwd=REPO_ROOT, env=OFFLINE_ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "error: the corpus has no column 'missing'" in result.stderr and "Traceback" not in result.stderr

    for script in ("bookcorpus.py", "create_mini_model.py", "demo_data.py"):
        result = subprocess.run([sys.executable, f"examples/llama3_128k/{script}", "--help"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


# ------------------------------------------------------------------------------ model config + mini


def test_llama3_8b_config_loads(tmp_path: Path) -> None:
    from transformers import AutoConfig, LlamaConfig

    config_file = EXAMPLE_DIR / "configs" / "llama3_8b.json"
    shutil.copy(config_file, tmp_path / "config.json")
    for config in (LlamaConfig.from_json_file(str(config_file)), AutoConfig.from_pretrained(tmp_path)):
        assert isinstance(config, LlamaConfig)
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                config.num_key_value_heads, config.intermediate_size, config.vocab_size) == (
            4096, 32, 32, 8, 14336, 128256)
        assert config.max_position_embeddings == 131072
        assert (config.bos_token_id, config.eos_token_id, config.rms_norm_eps) == (128000, 128001, 1e-5)
        assert config.tie_word_embeddings is False
        rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta",
                                                                          getattr(config, "rope_theta", None))
        assert rope_theta == 500000.0


def mini_args(demo: dict[str, Path], output: Path, **overrides) -> create_mini_model.MiniModelArgs:
    values = dict(model_id=str(EXAMPLE_DIR / "configs" / "llama3_8b.json"), output_id=str(output),
                  num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB_SIZE, tokenizer_path=str(demo["tokenizer"]))
    values.update(overrides)
    return create_mini_model.MiniModelArgs(**values)


def test_create_mini_model_loads_and_runs(demo: dict[str, Path], tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    output = create_mini_model.create_mini_model(mini_args(demo, tmp_path / "mini"))
    assert (output / "model.safetensors").is_file() and (output / "tokenizer.json").is_file()

    model = AutoModelForCausalLM.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim, config.vocab_size) == (2, 64, 4, 2, 16, VOCAB_SIZE)
    assert config.max_position_embeddings == 131072 and config.rms_norm_eps == 1e-5
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 1, 2)
    assert len(tokenizer) == config.vocab_size

    input_ids = tokenizer(["def add(a, b):\n    return a + b"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        result = model(input_ids=input_ids, labels=input_ids)
    assert result.logits.shape == (1, input_ids.shape[1], VOCAB_SIZE)
    # Random init: the loss is close to uniform guessing, log(vocab).
    assert abs(result.loss.item() - torch.log(torch.tensor(float(VOCAB_SIZE))).item()) < 0.5

    # Same seed, same weights; another seed, other weights.
    same = create_mini_model.create_mini_model(mini_args(demo, tmp_path / "same"))
    other = create_mini_model.create_mini_model(mini_args(demo, tmp_path / "other", seed=1))
    weights = load_file(output / "model.safetensors")
    assert all(torch.equal(tensor, load_file(same / "model.safetensors")[name]) for name, tensor in weights.items())
    assert not torch.equal(weights["model.embed_tokens.weight"],
                           load_file(other / "model.safetensors")["model.embed_tokens.weight"])

    # The mini folder is itself a source: its tokenizer comes along, the sizes stay, bf16 on request.
    smaller = create_mini_model.create_mini_model(create_mini_model.MiniModelArgs(
        model_id=str(output), output_id=str(tmp_path / "smaller"), num_hidden_layers=1, dtype="bfloat16"))
    reloaded = AutoModelForCausalLM.from_pretrained(smaller)
    assert reloaded.config.num_hidden_layers == 1 and reloaded.config.hidden_size == 64
    assert reloaded.dtype == torch.bfloat16
    assert (smaller / "tokenizer.json").is_file()


def test_create_mini_model_errors(demo: dict[str, Path], tmp_path: Path) -> None:
    error = cli.UserInputError
    with pytest.raises(error, match=f"tokenizer has {VOCAB_SIZE} tokens but the model's vocab_size is 100"):
        create_mini_model.create_mini_model(mini_args(demo, tmp_path / "a", vocab_size=100))
    with pytest.raises(error, match="not divisible by num_key_value_heads 3"):
        create_mini_model.create_mini_model(mini_args(demo, tmp_path / "b", num_key_value_heads=3))
    with pytest.raises(error, match="hidden_size 66 is not divisible by num_attention_heads 4"):
        create_mini_model.create_mini_model(mini_args(demo, tmp_path / "c", hidden_size=66))
    with pytest.raises(error, match="does not exist"):
        create_mini_model.create_mini_model(mini_args(demo, tmp_path / "d", model_id=str(tmp_path / "missing")))
    with pytest.raises(error, match="has no config.json"):
        create_mini_model.create_mini_model(mini_args(demo, tmp_path / "e", model_id=str(demo["root"])))
    with pytest.raises(error, match="exists and is not a model folder"):
        create_mini_model.create_mini_model(mini_args(demo, demo["root"]))
    source = create_mini_model.create_mini_model(mini_args(demo, tmp_path / "source"))
    with pytest.raises(error, match="would overwrite the source model"):
        create_mini_model.create_mini_model(mini_args(demo, source, model_id=str(source)))
