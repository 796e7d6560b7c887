"""Sending judging requests through the `openai` client library, with our caps and key redaction on top.

The library does the HTTP: timeouts, and retries of connection errors, timeouts, 408, 409, 429 and 5xx
responses with jittered exponential backoff (0.5 s doubling to 8 s), honouring the server's
`retry-after-ms` or Retry-After up to two minutes. Every attempt it makes, retries included, passes our
request hook (`Meter`), which counts it against `max_requests` and `max_cost_usd` and refuses it once a cap
is spent or the call has been aborted: an exception the library does not catch, so it never retries it.
The key is read from its environment variable into the client and nowhere else; every message that leaves
here has it redacted.

`openai` is imported where a client is made: it takes about two seconds to import, and every `dpo`
command imports the evaluation package at start-up.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any

from pipeline.evaluation.api_judge.cache import Reply
from pipeline.evaluation.api_judge.config import ApiJudgeConfig, ApiJudgeError, ApiJudgeStats
from pipeline.evaluation.api_judge.verdicts import TOP_LOGPROBS, VERDICT_SCHEMA, label_logprobs

log = logging.getLogger(__name__)

RETRIED_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))  # what the openai client retries


class BudgetStop(Exception):
    """A request was about to be sent with a budget spent."""


class Cancelled(Exception):
    """A request was about to be sent after the call was aborted (another request failed)."""


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

    def count(self, *, retries: int = 0, cache_hits: int = 0, unparsed: int = 0, fallbacks: int = 0) -> None:
        with self._lock:
            self._stats.retries += retries
            self._stats.cache_hits += cache_hits
            self._stats.unparsed += unparsed
            self._stats.fallbacks += fallbacks

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
            input_price, output_price = cfg.price_per_1k_input_tokens, cfg.price_per_1k_output_tokens
            if input_price is not None and output_price is not None:  # cfg.priced, spelled out for the checker
                self._stats.cost_usd += (
                    (reply.input_tokens or 0) * input_price + (reply.output_tokens or 0) * output_price
                ) / 1000.0


class Meter:
    """The openai client's HTTP hooks for one `judge` call: each attempt is counted (and refused at a cap or
    after an abort), and each retry logged with what went wrong before it. Attempts are counted per thread:
    each worker thread sends one judging request at a time."""

    def __init__(self, usage: Usage, abort: threading.Event, *, name: str):
        self.usage, self.abort, self.name = usage, abort, name
        self._local = threading.local()

    def begin(self) -> None:
        """A new judging request on this thread: its attempts count from zero."""
        self._local.attempts, self._local.problem = 0, "nothing sent"

    @property
    def attempts(self) -> int:
        return self._local.attempts

    @property
    def problem(self) -> str:
        return self._local.problem

    def on_request(self, request) -> None:
        self.usage.reserve(self.abort)
        if self._local.attempts:
            self.usage.count(retries=1)
            log.warning(
                "%s: %s; retry %d of %d",
                self.name,
                self._local.problem,
                self._local.attempts,
                self.usage.config.max_retries,
            )
        self._local.attempts += 1
        self._local.problem = "no response (connection error or timeout)"  # until a response says otherwise

    def on_response(self, response) -> None:
        self._local.problem = f"HTTP {response.status_code}"


def read_key(config: ApiJudgeConfig, *, name: str) -> str | None:
    """The API key from its environment variable now, or None for a server without authentication."""
    if not config.api_key_env:
        return None
    api_key = os.environ.get(config.api_key_env, "")
    if not api_key:
        raise ApiJudgeError(
            f"{name}: environment variable {config.api_key_env} is empty or unset; it must "
            f"hold the API key (or set api_key_env to null for a server without authentication)"
        )
    return api_key


def open_client(config: ApiJudgeConfig, meter: Meter, api_key: str | None):
    """An openai.OpenAI client for `config.base_url` whose every HTTP attempt passes `meter`'s hooks."""
    import openai  # deferred: see the module docstring

    http = openai.DefaultHttpxClient(event_hooks={"request": [meter.on_request], "response": [meter.on_response]})
    # Without a key the library still wants one; the Authorization header is omitted per request instead.
    return openai.OpenAI(
        base_url=config.base_url,
        api_key=api_key or "no-key",
        max_retries=config.max_retries,
        timeout=config.timeout_s,
        http_client=http,
    )


