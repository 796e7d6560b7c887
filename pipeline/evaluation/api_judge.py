"""A pairwise LLM judge over any OpenAI-compatible chat-completions API (OpenAI, `vllm serve`, ...).

The DPO paper (Rafailov et al., 2023, sec. 6 and app. C) measured win rates with GPT-4 as the judge: it
was shown a post or a query and two candidate answers and asked which one was better. `ApiJudge` does the
same for our `Judge` protocol (pipeline/evaluation/judges.py), so `judge_both_orders` can ask in both orders and
cancel the judge's position bias.

What makes it safe to point at a paid API:
- a thread pool bounded by `max_concurrency`; retries with jittered exponential backoff on 429, 408,
  5xx, connection errors and timeouts, honouring Retry-After; other 4xx fail at once, naming the status;
- a response cache (SQLite, or JSONL for a `.jsonl` path) keyed by sha256 of (model, rendered prompt,
  pair texts): a rerun pays nothing twice, and one stopped by a budget continues where it stopped;
- caps on requests and on dollars (from the `usage` field of responses): reaching one raises
  `BudgetExceeded` after every answer received so far is in the cache;
- the API key is read from an environment variable at request time and never stored in the config,
  the cache, log lines or exception messages.

`requests` is imported where a request is sent, so importing this module stays cheap.
"""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.evaluation.judges import Verdict

log = logging.getLogger(__name__)

TASKS = ("summarization", "dialogue", "generic")

# Each template is one user message. The answers are labelled A and B; the last line of the reply carries
# the verdict, after a one-sentence comparison (asking for a reason first tends to steady the verdict).
_ANSWER_FORMAT = (
    "Start with one sentence comparing the two. Then finish with a line of its own that reads exactly "
    '"Preferred: A" or "Preferred: B", or "Preferred: Tie" if neither is better, with nothing after it.'
)

PROMPT_TEMPLATES: dict[str, str] = {
    "summarization": (
        "You are comparing two summaries of the same forum post.\n\n"
        "<post>\n{prompt}\n</post>\n\n"
        "<summary A>\n{first}\n</summary A>\n\n"
        "<summary B>\n{second}\n</summary B>\n\n"
        "The better summary is the one that carries the points of the post that matter most, and does not "
        "spend words on minor details or state anything the post does not support. Judge on that alone: "
        "neither the order of the summaries nor their length is a reason to prefer one.\n\n"
        + _ANSWER_FORMAT
    ),
    "dialogue": (
        "You are comparing two replies an assistant could give to the same user message.\n\n"
        "<conversation>\n{prompt}\n</conversation>\n\n"
        "<reply A>\n{first}\n</reply A>\n\n"
        "<reply B>\n{second}\n</reply B>\n\n"
        "The better reply is the one that is more helpful to the user with what they asked: it addresses "
        "their actual request, is correct, and is of use to them. Judge on that alone: neither the order "
        "of the replies nor their length is a reason to prefer one.\n\n"
        + _ANSWER_FORMAT
    ),
    "generic": (
        "You are comparing two responses to the same instruction.\n\n"
        "<instruction>\n{prompt}\n</instruction>\n\n"
        "<response A>\n{first}\n</response A>\n\n"
        "<response B>\n{second}\n</response B>\n\n"
        "The better response is the one that does what the instruction asks, more completely and more "
        "accurately. Judge on that alone: neither the order of the responses nor their length is a reason "
        "to prefer one.\n\n"
        + _ANSWER_FORMAT
    ),
}

_PLACEHOLDER = re.compile(r"\{(prompt|first|second)\}")
_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504}) | frozenset(range(505, 600))


