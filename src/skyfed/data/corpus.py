"""Read a text corpus into documents: WikiText files, a folder of .txt files, JSONL,
Parquet or a Hugging Face `datasets` folder (skyfed.data.records).

A document is the unit that partitioners distribute: a WikiText article (split at
level-1 ``= Title =`` lines), one .txt file of a folder (its paragraphs when the folder
has too few files), one paragraph of a single text file, or one record's text column.
"""

from __future__ import annotations

import lzma
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from skyfed.data.records import datasets_splits, is_datasets_dir, jsonl_texts, parquet_texts
from skyfed.errors import DataError

BUNDLED = "wikitext2"
_TITLE = re.compile(r"^ ?= [^=].* = ?$")


@dataclass
class Corpus:
    train: list[str]
    valid: list[str]
    source: str


def split_wikitext(text: str) -> list[str]:
    """Split WikiText into articles at level-1 title lines (`` = Title = ``)."""
    docs: list[list[str]] = []
    for line in text.splitlines():
        if _TITLE.match(line) or not docs:
            docs.append([])
        docs[-1].append(line)
    joined = ["\n".join(lines).strip() for lines in docs]
    return [d for d in joined if d]


def _split_paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _read_text(path: Path) -> str:
    try:
        if path.suffix == ".xz":
            return lzma.decompress(path.read_bytes()).decode("utf-8")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, lzma.LZMAError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _text_file_docs(path: Path, fmt: str, whole_file: bool = False) -> list[str]:
    """WikiText articles if the file is WikiText; else the whole file or its paragraphs."""
    text = _read_text(path)
    if fmt == "wikitext" or (fmt == "auto" and any(_TITLE.match(l) for l in text.splitlines()[:200])):
        return split_wikitext(text)
    return [text.strip()] if whole_file or fmt == "txt" else _split_paragraphs(text)


RECORD_SUFFIXES = (".jsonl", ".parquet")
TEXT_SUFFIXES = (".txt", ".xz", ".tokens")


def _record_docs(path: Path, fmt: str, column: str) -> list[str]:
    """One document per record of a JSONL or Parquet file (read as a stream)."""
    if fmt == "parquet" or path.suffix == ".parquet":
        return list(parquet_texts(path, column))
    return list(jsonl_texts(path, column))


def _is_record_file(path: Path, fmt: str) -> bool:
    return fmt in ("jsonl", "parquet") or path.suffix in RECORD_SUFFIXES or path.name.endswith(".jsonl.xz")


def read_documents(path: str | Path, fmt: str = "auto", text_column: str = "text", min_docs: int = 1) -> list[str]:
    """All documents under `path` (a file, a folder or a `datasets` folder), in a stable order.

    In a folder each text file is one document, unless the folder holds fewer than
    `min_docs` documents that way (say one large .txt file): then its text files are
    split into paragraphs, as a single file is."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if fmt == "datasets" or is_datasets_dir(path):
        train, valid = datasets_splits(path, text_column)
        return _nonempty(train + (valid or []), path)
    if path.is_dir():
        suffixes = TEXT_SUFFIXES + RECORD_SUFFIXES
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
        if not files:
            raise DataError(f"no .txt, .jsonl or .parquet files under {path}")
        docs = _folder_docs(files, fmt, text_column, whole_file=True)
        if len(docs) < min_docs:
            docs = _folder_docs(files, fmt, text_column, whole_file=False)
        return _nonempty(docs, path)
    if _is_record_file(path, fmt):
        return _nonempty(_record_docs(path, fmt, text_column), path)
    return _nonempty(_text_file_docs(path, fmt), path)


def _folder_docs(files: list[Path], fmt: str, column: str, whole_file: bool) -> list[str]:
    docs: list[str] = []
    for f in files:
        if _is_record_file(f, fmt):
            docs.extend(_record_docs(f, fmt, column))
        else:  # one document per file (or its paragraphs) unless the file is WikiText
            docs.extend(_text_file_docs(f, fmt, whole_file=whole_file))
    return docs


def _nonempty(docs: list[str], path: Path) -> list[str]:
    if not docs:
        raise DataError(f"no text found in {path}")
    return docs


def check_data_paths(path: str, valid_path: str | None = None) -> None:
    """The DataError that loading `path` (and `valid_path`) would raise for a path that does
    not exist, raised before any tokenizing or importing torch."""
    for p in (path, valid_path):
        if p is not None and p != BUNDLED and not Path(p).expanduser().exists():
            raise DataError(f"data path not found: {Path(p).expanduser()}")


def _bundled_dir() -> Path:
    return Path(str(resources.files("skyfed.data") / "wikitext2"))


def _split_dir_files(path: Path) -> tuple[Path, Path] | None:
    """A folder laid out like WikiText (train.txt + valid.txt) keeps its own splits."""
    for suffix in (".txt", ".txt.xz", ".tokens"):
        train, valid = path / f"train{suffix}", path / f"valid{suffix}"
        if train.is_file() and valid.is_file():
            return train, valid
    return None


def load_corpus(
    path: str = BUNDLED,
    fmt: str = "auto",
    valid_path: str | None = None,
    valid_fraction: float = 0.05,
    seed: int = 0,
    text_column: str = "text",
    min_train_docs: int = 1,
) -> Corpus:
    """Train and validation documents; a validation split is carved when none is given
    (a `datasets` folder's own validation split is used when it has one).

    `min_train_docs`: documents the training split needs (one per client); a folder of
    fewer files is read as paragraphs (see `read_documents`)."""
    if path == BUNDLED:
        root = _bundled_dir()
        return Corpus(
            split_wikitext(_read_text(root / "train.txt.xz")),
            split_wikitext(_read_text(root / "valid.txt.xz")),
            "bundled WikiText-2",
        )
    p = Path(path).expanduser()
    splits = _split_dir_files(p) if p.is_dir() and valid_path is None else None
    if splits:
        fmt_used = "wikitext" if fmt == "auto" else fmt
        return Corpus(_text_file_docs(splits[0], fmt_used), _text_file_docs(splits[1], fmt_used), str(p))
    if valid_path is not None:
        train = read_documents(p, fmt, text_column, min_train_docs)
        return Corpus(train, read_documents(valid_path, fmt, text_column), str(p))
    if p.exists() and (fmt == "datasets" or is_datasets_dir(p)):
        train, valid = datasets_splits(p, text_column)
        train = _nonempty(train, p)
        if valid:
            return Corpus(train, valid, str(p))
    else:
        train = read_documents(p, fmt, text_column, min_train_docs + 1)
    if len(train) < 2:
        raise DataError(f"{p}: need at least 2 documents to carve a validation split, found {len(train)}")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_valid = max(1, round(len(train) * valid_fraction))
    valid_idx = set(order[:n_valid])
    return Corpus(
        [d for i, d in enumerate(train) if i not in valid_idx],
        [d for i, d in enumerate(train) if i in valid_idx],
        str(p),
    )
