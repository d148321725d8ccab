"""The experiment's tokenizer when it starts from a pretrained model (`model.path`).

A pretrained model brings its own tokenizer: with `tokenizer.path` unset, the model
directory's tokenizer is used (a fresh BPE is trained only for a model trained from
scratch). A tokenizer that does not fit the model's embeddings is refused before any
work: more tokens than embedding rows (ids past the table), or a `tokenizer.path`
whose vocabulary differs from the model's own tokenizer (ids that mean other tokens).
"""

from __future__ import annotations

from pathlib import Path

from skyfed.config import ExperimentConfig
from skyfed.data.tokenizer import get_tokenizer, load_tokenizer
from skyfed.errors import ConfigError
from skyfed.model import embedding_rows
from skyfed.model_dir import has_tokenizer, no_tokenizer_error, resolve_model_dir


def check_tokenizer_fits(tokenizer, model_dir: Path, own=None) -> None:
    """Raise ConfigError when `tokenizer` cannot drive the model in `model_dir`.

    `own`: the model directory's own tokenizer, when `tokenizer` was loaded from elsewhere."""
    rows = embedding_rows(model_dir)
    if len(tokenizer) > rows:
        raise ConfigError(
            f"tokenizer: {len(tokenizer)} tokens but the model in {model_dir} has {rows} embedding rows "
            "(use the model's own tokenizer: leave tokenizer.path unset)"
        )
    if own is not None and tokenizer.get_vocab() != own.get_vocab():
        raise ConfigError(
            f"tokenizer.path: its vocabulary ({len(tokenizer)} tokens) differs from the tokenizer of the model in "
            f"{model_dir} ({len(own)} tokens); leave tokenizer.path unset to use the model's own"
        )


def experiment_tokenizer(cfg: ExperimentConfig, train_docs: list[str], cache: Path):
    """(tokenizer, its cache key) for `cfg`: `tokenizer.path`, else the pretrained model's
    own tokenizer, else a BPE trained on `train_docs` (cached)."""
    tc = cfg.tokenizer
    if cfg.model.path is None:
        return get_tokenizer(train_docs, tc.vocab_size, tc.min_frequency, cache, tc.path)
    model_dir = resolve_model_dir(cfg.model.path)
    own = load_tokenizer(model_dir) if has_tokenizer(model_dir) else None
    if tc.path is None and own is None:
        raise no_tokenizer_error(model_dir)
    tokenizer, key = get_tokenizer([], 0, 1, cache, str(tc.path or model_dir))
    check_tokenizer_fits(tokenizer, model_dir, own if tc.path is not None else None)
    return tokenizer, key