def request_args(config: ApiJudgeConfig, rendered: str, *, with_key: bool) -> dict[str, Any]:
    """The chat-completions arguments for one rendered judging prompt, as `config.verdict` asks for it."""
    import openai  # deferred: see the module docstring

    args: dict[str, Any] = {
        "model": config.model,
        "messages": [{"role": "user", "content": rendered}],
        "temperature": config.temperature,
    }
    if config.max_tokens is not None:
        args["max_tokens"] = config.max_tokens
    if config.verdict == "json":
        args["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "verdict", "strict": True, "schema": VERDICT_SCHEMA},
        }
    elif config.verdict == "logprobs":
        args.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
    if not with_key:
        args["extra_headers"] = {"Authorization": openai.Omit()}
    return args


def send(client, meter: Meter, args: dict[str, Any], *, api_key: str | None) -> Reply:
    """One judging request, retried by the client as it sees fit; the reply's text, usage and label log-probs.

    On a failure that is not a budget stop or a cancellation it sets the meter's `abort` itself, so that no
    other request is sent even before the caller's thread hears of the failure.
    """
    try:
        with meter.usage.slots:
            meter.begin()
            reply = read_reply(client.chat.completions.create(**args), name=meter.name)
    except (BudgetStop, Cancelled):
        raise
    except BaseException as exc:
        meter.abort.set()
        failure = _as_judge_error(exc, meter, client, api_key)
        if failure is None:
            raise
        raise failure from None  # the library's exception holds the request, headers and key included
    meter.usage.account(reply)
    if meter.usage.config.max_cost_usd is not None and not reply.has_usage:
        meter.abort.set()  # spending can no longer be tracked: send nothing more (see ApiJudge._collect)
    return reply


def _as_judge_error(exc: BaseException, meter: Meter, client, api_key: str | None) -> ApiJudgeError | None:
    """An openai error as our ApiJudgeError naming the status and what the server said, key redacted."""
    import openai  # deferred: see the module docstring

    url = f"{str(client.base_url).rstrip('/')}/chat/completions"
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status in RETRIED_STATUS:
            return ApiJudgeError(
                f"{meter.name}: gave up after {meter.attempts} attempts to {url}; last: HTTP {status}", status=status
            )
        hint = (
            " (a server without structured output rejects `verdict: json`: set evaluate.judge_api.verdict to text)"
            if status == 400 and meter.usage.config.verdict == "json"
            else ""
        )
        detail = _redact(exc.message, api_key)[:500]
        return ApiJudgeError(
            f"{meter.name}: {url} answered HTTP {status}, which is not retried: {detail}{hint}", status=status
        )
    if isinstance(exc, openai.APIConnectionError):  # timeouts included
        return ApiJudgeError(
            f"{meter.name}: gave up after {meter.attempts} attempts to {url}; last: "
            f"{type(exc).__name__}: {_redact(str(exc), api_key)[:300]}"
        )
    if isinstance(exc, ApiJudgeError):
        return exc
    return None


def read_reply(completion, *, name: str) -> Reply:
    """The text, token usage and (when asked for) label log-probs of a chat completion."""
    try:
        choice = completion.choices[0]
        content = choice.message.content  # None on a refusal: read as "unparsed"
        tokens = choice.logprobs.content if choice.logprobs is not None else None
    except (AttributeError, IndexError, TypeError, KeyError):
        raise ApiJudgeError(f"{name}: HTTP 200 with a body that is not a chat completion") from None
    usage = completion.usage
    labels = None
    if tokens:
        labels = label_logprobs(
            [(t.token, [(alt.token, alt.logprob) for alt in (t.top_logprobs or [])]) for t in tokens]
        )
    return Reply(
        text=content if isinstance(content, str) else "",
        input_tokens=getattr(usage, "prompt_tokens", None),
        output_tokens=getattr(usage, "completion_tokens", None),
        label_logprobs=labels,
    )


def _redact(text: str, api_key: str | None) -> str:
    return text.replace(api_key, "[redacted]") if api_key else text
