"""Corpora, tokenizers, token shards and partitioners."""
