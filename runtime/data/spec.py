"""A data spec: the text sources a run trains on, how they are mixed, and the checks made up front.

A spec is one or more sources, each a hub dataset name or local data files (a file, a folder of
files, or a glob; .jsonl/.json, .parquet, .txt, .csv, .arrow, optionally compressed), with an
optional config, split and text column, plus one mixing probability per source. ``check_data_spec``
opens every source and the tokenizer before any GPU work and raises ``DataSpecError`` with one line
saying what to fix: a missing file or hub name, an unknown text column, bad probabilities, a
source without text, a tokenizer that does not fit the model's vocabulary.

Local files always form one split (``train``); ``split`` picks a split of a hub dataset or of a
``save_to_disk`` DatasetDict folder. A .txt file is one document per file (not per line).
"""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dimshard.cli import UserInputError, looks_like_local_path

# Extension of a local data file -> the datasets builder that reads it.
FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                 ".csv": "csv", ".arrow": "arrow"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
# Rows looked at to decide whether a source holds any text at all.
EMPTY_CHECK_ROWS = 100


class DataSpecError(UserInputError):
    """A data spec that cannot work; the message says which source and what to change."""


@dataclass(frozen=True)
class DataSource:
    """One source of documents: where it is, which part of it, which column holds the text."""

    name: str  # hub dataset name, or a local file / folder / glob
    probability: float  # normalised mixing weight (the spec's weights sum to 1)
    config: str | None = None  # hub dataset config name
    split: str = "train"
    text_column: str = "text"


@dataclass(frozen=True)
class DataSpec:
    """Sources, how to read them and how to turn them into training sequences (picklable)."""

    sources: tuple[DataSource, ...]
    tokenizer: str  # tokenizer folder or hub id (AutoTokenizer)
    streaming: bool = False  # read without a full local copy (datasets IterableDataset)
    shuffle_buffer: int = 10_000  # documents in the streaming shuffle buffer; 0: no shuffle
    document_masking: bool = False  # batches carry position_ids / document_ids; no loss across documents
    add_bos: bool = True  # prefix each document with the tokenizer's BOS token (when it has one)
    cache_dir: str | None = None  # datasets cache for non-streaming local copies (None: HF default)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # room for loader options


def _split_list(text: str, count: int, flag: str, default: str | None) -> list[str | None]:
    """``a,b`` -> per-source values; one value applies to all sources, an empty entry is the default."""
    if not text:
        return [default] * count
    values = [value.strip() or default for value in text.split(",")]
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise DataSpecError(f"--{flag} has {len(values)} entries but --data_sources has {count}: give one entry "
                            f"per source (or a single one for all)")
    return values


def parse_data_spec(
    sources: str,
    probs: str = "",
    *,
    tokenizer: str,
    configs: str = "",
    splits: str = "",
    text_columns: str = "",
    streaming: bool = False,
    shuffle_buffer: int = 10_000,
    document_masking: bool = False,
    cache_dir: str | None = None,
) -> DataSpec:
    """Build a DataSpec from comma-separated flag values (one entry per source); nothing is opened.

    ``probs`` empty means equal weights; otherwise one non-negative number per source, not all zero,
    normalised to sum to 1. Raises DataSpecError on a count mismatch or a bad probability.
    """
    names = [name.strip() for name in sources.split(",") if name.strip()]
    if not names:
        raise DataSpecError("--data_sources is empty: name one or more hub datasets or local data files, "
                            "comma-separated")
    entries = [entry.strip() for entry in probs.split(",")] if probs else ["1"] * len(names)
    if len(entries) != len(names):
        raise DataSpecError(f"--data_probs has {len(entries)} entries but --data_sources has {len(names)}: give "
                            f"one probability per source")
    weights: list[float] = []
    for entry in entries:
        try:
            weight = float(entry)
        except ValueError:
            raise DataSpecError(f"--data_probs entry {entry!r} is not a number: give one probability per "
                                f"source, e.g. --data_probs 0.7,0.3") from None
        if not math.isfinite(weight) or weight < 0:
            raise DataSpecError(f"--data_probs entry {entry!r} must be a finite number >= 0")
        weights.append(weight)
    total = sum(weights)
    if total <= 0:
        raise DataSpecError("--data_probs are all zero: give at least one source a positive probability")
    if shuffle_buffer < 0:
        raise DataSpecError(f"--data_shuffle_buffer must be >= 0, got {shuffle_buffer}")
    if not tokenizer:
        raise DataSpecError("a data spec needs a tokenizer: pass --tokenizer, or a --model_id folder holding one")
    per_config = _split_list(configs, len(names), "data_configs", None)
    per_split = _split_list(splits, len(names), "data_splits", "train")
    per_column = _split_list(text_columns, len(names), "data_text_columns", "text")
    return DataSpec(
        sources=tuple(DataSource(name, weight / total, config, split or "train", column or "text")
                      for name, weight, config, split, column in zip(names, weights, per_config, per_split,
                                                                     per_column)),
        tokenizer=tokenizer, streaming=streaming, shuffle_buffer=shuffle_buffer,
        document_masking=document_masking, cache_dir=cache_dir,
    )


