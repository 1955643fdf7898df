"""Tokenize a text corpus and pack it into fixed-length training sequences.

    python examples/llama3_128k/bookcorpus.py --data_path_or_name bookcorpus/bookcorpus \\
        --tokenizer_path_or_name <Llama-3 tokenizer dir> --save_path ./data_128K --sequence_length 131072

The corpus is a hub dataset name, a local data file (.txt, .json, .jsonl, .parquet, .csv, .arrow,
optionally compressed), a folder of such files, or a folder written by ``save_to_disk``.
Every document becomes ``[bos] + tokens + [eos]`` (bos only when the tokenizer has one and
``--add_bos`` is on); all documents are concatenated in corpus order and cut into sequences of
exactly ``--sequence_length`` tokens; the tokens left over at the end are dropped.
The result is saved with ``save_to_disk`` as one column ``input_ids`` of int32 lists, and is
identical every time the script runs on the same corpus and tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dimshard.cli import UserInputError, looks_like_local_path, parse_dataclass_args
from dimshard.runtime.data.spec import load_tokenizer

# Extension of a local data file -> the datasets builder that reads it.
DATA_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                 ".csv": "csv", ".arrow": "arrow"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
TOKENIZE_BATCH_SIZE = 1000  # documents per tokenizer call (the fast tokenizer works on a batch at once)


@dataclass
class CorpusArgs:
    """Tokenize a corpus, append EOS to every document and pack it into sequences of equal length."""

    data_path_or_name: str = field(metadata={
        "help": "hub dataset name, or a local data file / folder of files / save_to_disk folder"})
    tokenizer_path_or_name: str = field(metadata={"help": "tokenizer folder, or hub id, for AutoTokenizer"})
    save_path: str = field(metadata={"help": "folder to save the packed dataset to (save_to_disk)"})
    sequence_length: int = field(default=131072, metadata={"help": "tokens in every packed sequence"})
    num_proc: int | None = field(default=None, metadata={
        "help": "worker processes for tokenization (default: one process)"})
    split: str = field(default="train", metadata={
        "help": "split of a hub dataset or of a saved DatasetDict (local data files form one split)"})
    text_column: str = field(default="text", metadata={"help": "column that holds the document text"})
    max_samples: int | None = field(default=None, metadata={
        "help": "use only the first N documents of the split (default: all)"})
    dataset_config_name: str | None = field(default=None, metadata={
        "help": "configuration (subset) name of a hub dataset, if it has several"})
    add_bos: bool = field(default=True, metadata={
        "help": "prepend the tokenizer's BOS token to every document (when the tokenizer has one)"})
    txt_sample_by: Literal["line", "paragraph", "document"] = field(default="line", metadata={
        "help": "for .txt input: one document per line, per blank-line separated paragraph, or per file"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "cache folder for datasets' downloads and tokenized data (default: HF_DATASETS_CACHE)"})

    def __post_init__(self) -> None:
        if self.sequence_length < 1:
            raise UserInputError(f"--sequence_length must be positive, got {self.sequence_length}")
        if self.num_proc is not None and self.num_proc < 1:
            raise UserInputError(f"--num_proc must be at least 1, got {self.num_proc}")
        if self.max_samples is not None and self.max_samples < 1:
            raise UserInputError(f"--max_samples must be at least 1, got {self.max_samples}")


def _builder_for(path: Path) -> str | None:
    """The datasets builder for a data file, judged by its extension (compression suffix ignored)."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return DATA_BUILDERS.get(suffixes[-1]) if suffixes else None


