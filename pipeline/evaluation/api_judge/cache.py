"""The API judge's response cache: raw replies by a hash of what decides them.

A rerun pays nothing twice, and one stopped by a budget continues where it stopped. Reply texts (and the
answer labels' log-probs, where asked for), not verdicts, are stored, so a better parser rescues old
replies. SQLite commits each row; JSONL appends and flushes each line and skips a torn last line.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pipeline.config import ConfigError


@dataclass(frozen=True)
class Reply:
    """A judge model's answer: its text, the token counts of the response's `usage` where given, and under
    `verdict: logprobs` the log-probs of the labels A, B, tie where it wrote its verdict (verdicts.py)."""

    text: str
    input_tokens: int | None
    output_tokens: int | None
    label_logprobs: dict[str, float] | None = None

    @property
    def has_usage(self) -> bool:
        """Whether both token counts came back, so that its cost can be known."""
        return self.input_tokens is not None and self.output_tokens is not None


class ResponseCache(Protocol):
    def get(self, key: str) -> Reply | None:
        """The reply stored under `key`, or None."""
        ...

    def put(self, key: str, model: str, reply: Reply) -> None:
        """Store `reply` under `key`, durably before returning."""
        ...

    def close(self) -> None: ...


def cache_key(model: str, rendered: str, prompt: str, first: str, second: str, *, verdict: str = "text") -> str:
    """sha256 of what decides the answer: the judge model, the message sent, the pair itself, and how the
    verdict is asked for (a text reply has no log-probs; a JSON one is asked with another prompt anyway)."""
    payload = json.dumps([model, rendered, prompt, first, second, verdict], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def open_cache(path: str | None) -> ResponseCache:
    """The cache at `path`: JSONL if it ends in .jsonl, else SQLite; one that keeps nothing for None."""
    if not path:
        return NoCache()
    return JsonlCache(path) if Path(path).suffix == ".jsonl" else SqliteCache(path)


def _row(key: str, model: str, reply: Reply) -> dict:
    return {
        "key": key,
        "model": model,
        "text": reply.text,
        "input_tokens": reply.input_tokens,
        "output_tokens": reply.output_tokens,
        "label_logprobs": reply.label_logprobs,
        "created": time.time(),
    }


class SqliteCache:
    """One row per reply, committed as it is written."""

    def __init__(self, path: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(Path(path), isolation_level=None)  # autocommit: each row is durable
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
            "text TEXT NOT NULL, input_tokens INTEGER, output_tokens INTEGER, created REAL NOT NULL, "
            "label_logprobs TEXT)"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(replies)")}
        if "label_logprobs" not in columns:
            self._db.close()
            raise ConfigError(
                f"{path}: a judge cache written by another version of raydpo; delete it (its pairs are judged again)"
            )

    def get(self, key: str) -> Reply | None:
        found = self._db.execute(
            "SELECT text, input_tokens, output_tokens, label_logprobs FROM replies WHERE key = ?", (key,)
        ).fetchone()
        if found is None:
            return None
        text, input_tokens, output_tokens, logprobs = found
        return Reply(text, input_tokens, output_tokens, None if logprobs is None else json.loads(logprobs))

    def put(self, key: str, model: str, reply: Reply) -> None:
        logprobs = None if reply.label_logprobs is None else json.dumps(reply.label_logprobs)
        self._db.execute(
            "INSERT OR REPLACE INTO replies (key, model, text, input_tokens, output_tokens, created, "
            "label_logprobs) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, model, reply.text, reply.input_tokens, reply.output_tokens, time.time(), logprobs),
        )

    def close(self) -> None:
        self._db.close()


class JsonlCache:
    """One JSON line per reply, appended and flushed; read whole when opened."""

    def __init__(self, path: str | Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._rows: dict[str, dict] = {}
        if path.exists():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        self._rows[row["key"]] = row
                    except (ValueError, KeyError, TypeError):
                        continue  # a line torn by a crash mid-write
        self._file = open(path, "a", encoding="utf-8")

    def get(self, key: str) -> Reply | None:
        row = self._rows.get(key)
        if row is None:
            return None
        return Reply(row["text"], row.get("input_tokens"), row.get("output_tokens"), row.get("label_logprobs"))

    def put(self, key: str, model: str, reply: Reply) -> None:
        row = _row(key, model, reply)
        self._rows[key] = row
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class NoCache:
    """Keeps nothing: every pair is asked."""

    def get(self, key: str) -> Reply | None:
        return None

    def put(self, key: str, model: str, reply: Reply) -> None:
        pass

    def close(self) -> None:
        pass