@dataclass(frozen=True)
class ApiJudgeConfig:
    """Where the judge model lives, what it is asked, and what it may cost.

    Shown under `evaluate.judge_api` in an experiment's YAML. The key itself never appears here: only the
    name of the environment variable that holds it.
    """

    base_url: str  # e.g. "https://api.openai.com/v1", or "http://host:8000/v1" for `vllm serve`
    model: str  # the judge model's name as the server knows it, e.g. "gpt-4o"
    api_key_env: str | None = "OPENAI_API_KEY"  # None or "": send no Authorization (a local vLLM server)
    task: str = "generic"  # summarization | dialogue | generic: picks the built-in prompt
    prompt_template: str | None = None  # overrides the built-in prompt; must hold {prompt} {first} {second}
    max_concurrency: int = 8  # requests in flight at once; rate limits, not our CPUs, bound this
    max_retries: int = 6  # re-sends after a retryable failure; 6 with base 1 s waits about a minute in all
    timeout_s: float = 60.0  # per request, connect and read; judge replies are short
    backoff_base_s: float = 1.0  # first retry waits ~this, doubling each time, with jitter
    backoff_max_s: float = 60.0  # no single wait is longer, Retry-After included
    max_requests: int | None = None  # cap on HTTP requests sent (retries count) over this judge's life
    price_per_1k_input_tokens: float | None = None  # USD; with the output price, turns `usage` into cost
    price_per_1k_output_tokens: float | None = None
    max_cost_usd: float | None = None  # cap on spend; may overshoot by the requests already in flight
    cache_path: str | None = None  # SQLite file, or JSONL if it ends in .jsonl; None: no cache
    temperature: float = 0.0  # greedy: the same pair gets the same verdict, which the cache relies on
    max_tokens: int | None = 256  # reply length cap; a sentence and a verdict line need far fewer

    def __post_init__(self) -> None:
        problems = []
        if not self.base_url:
            problems.append("base_url: must be set")
        if not self.model:
            problems.append("model: must be set")
        if self.task not in TASKS:
            problems.append(f"task: {self.task!r} is not one of {', '.join(TASKS)}")
        if self.prompt_template is not None:
            missing = [p for p in ("prompt", "first", "second") if "{" + p + "}" not in self.prompt_template]
            if missing:
                problems.append(f"prompt_template: lacks the placeholder(s) {', '.join('{' + m + '}' for m in missing)}")
        if self.max_concurrency < 1:
            problems.append(f"max_concurrency: must be >= 1, got {self.max_concurrency}")
        if self.max_retries < 0:
            problems.append(f"max_retries: must be >= 0, got {self.max_retries}")
        if self.timeout_s <= 0:
            problems.append(f"timeout_s: must be > 0, got {self.timeout_s}")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0:
            problems.append("backoff_base_s and backoff_max_s: must be >= 0")
        if self.max_requests is not None and self.max_requests < 0:
            problems.append(f"max_requests: must be >= 0, got {self.max_requests}")
        if self.max_cost_usd is not None and (
            self.price_per_1k_input_tokens is None or self.price_per_1k_output_tokens is None
        ):
            problems.append("max_cost_usd: needs price_per_1k_input_tokens and price_per_1k_output_tokens")
        if problems:
            raise ValueError("ApiJudgeConfig: " + "; ".join(problems))

    @property
    def template(self) -> str:
        """The prompt actually sent: the override if given, else the task's built-in one."""
        return self.prompt_template if self.prompt_template is not None else PROMPT_TEMPLATES[self.task]


class ApiJudgeError(RuntimeError):
    """The API could not give a verdict: a non-retryable status, retries used up, or a missing key.

    `status` is the last HTTP status seen, or None where no response came back.
    """

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class BudgetExceeded(ApiJudgeError):
    """The request cap or the cost cap was reached. Every answer received is already in the cache, so a
    rerun with a larger budget continues from here. `verdicts` holds this call's verdicts, None where the
    pair was not judged."""

    def __init__(self, message: str, *, requests: int, cost_usd: float, judged: int, total: int,
                 verdicts: list[Verdict | None]):
        super().__init__(message)
        self.requests, self.cost_usd, self.judged, self.total = requests, cost_usd, judged, total
        self.verdicts = verdicts


