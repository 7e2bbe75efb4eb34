"""Conversations saved as one JSON file each under the user data folder, listed newest first for
reopening. A file that cannot be read is skipped with a warning, never a crash of the page."""
from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_ID_RE = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{8}$")
_ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    id: str
    title: str
    messages: list[dict]                 # {"role", "content": str, optional "stats": dict}
    system_prompt: str = ""
    model: str = ""
    params: dict = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0

    def as_dict(self) -> dict:
        return {"id": self.id, "title": self.title, "system_prompt": self.system_prompt,
                "model": self.model, "params": self.params, "created": self.created,
                "updated": self.updated, "messages": self.messages}


@dataclass(frozen=True)
class HistoryEntry:
    id: str
    title: str
    updated: float
    turns: int

    @property
    def label(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.updated))
        return f"{when} · {self.title}"


def new_conversation_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]


def title_from(messages: list[dict]) -> str:
    for message in messages:
        if message.get("role") == "user" and str(message.get("content", "")).strip():
            text = " ".join(str(message["content"]).split())
            return text[:60] + ("…" if len(text) > 60 else "")
    return "(empty conversation)"


def _check_id(conversation_id: str) -> str:
    if not isinstance(conversation_id, str) or not _ID_RE.match(conversation_id):
        raise ValueError(f"{conversation_id!r} is not a conversation id")
    return conversation_id


def _parse(data: object) -> Conversation:
    """Validate the JSON shape; ValueError with the reason when it is not a conversation."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    messages = data.get("messages")
    if not isinstance(messages, list):
        raise ValueError("no list of messages")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise ValueError("a message lacks a valid role or text content")
        item = {"role": m["role"], "content": m["content"]}
        if isinstance(m.get("stats"), dict):
            item["stats"] = m["stats"]
        clean.append(item)
    params = data.get("params") if isinstance(data.get("params"), dict) else {}
    return Conversation(id=_check_id(data.get("id")), title=str(data.get("title") or title_from(clean)),
                        messages=clean, system_prompt=str(data.get("system_prompt") or ""),
                        model=str(data.get("model") or ""), params=params,
                        created=float(data.get("created") or 0), updated=float(data.get("updated") or 0))


class HistoryStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _path(self, conversation_id: str) -> Path:
        return self.folder / f"{_check_id(conversation_id)}.json"

    def save(self, conversation: Conversation) -> Path:
        """Atomic write (temp file + rename), so a crash never leaves half a conversation."""
        now = time.time()
        conversation.created = conversation.created or now
        conversation.updated = now
        if not conversation.title or conversation.title == "(empty conversation)":
            conversation.title = title_from(conversation.messages)
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self._path(conversation.id)
        partial = target.with_suffix(".json.partial")
        partial.write_text(json.dumps(conversation.as_dict(), ensure_ascii=False, indent=1), encoding="utf-8")
        partial.replace(target)
        return target

    def load(self, conversation_id: str) -> Conversation:
        path = self._path(conversation_id)
        if not path.exists():
            raise ValueError(f"no saved conversation {conversation_id}")
        try:
            return _parse(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, ValueError, TypeError, RecursionError) as exc:
            raise ValueError(f"conversation file {path.name} is damaged: {exc}") from None

    def list(self) -> list[HistoryEntry]:
        """Newest first; unreadable files are logged and left out."""
        entries = []
        if not self.folder.is_dir():
            return entries
        for path in self.folder.glob("*.json"):
            try:
                conv = _parse(json.loads(path.read_text(encoding="utf-8")))
                if conv.id != path.stem:
                    raise ValueError("its id does not match the file name")
            except (OSError, UnicodeDecodeError, ValueError, TypeError, RecursionError) as exc:
                log.warning("skipping conversation file %s: %s", path, exc)
                continue
            turns = sum(1 for m in conv.messages if m["role"] == "user")
            entries.append(HistoryEntry(conv.id, conv.title, conv.updated, turns))
        entries.sort(key=lambda e: (e.updated, e.id), reverse=True)
        return entries

    def delete(self, conversation_id: str) -> None:
        path = self._path(conversation_id)
        if path.exists():
            path.unlink()
