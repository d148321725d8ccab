"""A pretrained model's folder (`model.path`) and its tokenizer files, checked without
importing torch or transformers, so a wrong path fails in a fraction of a second."""

from __future__ import annotations

from pathlib import Path

from skyfed.errors import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def resolve_model_dir(path: str | Path) -> Path:
    """The folder holding a pretrained model's config.json: `path` itself (symlinks resolved),
    or, for a Hugging Face hub-cache folder ``models--org--name``, its snapshot named by
    ``refs/main`` (else its only snapshot)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"model.path: model directory not found: {path}")
    snapshots = p / "snapshots"
    if not (p / "config.json").exists() and snapshots.is_dir():
        ref = p / "refs" / "main"
        found = sorted(d for d in snapshots.iterdir() if d.is_dir())
        chosen = snapshots / ref.read_text().strip() if ref.is_file() else (found[0] if len(found) == 1 else None)
        if chosen is None or not chosen.is_dir():
            names = ", ".join(d.name for d in found) or "none"
            raise ConfigError(f"model.path: {path} is a hub cache folder; name one of its snapshots ({names})")
        p = chosen
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.path: {path} is not a Hugging Face model directory (no config.json)")
    return p.resolve()


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def no_tokenizer_error(model_dir: Path) -> ConfigError:
    return ConfigError(
        f"model.path: {model_dir} has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
        "set tokenizer.path to the tokenizer the model was trained with"
    )


def check_model_path(model_path: str | Path | None, tokenizer_path: str | Path | None) -> None:
    """The ConfigError that starting from the pretrained model at `model_path` would raise
    for a missing folder, a folder without config.json, or (with `tokenizer_path` unset)
    no tokenizer files; nothing when `model_path` is None."""
    if model_path is None:
        return
    model_dir = resolve_model_dir(model_path)
    if tokenizer_path is None and not has_tokenizer(model_dir):
        raise no_tokenizer_error(model_dir)
