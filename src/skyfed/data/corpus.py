"""Read a text corpus into documents: WikiText files, a folder of .txt files, or JSONL.

A document is the unit that partitioners distribute: a WikiText article (split at
level-1 ``= Title =`` lines), one .txt file of a folder, or one JSONL record's ``text``.
"""

from __future__ import annotations

import json
import lzma
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

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


def _jsonl_docs(path: Path) -> list[str]:
    docs = []
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{i}: invalid JSON: {exc.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{i}: expected an object with a string 'text' field")
        if record["text"].strip():
            docs.append(record["text"])
    return docs


def read_documents(path: str | Path, fmt: str = "auto") -> list[str]:
    """All documents under `path` (a file or a folder), in a stable order."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl", ".xz"))
        if not files:
            raise DataError(f"no .txt or .jsonl files under {path}")
        docs: list[str] = []
        for f in files:
            if f.suffix == ".jsonl" or fmt == "jsonl":
                docs.extend(_jsonl_docs(f))
            else:  # one document per file unless the file is WikiText
                docs.extend(_text_file_docs(f, fmt, whole_file=True))
        return _nonempty(docs, path)
    if path.suffix == ".jsonl" or fmt == "jsonl":
        return _nonempty(_jsonl_docs(path), path)
    return _nonempty(_text_file_docs(path, fmt), path)


def _nonempty(docs: list[str], path: Path) -> list[str]:
    if not docs:
        raise DataError(f"no text found in {path}")
    return docs


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
) -> Corpus:
    """Train and validation documents; a validation split is carved when none is given."""
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
    train = read_documents(p, fmt)
    if valid_path is not None:
        return Corpus(train, read_documents(valid_path, fmt), str(p))
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
