"""The experiment's tokenizer: a byte-level BPE trained on the training split, or a local one.

The trained tokenizer is saved as a Hugging Face tokenizer directory (so
`AutoTokenizer.from_pretrained` loads it and the server can hand it to clients) and
cached by a hash of the training text and the settings.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from skyfed.errors import DataError

EOS = "<|endoftext|>"


def text_hash(docs: list[str], *extra: object) -> str:
    h = hashlib.sha256()
    for item in extra:
        h.update(repr(item).encode())
    for doc in docs:
        h.update(doc.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def train_bpe(docs: list[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (as GPT-2's) on `docs` with the `tokenizers` library."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"tokenizer directory not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise DataError(f"cannot load tokenizer from {path}: {exc}") from None
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer in {path} has no end-of-sequence token")
    return tok


def get_tokenizer(
    docs: list[str], vocab_size: int, min_frequency: int, cache_dir: Path, path: str | None = None
) -> tuple[PreTrainedTokenizerFast, str]:
    """(tokenizer, its hash): loaded from `path`, or trained once and cached."""
    if path is not None:
        tok = load_tokenizer(path)
        return tok, text_hash([tok.backend_tokenizer.to_str()], "local")
    key = text_hash(docs, "bpe", vocab_size, min_frequency)
    folder = cache_dir / "tokenizers" / key
    if (folder / "tokenizer.json").exists():
        return load_tokenizer(folder), key
    tok = train_bpe(docs, vocab_size, min_frequency)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    tok.save_pretrained(str(tmp))
    try:
        tmp.rename(folder)
    except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(folder), key
