from pathlib import Path

import numpy as np

from skyfed.data.partition import partition_documents
from skyfed.data.shards import tokenize_documents
from skyfed.data.tokenizer import EOS, get_tokenizer

DOCS = [f"The quick brown fox number {i} jumps over the lazy dog. " * (i % 5 + 1) for i in range(60)]


def _tokenizer(tmp_path: Path):
    return get_tokenizer(DOCS, 300, 1, tmp_path)


def test_bpe_tokenizer_round_trips_and_is_cached(tmp_path):
    tok, key = _tokenizer(tmp_path)
    assert len(tok) <= 300 and tok.eos_token == EOS
    text = "The quick brown fox"
    assert tok.decode(tok(text).input_ids) == text
    tok2, key2 = _tokenizer(tmp_path)
    assert key2 == key and tok2.get_vocab() == tok.get_vocab()


def test_shards_keep_document_boundaries_and_cache(tmp_path):
    tok, key = _tokenizer(tmp_path)
    shard = tokenize_documents(DOCS, tok, key, tmp_path)
    assert shard.tokens.dtype == np.uint16
    assert shard.num_docs == len(DOCS)
    ends = shard.offsets[1:] - 1
    assert (np.asarray(shard.tokens)[ends] == tok.eos_token_id).all()
    first = np.asarray(shard.tokens[: shard.offsets[1] - 1]).tolist()
    assert first == tok(DOCS[0], add_special_tokens=False).input_ids
    assert not isinstance(shard.tokens, np.memmap)  # freshly tokenized
    again = tokenize_documents(DOCS, tok, key, tmp_path)
    assert isinstance(again.tokens, np.memmap)  # read back from the cache, not re-tokenized
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(shard.tokens))


def test_partitions_cover_every_token_once(tmp_path):
    tok, key = _tokenizer(tmp_path)
    shard = tokenize_documents(DOCS, tok, key, tmp_path)
    for method in ("iid", "natural"):
        parts = partition_documents(method, shard.doc_lengths(), 3, seed=1)
        all_docs = np.concatenate(parts)
        assert sorted(all_docs.tolist()) == list(range(len(DOCS)))
        assert sum(shard.subset(p).num_tokens for p in parts) == shard.num_tokens


def test_truncate_keeps_whole_documents(tmp_path):
    tok, key = _tokenizer(tmp_path)
    shard = tokenize_documents(DOCS, tok, key, tmp_path)
    cut = shard.truncate(shard.num_tokens // 2)
    assert cut.num_tokens <= shard.num_tokens // 2
    assert cut.num_tokens == cut.offsets[-1] == len(cut.tokens)
    assert shard.truncate(None) is shard