@dataclass
class ApiJudgeStats:
    """Counters over a judge's life (all its `judge` calls)."""

    requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0  # of which re-sends after a retryable failure
    cache_hits: int = 0  # pairs answered from the cache, with no request
    unparsed: int = 0  # verdicts returned as "unparsed", cached or not
    input_tokens: int = 0  # from the responses' `usage`
    output_tokens: int = 0
    cost_usd: float = 0.0  # 0.0 unless prices are configured


@dataclass(frozen=True)
class _Reply:
    text: str
    input_tokens: int | None
    output_tokens: int | None


class _BudgetStop(Exception):
    """A worker found the budget spent before sending."""


class _Cancelled(Exception):
    """A worker found the call aborted (another request failed) before sending."""


# --------------------------------------------------------------------------------------------------------
# Parsing


_MARKUP = re.compile(r"[*_`#>~]")
# A line that starts with "preferred" (a sentence such as "I would have preferred a shorter one" does not),
# an optional noun and separator, then the choice as a word of its own.
_NOUN = r"(?:summary|response|reply|answer|option|output)"
_VERDICT_LINE = re.compile(
    r"^(?:final\s+(?:answer|verdict)\s*[:\-]?\s*)?preferred(?:\s+" + _NOUN + r")?\s*(?:[:=\-\u2013\u2014]|\bis\b)?"
    r"\s*(?:" + _NOUN + r"\s+)?[\"'(\[]?\s*(a|b|tie)\b(.*)$",
    re.IGNORECASE,
)
_BARE_VERDICT = re.compile(r"^[\"'(\[]?\s*(a|b|tie)\s*[\"')\].!]?$", re.IGNORECASE)
_OTHER_CHOICE = re.compile(r"\b(?:a|b|tie)\b", re.IGNORECASE)


def parse_verdict(text: str | None) -> Verdict:
    """The verdict in a judge's reply: "A", "B" or "tie"; "unparsed" when none can be read. Never raises.

    Reads the last line of the form "Preferred: X" (any case, markdown emphasis, "Preferred: Response B",
    "preferred - tie" all work). A line naming a second choice after the first ("Preferred: A or B") is
    ambiguous and skipped. A reply that is nothing but "A", "B" or "Tie" is read too.
    """
    if not isinstance(text, str):
        return "unparsed"
    lines = [_MARKUP.sub("", line).strip() for line in text.splitlines()]
    for line in reversed(lines):
        match = _VERDICT_LINE.match(line)
        if match is None:
            continue
        choice, rest = match.group(1).lower(), match.group(2)
        if _OTHER_CHOICE.search(rest):
            continue
        return "tie" if choice == "tie" else choice.upper()  # type: ignore[return-value]
    nonempty = [line for line in lines if line]
    if len(nonempty) == 1:
        match = _BARE_VERDICT.match(nonempty[0])
        if match:
            choice = match.group(1).lower()
            return "tie" if choice == "tie" else choice.upper()  # type: ignore[return-value]
    return "unparsed"


def render_prompt(template: str, prompt: str, first: str, second: str) -> str:
    """The template with its {prompt}, {first}, {second} filled in one pass: braces inside the texts are
    left alone, and the template needs no brace escaping."""
    values = {"prompt": prompt, "first": first, "second": second}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


# --------------------------------------------------------------------------------------------------------
# Cache


