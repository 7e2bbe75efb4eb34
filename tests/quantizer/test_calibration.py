"""Calibration sources: seeded windows of exactly `seqlen` tokens from the offline builtin source,
the local C4 sample and user files; a clear message for anything unusable."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from backends.base import BackendError
from quantizer import calibration


@pytest.fixture(scope="module")
def tokenizer(default_hf_model):
    return AutoTokenizer.from_pretrained(str(default_hf_model))


def test_builtin_source_is_english_prose_and_seeded(tokenizer):
    a = calibration.calibration_tokens("builtin", tokenizer, 4, 128, seed=0)
    b = calibration.calibration_tokens("builtin", tokenizer, 4, 128, seed=0)
    c = calibration.calibration_tokens("builtin", tokenizer, 4, 128, seed=1)
    assert a.shape == (4, 128) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    text = tokenizer.decode(a[0])
    words = text.split()
    assert len(words) > 40 and sum(w.isalpha() for w in words) / len(words) > 0.6
    assert all(len(d) >= calibration.BUILTIN_MIN_CHARS for d in calibration.builtin_documents())


def test_c4_windows_come_from_one_document_each(tokenizer, c4_path):
    ids = calibration.calibration_tokens("c4", tokenizer, 6, 256, seed=0)
    assert ids.shape == (6, 256)
    docs = [json.loads(line)["text"] for line in c4_path.read_text().splitlines()]
    for row in ids[:3]:
        snippet = tokenizer.decode(row[5:25]).strip()
        assert any(snippet in d for d in docs), snippet


def test_local_text_and_jsonl_files(tokenizer, tmp_path, wikitext_path):
    txt = tmp_path / "notes.txt"
    txt.write_text(wikitext_path.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    ids = calibration.calibration_tokens(str(txt), tokenizer, 3, 64)
    assert ids.shape == (3, 64)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"Document {i} talks about rivers, hills and the sea. " * 30})
                               for i in range(5)))
    assert calibration.calibration_tokens(str(jsonl), tokenizer, 2, 64).shape == (2, 64)
    assert calibration.describe(str(jsonl)) == "file:docs.jsonl" and calibration.describe("C4") == "c4"


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"", "holds no text"),
    ("blank.txt", b" \n\n \t", "holds no text"),
    ("binary.txt", b"\x7fELF\x02\x01\x01\x00\x00\x00", "looks binary|not UTF-8"),
    ("latin.txt", "caf\u00e9".encode("latin-1"), "not UTF-8"),
    ("bad.jsonl", b"{not json}\n", "line 1 is not JSON"),
    ("notext.jsonl", b'{"body": "x"}\n', "no records with a non-empty `text` field"),
    ("binary.jsonl", b'{"text": "a"}\n\x00\x00', "looks binary"),
])
def test_unusable_files_are_refused_with_the_reason(tokenizer, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BackendError, match=message):
        calibration.calibration_tokens(str(path), tokenizer, 2, 32)


def test_too_short_text_and_bad_counts(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("A short note.")
    with pytest.raises(BackendError, match="needs more than seqlen=32"):
        calibration.calibration_tokens(str(path), tokenizer, 2, 32)
    with pytest.raises(ValueError, match="nsamples must be a positive number"):
        calibration.calibration_tokens("builtin", tokenizer, 0, 32)
    with pytest.raises(ValueError, match="seqlen must be at least 8"):
        calibration.calibration_tokens("builtin", tokenizer, 2, 1)
    with pytest.raises(BackendError, match="does not exist"):
        calibration.calibration_tokens(str(tmp_path / "missing.txt"), tokenizer, 2, 32)


def test_hub_sources_without_datasets_say_what_to_do(tokenizer):
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets is installed; the offline message is not reachable")
    except ImportError:
        pass
    with pytest.raises(BackendError, match="use `builtin` or a local file"):
        calibration.calibration_tokens("ptb", tokenizer, 2, 32)


def test_c4_without_the_local_sample_comes_through_the_hub_client(tokenizer, tmp_path, monkeypatch):
    """Users have no shared sample: C4's first train shard comes through huggingface_hub (a requirement),
    not `datasets` (not one). Only the download is stood in for (no hub here); the reading is real."""
    import gzip

    import huggingface_hub
    shard = tmp_path / "c4-train.00000-of-01024.json.gz"
    texts = [f"Document {i}: " + "the river runs past the old mill and on to the sea. " * 40 for i in range(6)]
    with gzip.open(shard, "wt", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"text": text, "timestamp": "2019", "url": f"u{i}"}) + "\n")
        fh.write(json.dumps({"text": "", "url": "empty"}) + "\n")
        fh.write("[1, 2]\n")  # not a record: skipped, as in a user's .jsonl
    asked = []
    monkeypatch.setattr(calibration, "_local_c4", lambda: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, name, repo_type=None: asked.append((repo, name, repo_type)) or str(shard))
    assert calibration.documents("c4") == texts
    assert asked == [("allenai/c4", "en/c4-train.00000-of-01024.json.gz", "dataset")]
    ids = calibration.calibration_tokens("c4", tokenizer, 3, 32)
    assert ids.shape == (3, 32)
    monkeypatch.setattr(calibration, "C4_DOCUMENTS", 4)  # only the shard's start is read
    assert calibration.documents("c4") == texts[:4]

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(BackendError, match="'c4': the hub is unreachable .*use `builtin` or a local file"):
        calibration.documents("c4")