def _load_data_files(files: list[Path], args: CorpusArgs) -> Any:
    """Load local data files (all of one format) as a single ``train`` split, in the given order."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    builders = sorted({_builder_for(file) for file in files})
    if len(builders) != 1:
        raise UserInputError(f"{args.data_path_or_name} mixes data formats ({', '.join(builders)}); "
                             f"put files of one format in a folder, or convert them to one format")
    builder = builders[0]
    options = {"sample_by": args.txt_sample_by} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=[str(file) for file in files], split="train",
                                     cache_dir=args.cache_dir, **options)
    except DatasetGenerationError as error:
        cause = error.__cause__ or error
        reason = (str(cause).strip().splitlines() or [""])[0][:300]  # arrow cast errors run to pages
        shown = ", ".join(str(file) for file in files[:3]) + (", ..." if len(files) > 3 else "")
        raise UserInputError(f"could not read {len(files)} {builder} file(s) ({shown}): "
                             f"{type(cause).__name__}: {reason}; check that every file under "
                             f"{args.data_path_or_name} is a {builder} data file") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def _load_saved(path: Path, split: str) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as error:  # a truncated .arrow file, a corrupt state.json (pyarrow/json errors)
        raise UserInputError(f"{path} is a save_to_disk folder that cannot be read ({type(error).__name__}: "
                             f"{_first_line(error)}); it is partial or corrupt: save it again, or point "
                             f"--data_path_or_name at the original data files") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserInputError(f"{path} has no split {split!r}; its splits are {sorted(loaded)}: "
                                 f"pass one with --split")
        return loaded[split]
    return loaded


def load_corpus(args: CorpusArgs) -> Any:
    """Load the corpus named by ``args.data_path_or_name`` as one ``datasets.Dataset``.

    Local paths are read offline: a save_to_disk folder with ``load_from_disk`` (``args.split``
    picks a split of a DatasetDict), a data file or a folder of data files (sorted by path, hidden
    files and unknown extensions skipped) with the builder their extension names. Anything else is a
    hub dataset, loaded with ``args.dataset_config_name`` and ``args.split``. Raises UserInputError
    for a missing path, a folder without data, or a hub dataset that cannot be loaded.
    """
    import datasets

    path = Path(args.data_path_or_name).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _load_saved(path, args.split)
        files = sorted(file for file in path.rglob("*")
                       if file.is_file() and _builder_for(file) is not None
                       and not any(part.startswith(".") for part in file.relative_to(path).parts))
        if not files:
            raise UserInputError(f"folder {path} holds no data files (looked for "
                                 f"{', '.join(sorted(DATA_BUILDERS))}) and no save_to_disk dataset; "
                                 f"point --data_path_or_name at your data")
        return _load_data_files(files, args)
    if path.is_file():
        if _builder_for(path) is None:
            raise UserInputError(f"cannot tell the format of {path} from its extension; use one of "
                                 f"{', '.join(sorted(DATA_BUILDERS))}")
        return _load_data_files([path], args)
    if looks_like_local_path(args.data_path_or_name):
        raise UserInputError(f"--data_path_or_name {args.data_path_or_name}: no such file or folder; "
                             f"check the path, or pass a hub dataset name such as bookcorpus/bookcorpus")
    try:
        return datasets.load_dataset(args.data_path_or_name, args.dataset_config_name, split=args.split,
                                     cache_dir=args.cache_dir)
    except (OSError, ValueError) as error:  # not found, offline (ConnectionError is an OSError), bad split
        raise UserInputError(f"could not load hub dataset {args.data_path_or_name!r} ({error}); check the "
                             f"name, --dataset_config_name and --split, or pass local data files") from None


def _tokenize_batch(batch: dict[str, list], tokenizer: Any, text_column: str, bos_token_id: int | None,
                    eos_token_id: int) -> dict[str, list[list[int]]]:
    """[bos] + tokens + [eos] per document; an empty or missing text gives an empty list (skipped)."""
    texts = batch[text_column]
    has_text = [isinstance(text, str) and bool(text.strip()) for text in texts]
    encoded = tokenizer([text if keep else "" for text, keep in zip(texts, has_text)],
                        add_special_tokens=False)["input_ids"]
    prefix = [bos_token_id] if bos_token_id is not None else []
    return {"input_ids": [prefix + ids + [eos_token_id] if keep else [] for ids, keep in zip(encoded, has_text)]}


def tokenize_corpus(corpus: Any, tokenizer: Any, args: CorpusArgs) -> Any:
    """Map every document of ``corpus`` to one ``input_ids`` list (int32), keeping the corpus order.

    Raises UserInputError when ``args.text_column`` is missing or does not hold strings.
    """
    import datasets

    if args.text_column not in corpus.column_names:
        raise UserInputError(f"the corpus has no column {args.text_column!r}; its columns are "
                             f"{corpus.column_names}: pass the one holding the text with --text_column")
    feature = corpus.features[args.text_column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise UserInputError(f"column {args.text_column!r} holds {feature}, not text; pass the column "
                             f"holding the text with --text_column (columns: {corpus.column_names})")
    if args.num_proc and args.num_proc > 1:
        # Worker processes are forked; the Rust tokenizer's own threads would deadlock in them.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    bos_token_id = tokenizer.bos_token_id if args.add_bos else None
    return corpus.map(
        _tokenize_batch,
        batched=True,
        batch_size=TOKENIZE_BATCH_SIZE,
        num_proc=args.num_proc,
        remove_columns=corpus.column_names,
        features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))}),
        fn_kwargs={"tokenizer": tokenizer, "text_column": args.text_column,
                   "bos_token_id": bos_token_id, "eos_token_id": tokenizer.eos_token_id},
        desc="Tokenizing",
    )


def count_tokens(tokenized: Any) -> int:
    """Total number of tokens in the ``input_ids`` column."""
    import pyarrow.compute as pc

    total = 0
    for table in tokenized.with_format("arrow").iter(batch_size=100_000):
        total += pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0
    return total


def pack_to_file(tokenized: Any, sequence_length: int, arrow_path: Path) -> tuple[int, str]:
    """Concatenate all ``input_ids`` in order and write full sequences of ``sequence_length`` tokens
    to ``arrow_path`` (Arrow stream file, one int32 list column ``input_ids``).

    Memory stays at about one batch of documents plus one sequence. Returns the number of
    sequences written (the tail shorter than one sequence is dropped) and a 16-hex-digit digest of
    their contents, usable as the dataset's fingerprint.
    """
    import datasets
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from tqdm import tqdm

    schema = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))}).arrow_schema
    carry = np.empty(0, dtype=np.int32)
    sequences = 0
    digest = hashlib.sha256(f"input_ids int32 x {sequence_length}".encode())
    with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer, \
            tqdm(total=len(tokenized), unit="doc", desc="Packing") as progress:
        for table in tokenized.with_format("arrow").iter(batch_size=TOKENIZE_BATCH_SIZE):
            values = pc.list_flatten(table.column("input_ids")).to_numpy()
            tokens = np.concatenate([carry, values.astype(np.int32, copy=False)])
            full = len(tokens) // sequence_length
            if full:
                flat = pa.array(tokens[: full * sequence_length], type=pa.int32())
                offsets = pa.array(np.arange(0, full * sequence_length + 1, sequence_length, dtype=np.int32))
                column = pa.ListArray.from_arrays(offsets, flat, type=pa.list_(pa.int32()))
                writer.write_batch(pa.record_batch([column], schema=schema))
                digest.update(tokens[: full * sequence_length].tobytes())
                sequences += full
            carry = tokens[full * sequence_length:].copy()
            progress.update(table.num_rows)
    return sequences, digest.hexdigest()[:16]


def prepare_dataset(args: CorpusArgs) -> Any:
    """Load, tokenize and pack the corpus, save it to ``args.save_path`` and return it (as reloaded
    from there).

    Every row of the result is ``{"input_ids": list of args.sequence_length int32 token ids}``; every
    document contributes its tokens followed by the tokenizer's EOS id. The same inputs always give
    the same rows. An existing dataset at ``save_path`` is replaced only after the new one is
    complete. Raises UserInputError for missing inputs, a missing text column, a tokenizer without
    EOS, or a corpus with fewer tokens than one sequence.
    """
    import datasets
    from datasets.table import MemoryMappedTable

    save_path = Path(args.save_path).expanduser().resolve()
    source = Path(args.data_path_or_name).expanduser()
    if source.exists() and save_path == source.resolve():
        raise UserInputError(f"--save_path {save_path} is the input corpus itself; pick another folder")
    if save_path.exists() and not (save_path / "state.json").is_file() and any(save_path.iterdir()):
        raise UserInputError(f"--save_path {save_path} exists and is not a saved dataset; pick a new or "
                             f"empty folder so that nothing else there is overwritten")

    tokenizer = load_tokenizer(args.tokenizer_path_or_name, flag="--tokenizer_path_or_name")
    corpus = load_corpus(args)
    if args.max_samples is not None:
        corpus = corpus.select(range(min(args.max_samples, len(corpus))))
    tokenized = tokenize_corpus(corpus, tokenizer, args)
    total_tokens = count_tokens(tokenized)
    if total_tokens < args.sequence_length:
        raise UserInputError(f"the corpus has only {total_tokens} tokens ({len(corpus)} documents), fewer "
                             f"than one sequence of {args.sequence_length}; use more data or a smaller "
                             f"--sequence_length")

    # Build next to save_path, then swap in, so that a failed run never leaves half a dataset there.
    staging = save_path.with_name(save_path.name + ".partial")
    packing_dir = save_path.with_name(save_path.name + ".packing")
    for leftover in (staging, packing_dir):
        shutil.rmtree(leftover, ignore_errors=True)
    packing_dir.mkdir(parents=True)
    try:
        arrow_path = packing_dir / "packed.arrow"
        sequences, fingerprint = pack_to_file(tokenized, args.sequence_length, arrow_path)
        # A content fingerprint (from_file would pick a random one) keeps state.json identical
        # across runs and lets datasets' caching recognise the same packed data.
        packed = datasets.Dataset(MemoryMappedTable.from_file(str(arrow_path)), fingerprint=fingerprint)
        packed.save_to_disk(str(staging))
        if save_path.exists():
            shutil.rmtree(save_path)
        staging.rename(save_path)
    finally:
        shutil.rmtree(packing_dir, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)

    dropped = total_tokens - sequences * args.sequence_length
    print(f"{len(corpus)} documents, {total_tokens:,} tokens -> {sequences} sequences of "
          f"{args.sequence_length} tokens ({dropped:,} tail tokens dropped), saved to {save_path}")
    return datasets.load_from_disk(str(save_path))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: parse the flags and run ``prepare_dataset``."""
    try:
        args = parse_dataclass_args(CorpusArgs, argv)
        prepare_dataset(args)
    except UserInputError as error:
        sys.exit(f"error: {error}")
    except (OSError, ValueError) as error:  # data that went bad after it was opened, a full disk, ...
        sys.exit(f"error: {type(error).__name__}: {_first_line(error)}; check the corpus files and that "
                 f"--save_path is on a disk with free space")


if __name__ == "__main__":
    main()
