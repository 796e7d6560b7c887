"""Sending judging requests to a chat-completions endpoint: retries with backoff, and the request and cost caps.

`requests` is imported where a session is opened or a request sent: it comes with the environment
(transformers needs it) rather than as a dependency of ours, and importing the judge stays cheap.
"""

from __future__ import annotations

import dataclasses
import email.utils
import logging
import os
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.evaluation.api_judge.cache import Reply
from pipeline.evaluation.api_judge.config import ApiJudgeConfig, ApiJudgeError, ApiJudgeStats

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504}) | frozenset(range(505, 600))


class BudgetStop(Exception):
    """A worker found the budget spent before sending."""


class Cancelled(Exception):
    """A worker found the call aborted (another request failed) before sending."""


class Usage:
    """A judge's counters over its life and the caps they are held to, shared by its worker threads.

    `slots` bounds requests in flight across concurrent `judge` calls too, not only within one call's
    pool. Locks do not pickle: a copy shipped to a Ray worker gets fresh ones and keeps the counts.
    """

    def __init__(self, config: ApiJudgeConfig):
        self.config = config
        self._stats = ApiJudgeStats()
        self._init_locks()

    def _init_locks(self) -> None:
        self._lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(self.config.max_concurrency)

    def __getstate__(self) -> dict:
        return {"config": self.config, "_stats": self._stats}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_locks()

    def snapshot(self) -> ApiJudgeStats:
        """A copy of the counters."""
        with self._lock:
            return dataclasses.replace(self._stats)

    def count(self, *, retries: int = 0, cache_hits: int = 0, unparsed: int = 0) -> None:
        with self._lock:
            self._stats.retries += retries
            self._stats.cache_hits += cache_hits
            self._stats.unparsed += unparsed

    def reserve(self, abort: threading.Event) -> None:
        """Count one request about to be sent, or refuse if the call is aborted or a budget is spent."""
        cfg = self.config
        with self._lock:
            if abort.is_set():
                raise Cancelled
            if cfg.max_requests is not None and self._stats.requests >= cfg.max_requests:
                raise BudgetStop
            if cfg.max_cost_usd is not None and self._stats.cost_usd >= cfg.max_cost_usd:
                raise BudgetStop
            self._stats.requests += 1

    def account(self, reply: Reply) -> None:
        """Add a reply's tokens, and their price where prices are set."""
        cfg = self.config
        with self._lock:
            self._stats.input_tokens += reply.input_tokens or 0
            self._stats.output_tokens += reply.output_tokens or 0
            if cfg.priced:
                self._stats.cost_usd += ((reply.input_tokens or 0) * cfg.price_per_1k_input_tokens
                                         + (reply.output_tokens or 0) * cfg.price_per_1k_output_tokens) / 1000.0


@dataclass(frozen=True)
class Endpoint:
    """Where one `judge` call sends its requests. `api_key` is kept only to redact it from error text."""

    url: str
    headers: dict[str, str]
    api_key: str | None


def endpoint(config: ApiJudgeConfig, *, name: str) -> Endpoint:
    """The chat-completions URL and headers, with the API key read from its environment variable now."""
    headers = {"Content-Type": "application/json"}
    api_key = None
    if config.api_key_env:
        api_key = os.environ.get(config.api_key_env, "")
        if not api_key:
            raise ApiJudgeError(f"{name}: environment variable {config.api_key_env} is empty or unset; it must "
                                f"hold the API key (or set api_key_env to null for a server without authentication)")
        headers["Authorization"] = f"Bearer {api_key}"
    return Endpoint(url=config.base_url.rstrip("/") + "/chat/completions", headers=headers, api_key=api_key)


def request_body(config: ApiJudgeConfig, rendered: str) -> dict[str, Any]:
    """The chat-completions request for one rendered judging prompt."""
    body: dict[str, Any] = {"model": config.model, "messages": [{"role": "user", "content": rendered}],
                            "temperature": config.temperature}
    if config.max_tokens is not None:
        body["max_tokens"] = config.max_tokens
    return body


