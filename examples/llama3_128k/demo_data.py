"""Build a small demo corpus and tokenizer fully offline, for trying the example without a hub.

    python examples/llama3_128k/demo_data.py --output_dir examples/llama3_128k/demo_output

writes
    <output_dir>/corpus.jsonl   one JSON object per line: {"name": ..., "text": ...}, the docstrings of
                                a fixed list of Python standard-library modules and their classes and
                                functions, in a fixed order
    <output_dir>/tokenizer/     a byte-level BPE tokenizer trained on that corpus, as a Hugging Face
                                tokenizer folder (AutoTokenizer.from_pretrained(<output_dir>/tokenizer))

Both are deterministic for a given Python version: running twice gives identical files.
They feed the other scripts as the real corpus and the real tokenizer would:

    python examples/llama3_128k/bookcorpus.py --data_path_or_name <output_dir>/corpus.jsonl \\
        --tokenizer_path_or_name <output_dir>/tokenizer --save_path ./data_4K --sequence_length 4096
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dimshard.cli import UserInputError, parse_dataclass_args

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"

# A fixed, sorted list so that the corpus does not depend on sys.stdlib_module_names, which changes
# between Python versions. Modules that act on import (this, antigravity, turtle, tkinter, idlelib)
# or warn that they are deprecated are left out on purpose. Packages whose public names live in
# submodules (asyncio, unittest, concurrent.futures) are listed by those submodules.
STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "asyncio.base_events", "asyncio.events",
    "asyncio.futures", "asyncio.locks", "asyncio.queues", "asyncio.streams", "asyncio.subprocess",
    "asyncio.tasks", "base64", "bdb", "bisect", "builtins", "bz2", "calendar", "cmath", "cmd",
    "code", "codecs", "codeop", "collections", "colorsys", "compileall", "concurrent.futures._base",
    "concurrent.futures.process", "concurrent.futures.thread", "configparser", "contextlib",
    "contextvars", "copy", "copyreg", "csv", "ctypes", "dataclasses", "datetime", "dbm", "decimal",
    "difflib", "dis", "doctest", "email.headerregistry", "email.message", "email.parser",
    "email.policy", "email.utils", "enum", "errno", "faulthandler", "filecmp", "fileinput",
    "fnmatch", "fractions", "ftplib", "functools", "gc", "getopt", "getpass", "gettext", "glob",
    "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "http.cookiejar",
    "http.cookies", "http.server", "imaplib", "importlib", "importlib.abc", "importlib.metadata",
    "importlib.resources", "inspect", "io", "ipaddress", "itertools", "json", "keyword",
    "linecache", "locale", "logging", "logging.config", "logging.handlers", "lzma", "mailbox",
    "math", "mimetypes", "mmap", "modulefinder", "multiprocessing.connection",
    "multiprocessing.managers", "multiprocessing.pool", "netrc", "numbers", "operator", "optparse",
    "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib",
    "pprint", "profile", "pstats", "pty", "py_compile", "pydoc", "queue", "quopri", "random", "re",
    "reprlib", "rlcompleter", "runpy", "sched", "secrets", "select", "selectors", "shelve", "shlex",
    "shutil", "signal", "site", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat",
    "statistics", "string", "struct", "subprocess", "symtable", "sys", "sysconfig", "tabnanny",
    "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "token", "tokenize", "trace",
    "traceback", "tracemalloc", "tty", "types", "typing", "unicodedata", "unittest",
    "unittest.case", "unittest.loader", "unittest.mock", "unittest.result", "unittest.runner",
    "unittest.suite", "urllib.error", "urllib.parse", "urllib.request", "urllib.robotparser",
    "uuid", "warnings", "wave", "weakref", "webbrowser", "wsgiref.handlers",
    "wsgiref.simple_server", "xml.dom.minidom", "xml.etree.ElementTree", "xml.sax",
    "xml.sax.handler", "xml.sax.saxutils", "xmlrpc.client", "xmlrpc.server", "zipapp", "zipfile",
    "zipimport", "zlib", "zoneinfo",
)


@dataclass
class DemoDataArgs:
    """Build a small docstring corpus (JSONL) and a byte-level BPE tokenizer, offline."""

    output_dir: str = field(metadata={"help": "folder to write corpus.jsonl and tokenizer/ into"})
    vocab_size: int = field(default=2048, metadata={
        "help": "tokenizer vocabulary size, special tokens included (at least 259: 256 bytes + 3 specials)"})
    max_chars: int = field(default=2_000_000, metadata={
        "help": "upper bound on the corpus size in characters; documents that would pass it are skipped"})


def _module_docstrings(module_name: str) -> list[tuple[str, str | None]]:
    """(qualified name, docstring) of a module and of its public classes, routines and methods
    defined in the module itself, members sorted by name; [] if the module cannot be imported."""
    # Importing some modules and reading some attributes (typing.io, typing.re) warns about
    # deprecation; the corpus does not care, and the warnings would only be noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return []  # e.g. sqlite3 on a Python built without it
        docs = [(module_name, inspect.getdoc(module))]
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            docs.append((f"{module_name}.{name}", inspect.getdoc(obj)))
            if not inspect.isclass(obj):
                continue
            for member_name, member in sorted(vars(obj).items()):
                if member_name.startswith("_"):
                    continue
                if inspect.isroutine(member) or isinstance(member, (property, classmethod, staticmethod)):
                    docs.append((f"{module_name}.{name}.{member_name}", inspect.getdoc(member)))
    return docs


def iter_docstrings(module_names: tuple[str, ...] = STDLIB_MODULES) -> Iterator[tuple[str, str]]:
    """Yield (qualified name, docstring) for each module and its public classes, functions and
    methods, in a fixed order: modules as listed, members sorted by name.

    Only objects defined in the module itself are visited (so re-exports are not repeated), and a
    docstring already yielded is not yielded again. Modules that cannot be imported are skipped.
    """
    seen: set[str] = set()
    for module_name in module_names:
        for name, doc in _module_docstrings(module_name):
            if doc and doc.strip() and doc not in seen:
                seen.add(doc)
                yield name, doc


def build_corpus(output_path: str | Path, max_chars: int = 2_000_000) -> Path:
    """Write the docstring corpus to ``output_path`` as JSONL (fields ``name`` and ``text``).

    Each document is ``"<qualified name>\\n\\n<docstring>"``. Documents are taken in the order of
    ``iter_docstrings``; one that would push the total text past ``max_chars`` characters is skipped,
    so the corpus holds at most ``max_chars`` characters of text. Returns the path written.
    """
    if max_chars <= 0:
        raise UserInputError(f"--max_chars must be positive, got {max_chars}")
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    total_chars = 0
    documents = 0
    with output_path.open("w", encoding="utf-8") as out:
        for name, doc in iter_docstrings():
            text = f"{name}\n\n{doc}"
            if total_chars + len(text) > max_chars:
                continue
            out.write(json.dumps({"name": name, "text": text}, ensure_ascii=False) + "\n")
            total_chars += len(text)
            documents += 1
    if documents == 0:
        raise UserInputError(f"no docstring fits in --max_chars {max_chars}; pass a larger --max_chars")
    return output_path


def _read_texts(corpus_path: Path) -> list[str]:
    with corpus_path.open(encoding="utf-8") as lines:
        return [json.loads(line)["text"] for line in lines if line.strip()]


def train_tokenizer(corpus_path: str | Path, output_dir: str | Path, vocab_size: int = 2048) -> Path:
    """Train a byte-level BPE tokenizer on the ``text`` fields of a JSONL corpus and save it to
    ``output_dir`` as a Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json).

    Like Llama 3's tokenizer it has ``<|begin_of_text|>`` (bos, id 0), ``<|end_of_text|>`` (eos,
    id 1) and ``<|pad|>`` (pad, id 2), encodes any byte string, and prepends bos when called with
    ``add_special_tokens=True``. ``len(tokenizer) == vocab_size`` unless the corpus is too small to
    learn that many merges. Returns ``output_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise UserInputError(f"--vocab_size {vocab_size} is too small: a byte-level tokenizer needs "
                             f"{len(alphabet)} byte tokens plus {len(special_tokens)} special tokens; "
                             f"pass at least {len(alphabet) + len(special_tokens)}")
    corpus_path = Path(corpus_path)
    if not corpus_path.is_file():
        raise UserInputError(f"corpus file {corpus_path} does not exist; build it with build_corpus first")
    texts = _read_texts(corpus_path)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
            special_tokens=[(BOS_TOKEN, 0)],
        ),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,  # ids 0, 1, 2 in this order
        initial_alphabet=alphabet,
        min_frequency=2,
        show_progress=sys.stderr.isatty(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    hf_tokenizer.save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: build corpus.jsonl and tokenizer/ under --output_dir."""
    args = parse_dataclass_args(DemoDataArgs, argv)
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    try:
        corpus_path = build_corpus(output_dir / "corpus.jsonl", max_chars=args.max_chars)
        texts = _read_texts(corpus_path)
        print(f"corpus: {corpus_path} ({len(texts)} documents, {sum(map(len, texts)):,} characters)")
        tokenizer_dir = train_tokenizer(corpus_path, output_dir / "tokenizer", vocab_size=args.vocab_size)
    except UserInputError as error:
        sys.exit(f"error: {error}")
    print(f"tokenizer: {tokenizer_dir} (vocab_size {args.vocab_size})")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