def cache_key(model: str, rendered: str, prompt: str, first: str, second: str) -> str:
    """sha256 of what decides the answer: the judge model, the message sent, and the pair itself."""
    payload = json.dumps([model, rendered, prompt, first, second], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class _ResponseCache:
    """Raw reply texts by cache key (verdicts are re-parsed on read, so a better parser rescues old
    replies). SQLite commits each row; JSONL appends and flushes each line and skips a torn last line."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._jsonl = self.path.suffix == ".jsonl"
        if self._jsonl:
            self._rows: dict[str, dict] = {}
            if self.path.exists():
                with open(self.path, encoding="utf-8") as f:
                    for line in f:
                        try:
                            row = json.loads(line)
                            self._rows[row["key"]] = row
                        except (ValueError, KeyError, TypeError):
                            continue  # a line torn by a crash mid-write
            self._file = open(self.path, "a", encoding="utf-8")
        else:
            self._db = sqlite3.connect(self.path, isolation_level=None)  # autocommit: each row is durable
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
                "text TEXT NOT NULL, input_tokens INTEGER, output_tokens INTEGER, created REAL NOT NULL)"
            )

    def get(self, key: str) -> str | None:
        if self._jsonl:
            row = self._rows.get(key)
            return None if row is None else row["text"]
        found = self._db.execute("SELECT text FROM replies WHERE key = ?", (key,)).fetchone()
        return None if found is None else found[0]

    def put(self, key: str, model: str, reply: _Reply) -> None:
        row = {"key": key, "model": model, "text": reply.text, "input_tokens": reply.input_tokens,
               "output_tokens": reply.output_tokens, "created": time.time()}
        if self._jsonl:
            self._rows[key] = row
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
            self._file.flush()
        else:
            self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?)",
                             (key, model, reply.text, reply.input_tokens, reply.output_tokens, row["created"]))

    def close(self) -> None:
        if self._jsonl:
            self._file.close()
        else:
            self._db.close()


class _NoCache:
    def get(self, key: str) -> str | None:
        return None

    def put(self, key: str, model: str, reply: _Reply) -> None:
        pass

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------------
# The judge


class ApiJudge:
    """Pairwise judge backed by a chat-completions endpoint; implements `pipeline.evaluation.judges.Judge`.

    `judge(prompts, first, second)` asks once per distinct uncached pair, in parallel, and returns one
    verdict per pair. Counters are in `stats`. Raises `BudgetExceeded` at a cap and `ApiJudgeError` when
    a request cannot succeed; in both cases the replies received so far are cached first.
    """

    def __init__(self, config: ApiJudgeConfig):
        self.config = config
        self.name = f"api:{config.model}"
        self._init_runtime()
        self._stats = ApiJudgeStats()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        # Bounds requests in flight across concurrent `judge` calls too, not only within one call's pool.
        self._slots = threading.BoundedSemaphore(self.config.max_concurrency)

    # Locks do not pickle; a judge shipped to a Ray worker gets fresh ones.
    def __getstate__(self) -> dict:
        return {"config": self.config, "name": self.name, "_stats": self._stats}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    @property
    def stats(self) -> ApiJudgeStats:
        """A snapshot of the counters."""
        with self._lock:
            return dataclasses.replace(self._stats)

    def judge(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> list[Verdict]:
        """One verdict per pair: "A" (first better), "B", "tie", or "unparsed"."""
        if not len(prompts) == len(first) == len(second):
            raise ValueError(f"prompts, first and second differ in length: "
                             f"{len(prompts)}, {len(first)}, {len(second)}")
        cfg = self.config
        verdicts: list[Verdict | None] = [None] * len(prompts)
        positions: dict[str, list[int]] = {}  # identical pairs within a call are asked once
        rendered: dict[str, str] = {}
        for i, (p, a, b) in enumerate(zip(prompts, first, second)):
            text = render_prompt(cfg.template, p, a, b)
            key = cache_key(cfg.model, text, p, a, b)
            positions.setdefault(key, []).append(i)
            rendered[key] = text

        cache = _ResponseCache(cfg.cache_path) if cfg.cache_path else _NoCache()
        try:
            todo = []
            for key, where in positions.items():
                cached = cache.get(key)
                if cached is None:
                    todo.append(key)
                    continue
                for i in where:
                    verdicts[i] = parse_verdict(cached)
                with self._lock:
                    self._stats.cache_hits += len(where)
            if todo:
                self._ask_all(todo, rendered, positions, verdicts, cache)
        finally:
            cache.close()
            self._count_unparsed(verdicts)
        return verdicts  # type: ignore[return-value]  # no None is left when no exception was raised

    def _count_unparsed(self, verdicts: list[Verdict | None]) -> None:
        unparsed = sum(v == "unparsed" for v in verdicts)
        if unparsed:
            log.warning("%s: %d of %d verdicts could not be parsed", self.name, unparsed, len(verdicts))
        with self._lock:
            self._stats.unparsed += unparsed

    def _ask_all(self, todo: list[str], rendered: dict[str, str], positions: dict[str, list[int]],
                 verdicts: list[Verdict | None], cache: _ResponseCache | _NoCache) -> None:
        import requests

        cfg = self.config
        headers = {"Content-Type": "application/json"}
        api_key = self._api_key()
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        url = cfg.base_url.rstrip("/") + "/chat/completions"
        abort = threading.Event()  # set when one request fails for good: the others send nothing new
        budget_hit, error = False, None
        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=cfg.max_concurrency)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        pool = ThreadPoolExecutor(max_workers=min(cfg.max_concurrency, len(todo)),
                                  thread_name_prefix="api-judge")
        try:
            futures = {pool.submit(self._ask_or_abort, session, url, headers, api_key, self._body(rendered[key]),
                                   abort): key for key in todo}
            for future in as_completed(futures):
                key = futures[future]
                try:
                    reply = future.result()
                except _BudgetStop:
                    budget_hit = True
                    continue
                except _Cancelled:
                    continue
                except Exception as exc:  # noqa: BLE001  (re-raised below, once the rest have landed)
                    if error is None:
                        error = exc
                    abort.set()
                    continue
                cache.put(key, cfg.model, reply)
                for i in positions[key]:
                    verdicts[i] = parse_verdict(reply.text)
                if cfg.max_cost_usd is not None and (reply.input_tokens is None or reply.output_tokens is None):
                    # Paid for and cached above, but further spending could not be tracked: stop here.
                    if error is None:
                        error = ApiJudgeError(f"{self.name}: max_cost_usd is set but a response carries no "
                                              f"`usage` token counts, so spending cannot be tracked")
                    abort.set()
        finally:
            abort.set()  # wakes workers asleep in a backoff (e.g. on KeyboardInterrupt)
            pool.shutdown(wait=True, cancel_futures=True)
            session.close()
        if error is not None:
            raise error
        if budget_hit:
            stats = self.stats
            judged = sum(v is not None for v in verdicts)
            where = (f"replies so far are cached in {cfg.cache_path}; rerun with a larger budget to continue"
                     if cfg.cache_path else "no cache_path is set, so a rerun starts over")
            raise BudgetExceeded(
                f"{self.name}: budget reached after {stats.requests} requests (max_requests="
                f"{cfg.max_requests}) and ${stats.cost_usd:.4f} (max_cost_usd={cfg.max_cost_usd}); "
                f"{judged} of {len(verdicts)} pairs of this call judged; {where}",
                requests=stats.requests, cost_usd=stats.cost_usd, judged=judged, total=len(verdicts),
                verdicts=list(verdicts))

    def _api_key(self) -> str | None:
        env = self.config.api_key_env
        if not env:
            return None
        key = os.environ.get(env, "")
        if not key:
            raise ApiJudgeError(f"{self.name}: environment variable {env} is empty or unset; it must hold the "
                                f"API key (or set api_key_env to null for a server without authentication)")
        return key

    def _body(self, rendered: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.config.model, "messages": [{"role": "user", "content": rendered}],
                                "temperature": self.config.temperature}
        if self.config.max_tokens is not None:
            body["max_tokens"] = self.config.max_tokens
        return body

    def _reserve(self, abort: threading.Event) -> None:
        """Count one request about to be sent, or refuse if the call is aborted or a budget is spent."""
        cfg = self.config
        with self._lock:
            if abort.is_set():
                raise _Cancelled
            if cfg.max_requests is not None and self._stats.requests >= cfg.max_requests:
                raise _BudgetStop
            if cfg.max_cost_usd is not None and self._stats.cost_usd >= cfg.max_cost_usd:
                raise _BudgetStop
            self._stats.requests += 1

    def _ask_or_abort(self, *args) -> _Reply:
        """`_ask_one`, aborting the call from the worker itself on failure, so that the pool's next task
        sends nothing even before the caller's thread hears of the failure."""
        abort: threading.Event = args[-1]
        try:
            return self._ask_one(*args)
        except (_BudgetStop, _Cancelled):
            raise
        except BaseException:
            abort.set()
            raise

    def _ask_one(self, session, url: str, headers: dict[str, str], api_key: str | None, body: dict,
                 abort: threading.Event) -> _Reply:
        """Send one judging request, retrying what is worth retrying; the reply's text and token usage."""
        import requests

        cfg = self.config
        last_problem, last_status = "nothing sent", None
        for attempt in range(cfg.max_retries + 1):
            self._reserve(abort)
            if attempt:
                with self._lock:
                    self._stats.retries += 1
            retry_after = None
            try:
                with self._slots:
                    response = session.post(url, json=body, headers=headers, timeout=cfg.timeout_s)
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                # requests' messages name the URL, never the headers; redacted anyway.
                last_problem, last_status = _redact(f"{type(exc).__name__}: {exc}", api_key)[:300], None
            else:
                status = response.status_code
                if status == 200:
                    try:
                        reply = _read_reply(response.json())
                    except (ValueError, KeyError, IndexError, TypeError):
                        last_problem, last_status = "HTTP 200 with a body that is not a chat completion", 200
                    else:
                        self._account(reply)
                        if cfg.max_cost_usd is not None and (reply.input_tokens is None or reply.output_tokens is None):
                            abort.set()  # spending can no longer be tracked: send nothing more (see _ask_all)
                        return reply
                elif status in _RETRYABLE_STATUS:
                    last_problem, last_status = f"HTTP {status}", status
                    retry_after = _retry_after_s(response.headers)
                else:
                    detail = _redact(response.text, api_key)[:500]
                    raise ApiJudgeError(f"{self.name}: {url} answered HTTP {status}, which is not retried: "
                                        f"{detail}", status=status)
            if attempt == cfg.max_retries:
                break
            delay = self._backoff_s(attempt, retry_after)
            log.warning("%s: %s; retry %d of %d in %.2f s", self.name, last_problem, attempt + 1,
                        cfg.max_retries, delay)
            if abort.wait(delay):
                raise _Cancelled
        raise ApiJudgeError(f"{self.name}: gave up after {cfg.max_retries + 1} attempts to {url}; last: "
                            f"{last_problem}", status=last_status)

    def _backoff_s(self, attempt: int, retry_after: float | None) -> float:
        cfg = self.config
        if retry_after is not None:
            return min(max(retry_after, 0.0), cfg.backoff_max_s)
        # Jitter spreads the retries of a pool that was throttled at the same moment.
        return min(cfg.backoff_base_s * 2.0**attempt, cfg.backoff_max_s) * random.uniform(0.5, 1.0)

    def _account(self, reply: _Reply) -> None:
        cfg = self.config
        with self._lock:
            self._stats.input_tokens += reply.input_tokens or 0
            self._stats.output_tokens += reply.output_tokens or 0
            if cfg.price_per_1k_input_tokens is not None and cfg.price_per_1k_output_tokens is not None:
                self._stats.cost_usd += ((reply.input_tokens or 0) * cfg.price_per_1k_input_tokens
                                         + (reply.output_tokens or 0) * cfg.price_per_1k_output_tokens) / 1000.0


def _read_reply(payload: Mapping) -> _Reply:
    content = payload["choices"][0]["message"].get("content")  # None on a refusal: parsed as "unparsed"
    usage = payload.get("usage") or {}
    input_tokens, output_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return _Reply(text=content if isinstance(content, str) else "",
                  input_tokens=int(input_tokens) if input_tokens is not None else None,
                  output_tokens=int(output_tokens) if output_tokens is not None else None)


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
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


def make_api_judge(config: Mapping[str, Any], *, where: str = "evaluate.judge_api") -> ApiJudge:
    """An `ApiJudge` from a plain mapping (a YAML section). Unknown keys are errors naming their path."""
    known = {f.name for f in dataclasses.fields(ApiJudgeConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    return ApiJudge(ApiJudgeConfig(**config))