def builder_for(path: Path) -> str | None:
    """The datasets builder for a data file, judged by its extension (compression suffix ignored)."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return FILE_BUILDERS.get(suffixes[-1]) if suffixes else None


def local_files(name: str) -> list[Path] | None:
    """The data files a local source names (sorted), or None when ``name`` is not a local path or glob.

    Raises DataSpecError for a missing path, a folder or glob without data files, or mixed formats.
    """
    path = Path(name).expanduser()
    if any(char in name for char in "*?["):
        files = sorted(Path(match) for match in glob.glob(str(path), recursive=True) if Path(match).is_file())
    elif path.is_dir():
        files = sorted(file for file in path.rglob("*") if file.is_file()
                       and not any(part.startswith(".") for part in file.relative_to(path).parts))
    elif path.is_file():
        if builder_for(path) is None:
            raise DataSpecError(f"data source {name}: cannot tell its format from the extension; use one of "
                                f"{', '.join(sorted(FILE_BUILDERS))}")
        return [path]
    elif looks_like_local_path(name):
        raise DataSpecError(f"data source {name}: no such file or folder; check the path in --data_sources")
    else:
        return None
    files = [file for file in files if builder_for(file) is not None]
    if not files:
        raise DataSpecError(f"data source {name} holds no data files ({', '.join(sorted(FILE_BUILDERS))}); "
                            f"check the path in --data_sources")
    if len({builder_for(file) for file in files}) != 1:
        raise DataSpecError(f"data source {name} mixes data formats; give files of one format per source "
                            f"(list the others as separate sources)")
    return files


def open_source(source: DataSource, streaming: bool, cache_dir: str | None = None) -> Any:
    """The source as a ``datasets.Dataset`` (or ``IterableDataset`` when streaming).

    Raises DataSpecError when it cannot be found or read, or when its text column is missing.
    """
    import datasets

    path = Path(source.name).expanduser()
    files = None if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file() else \
        local_files(source.name)
    try:
        if files is not None:
            builder = builder_for(files[0])
            options = {"sample_by": "document"} if builder == "text" else {}
            dataset = datasets.load_dataset(builder, data_files=[str(file) for file in files], split="train",
                                            streaming=streaming, cache_dir=cache_dir, **options)
        elif path.is_dir():
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if source.split not in dataset:
                    raise DataSpecError(f"data source {source.name} has no split {source.split!r}; its splits "
                                        f"are {sorted(dataset)}: fix --data_splits")
                dataset = dataset[source.split]
            if streaming:
                dataset = dataset.to_iterable_dataset()
        else:
            dataset = datasets.load_dataset(source.name, source.config, split=source.split, streaming=streaming,
                                            cache_dir=cache_dir)
    except DataSpecError:
        raise
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as error:
        what = "local data files" if files is not None or path.exists() else "a hub dataset"
        reason = (str(error.__cause__ or error).strip().splitlines() or [""])[0][:300]
        raise DataSpecError(f"data source {source.name}: could not open it as {what} ({type(error).__name__}: "
                            f"{reason}); check the name, --data_configs and --data_splits") from None
    columns = dataset.column_names
    if columns is None:  # a streaming source whose features are only known after reading
        first = next(iter(dataset), None)
        columns = list(first) if first is not None else []
    if source.text_column not in columns:
        raise DataSpecError(f"data source {source.name} has no column {source.text_column!r} (columns: "
                            f"{sorted(columns)}); pick one with --data_text_columns")
    return dataset


def has_text(dataset: Any, text_column: str, rows: int = EMPTY_CHECK_ROWS) -> bool:
    """Whether one of the first ``rows`` rows holds a non-empty string in ``text_column``."""
    for index, row in enumerate(dataset):
        if index >= rows:
            return False
        text = row.get(text_column)
        if isinstance(text, str) and text:
            return True
    return False


def load_tokenizer(name: str, flag: str = "--tokenizer") -> Any:
    """A fast tokenizer (AutoTokenizer) with an EOS token; raises DataSpecError (a UserInputError)
    saying what to pass, naming the command-line ``flag`` that gave ``name``."""
    from transformers import AutoTokenizer

    path = Path(name).expanduser()
    if not path.exists() and looks_like_local_path(name):
        raise DataSpecError(f"{flag} {name}: no such folder; pass a tokenizer folder (e.g. one written by "
                            "demo_data.py) or a hub id")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.exists() else name)
    except (OSError, ValueError) as error:
        raise DataSpecError(f"could not load tokenizer {name!r} ({str(error).splitlines()[0][:200]}); pass "
                            f"{flag} with a folder holding tokenizer.json, or a reachable hub id") from None
    if tokenizer.eos_token_id is None:
        raise DataSpecError(f"tokenizer {name!r} has no EOS token, so packed documents could not be told apart; "
                            f"set eos_token in its tokenizer_config.json or pass another {flag}")
    return tokenizer


def check_data_spec(spec: DataSpec, vocab_size: int | None = None, dp_size: int = 1) -> None:
    """Open the tokenizer and every source of ``spec`` and check they can feed training.

    Checks: the tokenizer loads, has EOS and all its ids fit ``vocab_size`` (the model's); every
    source opens, has its text column and text in its first rows; a non-streaming source has at
    least ``dp_size`` rows (each data-parallel copy reads its own rows). Raises DataSpecError.
    """
    tokenizer = load_tokenizer(spec.tokenizer)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise DataSpecError(f"tokenizer {spec.tokenizer} has {len(tokenizer)} tokens but the model's vocab_size is "
                            f"{vocab_size}: pass the --tokenizer the model was trained with")
    for source in spec.sources:
        dataset = open_source(source, spec.streaming, spec.cache_dir)
        if not has_text(dataset, source.text_column):
            raise DataSpecError(f"data source {source.name} is empty or its first {EMPTY_CHECK_ROWS} rows have no "
                                f"text in column {source.text_column!r}; check the files or --data_text_columns")
        if not spec.streaming and len(dataset) < dp_size:
            raise DataSpecError(f"data source {source.name} has {len(dataset)} rows, fewer than the {dp_size} "
                                f"data-parallel copies that each read their own rows; add data or use fewer copies")


def spec_from_config(config: Any) -> DataSpec | None:
    """The DataSpec a TrainConfig's ``--data_*`` flags describe, or None when it names no data sources.

    The tokenizer defaults to ``config.model_id``; loader options (workers, prefetch) ride in ``extra``.
    """
    if not config.data_sources:
        return None
    spec = parse_data_spec(
        config.data_sources, config.data_probs, tokenizer=config.tokenizer or config.model_id,
        configs=config.data_configs, splits=config.data_splits, text_columns=config.data_text_columns,
        streaming=config.data_streaming, shuffle_buffer=config.data_shuffle_buffer,
        document_masking=config.document_masking,
    )
    spec.extra.update(workers=config.data_workers, prefetch=config.data_prefetch)
    return spec
