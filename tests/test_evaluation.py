"""The shared perplexity protocol: GPTQ's wikitext2 text and windowing."""
import hashlib

import pytest

from backends.base import BackendError
from quantizer.evaluation import eval_windows, load_eval_text, read_text_file


def test_wikitext2_text_matches_gptq_protocol(wikitext_path):
    text = load_eval_text("wikitext2")
    assert len(text) == 1_294_336
    assert hashlib.sha256(text.encode()).hexdigest().startswith("696cca6b65a1")


def test_windows_are_non_overlapping_and_drop_the_tail():
    ids = list(range(1000))
    windows = eval_windows(ids, 300)
    assert [w[0] for w in windows] == [0, 300, 600] and all(len(w) == 300 for w in windows)
    assert len(eval_windows(ids, 100, windows=2)) == 2
    with pytest.raises(BackendError, match="fewer than one window"):
        eval_windows(ids[:10], 100)


def test_text_files_bad_input(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"other": 1}\n{"text": "two"}\n')
    assert read_text_file(tmp_path / "a.jsonl") == "one\n\ntwo"
    (tmp_path / "b.bin").write_bytes(b"\x00\x01\xff\xfe")
    with pytest.raises(BackendError, match="not UTF-8|binary"):
        read_text_file(tmp_path / "b.bin")
    (tmp_path / "c.txt").write_text("   \n")
    with pytest.raises(BackendError, match="no text"):
        read_text_file(tmp_path / "c.txt")
    with pytest.raises(BackendError, match="no such"):
        load_eval_text(tmp_path / "missing.txt")
