"""Token ids on disk: a uint16 (or uint32) numpy memmap plus document offsets.

`tokenize_documents` caches by a hash of the tokenizer and the text, so a second run
does not re-tokenize. Every document ends with the EOS token; `offsets[i]:offsets[i+1]`
is document i, so partitioners can cut shards per document.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skyfed.data.tokenizer import text_hash


@dataclass
class TokenShard:
    tokens: np.ndarray  # 1-D ids, all documents back to back
    offsets: np.ndarray  # int64, len = num_docs + 1

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def subset(self, doc_indices: np.ndarray | list[int]) -> "TokenShard":
        """A new in-memory shard with the given documents, in the given order."""
        idx = np.asarray(doc_indices, dtype=np.int64)
        lengths = self.doc_lengths()[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if len(idx) == 0:
            return TokenShard(np.zeros(0, dtype=self.tokens.dtype), offsets)
        pieces = [self.tokens[self.offsets[i] : self.offsets[i + 1]] for i in idx]
        return TokenShard(np.concatenate(pieces), offsets)

    def truncate(self, max_tokens: int | None) -> "TokenShard":
        """Whole documents from the start, up to about `max_tokens` (at least one)."""
        if max_tokens is None or self.num_tokens <= max_tokens:
            return self
        n = max(1, int(np.searchsorted(self.offsets, max_tokens, side="right")) - 1)
        return TokenShard(self.tokens[: self.offsets[n]], self.offsets[: n + 1].copy())


ENCODE_BATCH = 1024  # documents per call of the fast tokenizer


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenize_documents(docs: list[str], tokenizer, tokenizer_key: str, cache_dir: Path) -> TokenShard:
    """Tokenize (or load from the cache) documents into a memmapped shard."""
    key = text_hash(docs, tokenizer_key)
    folder = cache_dir / "shards" / key
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))
        return TokenShard(tokens, np.load(folder / "offsets.npy"))
    dtype = _dtype_for(len(tokenizer))
    eos = tokenizer.eos_token_id
    pieces: list[np.ndarray] = []
    lengths = np.zeros(len(docs), dtype=np.int64)
    for start in range(0, len(docs), ENCODE_BATCH):  # a batch at a time: encodings are large objects
        encoded = tokenizer.backend_tokenizer.encode_batch(docs[start : start + ENCODE_BATCH], add_special_tokens=False)
        for i, e in enumerate(encoded, start):
            ids = np.empty(len(e.ids) + 1, dtype=dtype)
            ids[:-1] = e.ids
            ids[-1] = eos
            pieces.append(ids)
            lengths[i] = len(ids)
        del encoded
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    del pieces
    tmp = folder.with_name(f"{key}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tokens.tofile(tmp / "tokens.bin")
    np.save(tmp / "offsets.npy", offsets)
    (tmp / "meta.json").write_text(json.dumps({"dtype": dtype.name, "num_tokens": len(tokens), "num_docs": len(docs)}))
    try:
        tmp.rename(folder)
    except OSError:
        pass  # cached concurrently; our copy is equivalent
    return TokenShard(tokens, offsets)
