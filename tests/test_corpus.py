import json

import pytest

from skyfed.data.corpus import load_corpus, read_documents, split_wikitext
from skyfed.errors import DataError

WIKI = " \n = Alpha = \n \n Alpha text . \n = = Section = = \n More alpha . \n = Beta = \n Beta text . \n"


def test_wikitext_splits_at_level_one_titles_only():
    docs = split_wikitext(WIKI)
    assert len(docs) == 2
    assert docs[0].startswith("= Alpha =") and "= = Section = =" in docs[0]
    assert docs[1].startswith("= Beta =")


def test_bundled_wikitext2_has_articles():
    corpus = load_corpus()
    assert 550 <= len(corpus.train) <= 700  # WikiText-2 train has ~600 articles
    assert len(corpus.valid) >= 50
    assert corpus.train[0].startswith("= Valkyria Chronicles III =")


def test_folder_of_txt_files_is_one_document_per_file(tmp_path):
    for i in range(5):
        (tmp_path / f"f{i}.txt").write_text(f"document {i}\n\nsecond paragraph {i}\n")
    docs = read_documents(tmp_path)
    assert docs == [f"document {i}\n\nsecond paragraph {i}" for i in range(5)]


def test_jsonl_text_field_and_bad_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert read_documents(path) == ["one", "two"]
    path.write_text(json.dumps({"text": "one"}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"c.jsonl:2: invalid JSON"):
        read_documents(path)
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl:1: expected an object with a string 'text' field"):
        read_documents(path)


def test_validation_is_carved_deterministically(tmp_path):
    for i in range(40):
        (tmp_path / f"{i:02d}.txt").write_text(f"text {i}")
    a = load_corpus(str(tmp_path), valid_fraction=0.1, seed=3)
    b = load_corpus(str(tmp_path), valid_fraction=0.1, seed=3)
    assert len(a.valid) == 4 and len(a.train) == 36
    assert a.valid == b.valid
    assert set(a.valid).isdisjoint(a.train)


def test_missing_path_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="data path not found"):
        load_corpus(str(tmp_path / "nope"))
