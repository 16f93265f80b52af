"""The standard-library corpus of study 3: deterministic, under 10 MiB, held-out files never trained on."""
import hashlib
import json

import pytest

from hybridlm.errors import HybridLMError
from hybridlm.studies.corpus import (Document, build_corpus, main, read_manifest, split_at_lines, split_corpus,
                                     verify_corpus)

SMALL = 400_000


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return folder, build_corpus(folder, max_bytes=SMALL, valid_bytes=60_000)


def test_corpus_is_deterministic_and_matches_its_manifest(small_corpus, tmp_path):
    folder, manifest = small_corpus
    again = build_corpus(tmp_path, max_bytes=SMALL, valid_bytes=60_000)
    assert again["train"]["sha256"] == manifest["train"]["sha256"]
    assert again["valid"]["sha256"] == manifest["valid"]["sha256"]
    for part in ("train", "valid"):
        data = (folder / manifest[part]["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == manifest[part]["sha256"] and len(data) == manifest[part]["bytes"]
    assert manifest["train"]["bytes"] + manifest["valid"]["bytes"] <= SMALL
    assert verify_corpus(folder) == read_manifest(folder)


def test_training_records_are_json_lines_and_held_out_files_stay_out(small_corpus):
    folder, manifest = small_corpus
    records = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    assert len(records) == manifest["train"]["documents"] and all(r["text"].strip() for r in records)
    assert any(r["source"].startswith("Lib/") for r in records)
    assert not any(Document(r["source"], "").held_out for r in records)  # no piece of a held-out file
    valid = (folder / "valid.txt").read_text()
    assert len(valid.encode()) == manifest["valid"]["bytes"] > 1000


def test_full_corpus_fits_the_ten_mib_carried_to_the_gpu(tmp_path):
    manifest = build_corpus(tmp_path)
    total = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert total < 10 * 2 ** 20
    assert manifest["train"]["bytes"] > 5 * 2 ** 20  # most of the budget is used: the stdlib is larger
    assert manifest["python"].count(".") == 2


def test_split_respects_both_budgets_and_keeps_whole_documents():
    docs = [Document(f"Lib/m{i}.py#0", "x = 1\n" * (50 + i)) for i in range(200)]
    train, valid = split_corpus(docs, max_bytes=20_000, valid_bytes=2_000)
    assert train and valid and not {d.source for d in train} & {d.source for d in valid}
    assert all(d.held_out for d in valid) and not any(d.held_out for d in train)
    assert sum(len(d.text) + 2 for d in valid) <= 2_000
    assert set(train) | set(valid) <= set(docs)


def test_split_at_lines_cuts_only_after_newlines():
    text = "".join(f"line {i}\n" for i in range(100))
    pieces = split_at_lines(text, 64)
    assert "".join(pieces) == text and all(len(p.encode()) <= 64 for p in pieces)
    assert all(p.endswith("\n") for p in pieces)
    assert split_at_lines("a" * 100, 10) == ["a" * 100]  # one long line stays whole


def test_tampered_or_missing_corpus_is_one_clear_error(small_corpus, tmp_path):
    with pytest.raises(HybridLMError, match="not a built corpus"):
        read_manifest(tmp_path)
    folder, _ = small_corpus
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("train.jsonl", "valid.txt", "manifest.json"):
        (copy / name).write_bytes((folder / name).read_bytes())
    with (copy / "valid.txt").open("a") as f:
        f.write("extra")
    with pytest.raises(HybridLMError, match="sha256"):
        verify_corpus(copy)
    with pytest.raises(HybridLMError, match="must exceed"):
        build_corpus(tmp_path / "x", max_bytes=100, valid_bytes=200)


def test_corpus_command_line(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "c"), "--max-bytes", "200000"]) == 0
    assert "training documents" in capsys.readouterr().out
    assert main(["--out", str(tmp_path / "d"), "--max-bytes", "10"]) == 2
    assert "error:" in capsys.readouterr().err
