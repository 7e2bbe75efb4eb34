"""Presets: the shipped four load with valid values; save-as-new writes to the user folder only."""
from pathlib import Path

import pytest
import yaml

from webui.context import SHIPPED_PRESETS
from webui.presets import PRESET_FIELDS, PresetStore

SHIPPED = ("Deterministic", "Balanced", "Creative", "Precise")


@pytest.fixture
def store(tmp_path) -> PresetStore:
    return PresetStore(SHIPPED_PRESETS, tmp_path / "presets")


def test_shipped_presets_load(store):
    assert store.names()[:4] == list(SHIPPED)
    for name in SHIPPED:
        values = store.get(name)
        assert set(values) == set(PRESET_FIELDS)
        assert store.is_shipped(name)
    det = store.get("Deterministic")
    assert det["temperature"] == 0.0 and det["seed"] == 0
    assert store.get("Creative")["temperature"] > store.get("Balanced")["temperature"] > store.get("Precise")["temperature"]
    assert store.get("balanced") == store.get("Balanced")          # case-insensitive lookup


def test_save_as_new_writes_user_folder_only(store, tmp_path):
    before = {p: p.read_bytes() for p in Path(SHIPPED_PRESETS).glob("*.yaml")}
    values = dict(store.get("Balanced"), temperature=0.42, max_new_tokens=99)
    path = store.save_new("My preset-1", values)
    assert path == tmp_path / "presets" / "My preset-1.yaml"
    assert yaml.safe_load(path.read_text())["temperature"] == 0.42
    assert store.get("My preset-1")["max_new_tokens"] == 99
    assert store.names()[-1] == "My preset-1" and not store.is_shipped("My preset-1")
    assert {p: p.read_bytes() for p in Path(SHIPPED_PRESETS).glob("*.yaml")} == before
    with pytest.raises(ValueError, match="already exists"):
        store.save_new("my PRESET-1", values)
    with pytest.raises(ValueError, match="already exists"):
        store.save_new("Deterministic", values)                    # never overwrite a shipped one


@pytest.mark.parametrize("bad", ["", " ", "../evil", "a/b", "x\\y", ".hidden", "a" * 49, "name.", "nul\x00", "ok?"])
def test_bad_names_refused(store, bad, tmp_path):
    with pytest.raises(ValueError, match="not allowed"):
        store.save_new(bad, store.get("Balanced"))
    assert not (tmp_path / "presets").exists() or not list((tmp_path / "presets").iterdir())


def test_bad_values_refused(store):
    with pytest.raises(ValueError, match="top_p"):
        store.save_new("Broken", dict(store.get("Balanced"), top_p=1.5))
    with pytest.raises(ValueError, match="missing"):
        store.save_new("Partial", {"temperature": 0.5})


def test_unreadable_user_preset_gives_a_message(store, tmp_path):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "Weird.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="not a mapping"):
        store.get("Weird")
