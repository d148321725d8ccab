"""Parquet files, `datasets` folders, streamed JSONL, a configurable text column, bad
records named by file and record, and a folder with one large text file."""

import json
import tracemalloc

import pytest

from skyfed.config import load_config
from skyfed.data.corpus import load_corpus, read_documents
from skyfed.errors import DataError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

DOCS = [f"Document {i} talks about topic {i % 3}. " * 20 for i in range(12)]


def test_parquet_with_a_text_column(tmp_path):
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": list(range(12)), "body": DOCS}), path, row_group_size=5)
    assert read_documents(path, text_column="body") == DOCS
    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(pa.table({"body": DOCS[:6]}), folder / "a.parquet")
    pq.write_table(pa.table({"body": DOCS[6:]}), folder / "b.parquet")
    assert read_documents(folder, text_column="body") == DOCS
    with pytest.raises(DataError, match=r"corpus.parquet: no column 'text' \(columns: id, body\); set data.text_column"):
        read_documents(path)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": ["fine", "also fine", None, "never read"]}), bad)
    with pytest.raises(DataError, match=r"bad.parquet: row 2: expected a string in 'text', got NoneType"):
        read_documents(bad)


def test_jsonl_is_streamed_and_bad_lines_are_named(tmp_path):
    path = tmp_path / "big.jsonl"
    meta = "x" * 20_000  # a large field that is never kept
    with path.open("w") as f:
        for i in range(300):
            f.write(json.dumps({"content": f"doc {i}", "meta": meta}) + "\n")
    size = path.stat().st_size
    tracemalloc.start()
    docs = read_documents(path, text_column="content")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert docs == [f"doc {i}" for i in range(300)]
    assert peak < size / 20, (peak, size)  # one line at a time, not the 6 MB file
    with path.open("a") as f:
        f.write('{"content": "ok"}\n{"content": 3}\n')
    with pytest.raises(DataError, match=r"big.jsonl:302: expected a string in 'content', got int"):
        read_documents(path, text_column="content")
    with pytest.raises(DataError, match=r"big.jsonl:1: expected an object with a string 'text' field"):
        read_documents(path)


def test_datasets_folder_and_its_validation_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"story": DOCS}).save_to_disk(str(single))
    assert read_documents(single, text_column="story") == DOCS
    corpus = load_corpus(str(single), text_column="story", valid_fraction=0.2)
    assert sorted(corpus.train + corpus.valid) == sorted(DOCS) and len(corpus.valid) == 2
    both = tmp_path / "dict"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"story": DOCS[:9]}),
        "validation": datasets.Dataset.from_dict({"story": DOCS[9:]}),
    }).save_to_disk(str(both))
    corpus = load_corpus(str(both), text_column="story")
    assert corpus.train == DOCS[:9] and corpus.valid == DOCS[9:]
    with pytest.raises(DataError, match=r"dict \[train\]: no column 'text' \(columns: story\)"):
        load_corpus(str(both))
    bad = tmp_path / "bad"
    datasets.Dataset.from_dict({"text": ["a", "b", None]}).save_to_disk(str(bad))
    with pytest.raises(DataError, match=r"bad: row 2: expected a string in 'text'"):
        read_documents(bad)


def test_a_folder_with_one_large_text_file_trains_on_its_paragraphs(tmp_path):
    from skyfed.runtime.setup import prepare_data

    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "book.txt").write_text("\n\n".join(DOCS * 3))
    corpus = load_corpus(str(folder), min_train_docs=3)
    assert len(corpus.train) + len(corpus.valid) == 36
    two = tmp_path / "two"  # two files are still too few for three clients and a validation split
    two.mkdir()
    (two / "a.txt").write_text("\n\n".join(DOCS[:6]))
    (two / "b.txt").write_text("\n\n".join(DOCS[6:]))
    assert len(read_documents(two, min_docs=4)) == 12
    assert len(read_documents(two)) == 2
    cfg = load_config(preset="smoke", overrides=[f"data.path={folder}", "tokenizer.vocab_size=300"])
    data = prepare_data(cfg)
    assert set(data.client_docs) == {"aws", "gcp", "azure"} and min(data.client_docs.values()) >= 1