def open_session(max_concurrency: int):
    """A requests.Session whose connection pool holds `max_concurrency` connections per host."""
    import requests  # deferred: see the module docstring

    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_maxsize=max_concurrency)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def send(session, target: Endpoint, body: dict, *, usage: Usage, abort: threading.Event, name: str) -> Reply:
    """Send one judging request, retrying what is worth retrying; the reply's text and token usage.

    On a failure that is not a budget stop or a cancellation it sets `abort` itself, so that the pool's
    next task sends nothing even before the caller's thread hears of the failure.
    """
    try:
        return _send_with_retries(session, target, body, usage=usage, abort=abort, name=name)
    except (BudgetStop, Cancelled):
        raise
    except BaseException:
        abort.set()
        raise


@dataclass(frozen=True)
class _Failure:
    """A failed attempt worth retrying: what went wrong, the HTTP status if any, the wait the server asked."""

    problem: str
    status: int | None
    retry_after_s: float | None = None


def _send_with_retries(session, target: Endpoint, body: dict, *, usage: Usage, abort: threading.Event,
                       name: str) -> Reply:
    cfg = usage.config
    failure = _Failure("nothing sent", None)
    for attempt in range(cfg.max_retries + 1):
        usage.reserve(abort)
        if attempt:
            usage.count(retries=1)
        outcome = _post_once(session, target, body, usage=usage, name=name)
        if isinstance(outcome, Reply):
            usage.account(outcome)
            if cfg.max_cost_usd is not None and not outcome.has_usage:
                abort.set()  # spending can no longer be tracked: send nothing more (see ApiJudge._collect)
            return outcome
        failure = outcome
        if attempt == cfg.max_retries:
            break
        delay = backoff_s(cfg, attempt, failure.retry_after_s)
        log.warning("%s: %s; retry %d of %d in %.2f s", name, failure.problem, attempt + 1, cfg.max_retries, delay)
        if abort.wait(delay):
            raise Cancelled
    raise ApiJudgeError(f"{name}: gave up after {cfg.max_retries + 1} attempts to {target.url}; last: "
                        f"{failure.problem}", status=failure.status)


def _post_once(session, target: Endpoint, body: dict, *, usage: Usage, name: str) -> Reply | _Failure:
    """One POST: the reply, or a failure worth retrying. Raises ApiJudgeError on a status not worth it."""
    import requests  # deferred: see the module docstring

    try:
        with usage.slots:
            response = session.post(target.url, json=body, headers=target.headers, timeout=usage.config.timeout_s)
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
        # requests' messages name the URL, never the headers; redacted anyway.
        return _Failure(_redact(f"{type(exc).__name__}: {exc}", target.api_key)[:300], None)
    status = response.status_code
    if status == 200:
        try:
            return read_reply(response.json())
        except (ValueError, KeyError, IndexError, TypeError):
            return _Failure("HTTP 200 with a body that is not a chat completion", 200)
    if status in RETRYABLE_STATUS:
        return _Failure(f"HTTP {status}", status, retry_after_s(response.headers))
    detail = _redact(response.text, target.api_key)[:500]
    raise ApiJudgeError(f"{name}: {target.url} answered HTTP {status}, which is not retried: {detail}", status=status)


def backoff_s(config: ApiJudgeConfig, attempt: int, retry_after: float | None) -> float:
    """Seconds to wait before retry `attempt + 1`: the server's Retry-After if given, else exponential."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), config.backoff_max_s)
    # Jitter spreads the retries of a pool that was throttled at the same moment.
    return min(config.backoff_base_s * 2.0**attempt, config.backoff_max_s) * random.uniform(0.5, 1.0)


def read_reply(payload: Mapping) -> Reply:
    """The text and token usage of a chat-completions response body."""
    content = payload["choices"][0]["message"].get("content")  # None on a refusal: parsed as "unparsed"
    usage = payload.get("usage") or {}
    input_tokens, output_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return Reply(text=content if isinstance(content, str) else "",
                 input_tokens=int(input_tokens) if input_tokens is not None else None,
                 output_tokens=int(output_tokens) if output_tokens is not None else None)


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asks us to wait: `retry-after-ms` (OpenAI), or Retry-After in seconds or as an
    HTTP date. None when absent or unreadable."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return float(raw_ms) / 1000.0
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return when.timestamp() - time.time()


def _redact(text: str, api_key: str | None) -> str:
    return text.replace(api_key, "[redacted]") if api_key else text
