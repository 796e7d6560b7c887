"""`ApiJudge`: pairwise verdicts from a chat model, asked in parallel, each distinct pair once."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Any

from pipeline.config import ConfigError
from pipeline.evaluation.api_judge.cache import Reply, ResponseCache, cache_key, open_cache
from pipeline.evaluation.api_judge.client import (
    BudgetStop,
    Cancelled,
    Meter,
    Usage,
    open_client,
    read_key,
    request_args,
    send,
)
from pipeline.evaluation.api_judge.config import ApiJudgeConfig, ApiJudgeError, ApiJudgeStats, BudgetExceeded
from pipeline.evaluation.api_judge.templates import render_prompt
from pipeline.evaluation.api_judge.verdicts import read_verdict
from pipeline.evaluation.judges import Verdict, check_pair_lengths

log = logging.getLogger(__name__)


class ApiJudge:
    """Pairwise judge backed by a chat-completions endpoint; implements `pipeline.evaluation.judges.Judge`.

    `judge(prompts, first, second)` asks once per distinct uncached pair, in parallel, and returns one
    verdict per pair. Counters are in `stats`. Raises `BudgetExceeded` at a cap and `ApiJudgeError` when
    a request cannot succeed; in both cases the replies received so far are cached first.
    """

    def __init__(self, config: ApiJudgeConfig):
        self.config = config
        self.name = f"api:{config.model}"
        self._usage = Usage(config)

    @property
    def stats(self) -> ApiJudgeStats:
        """A snapshot of the counters."""
        return self._usage.snapshot()

    def judge(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> list[Verdict]:
        """One verdict per pair: "A" (first better), "B", "tie", or "unparsed"."""
        check_pair_lengths(prompts, first, second)
        verdicts: list[Verdict | None] = [None] * len(prompts)
        rendered: dict[str, str] = {}
        positions: dict[str, list[int]] = {}  # identical pairs within a call are asked once
        for i, (p, a, b) in enumerate(zip(prompts, first, second)):
            text = render_prompt(self.config.template, p, a, b)
            key = cache_key(self.config.model, text, p, a, b, verdict=self.config.verdict)
            positions.setdefault(key, []).append(i)
            rendered[key] = text
        cache = open_cache(self.config.cache_path)
        try:
            todo = self._answer_from_cache(cache, positions, verdicts)
            if todo:
                self._ask_all(todo, rendered, positions, verdicts, cache)
        finally:
            cache.close()
            self._count_unparsed(verdicts)
        return verdicts  # type: ignore[return-value]  # no None is left when no exception was raised

    def _answer_from_cache(
        self, cache: ResponseCache, positions: dict[str, list[int]], verdicts: list[Verdict | None]
    ) -> list[str]:
        """Fill in the verdicts of cached pairs; the keys still to ask."""
        todo = []
        for key, where in positions.items():
            cached = cache.get(key)
            if cached is None:
                todo.append(key)
                continue
            self._record(cached, where, verdicts)
            self._usage.count(cache_hits=len(where))
        return todo

    def _record(self, reply: Reply, where: list[int], verdicts: list[Verdict | None]) -> None:
        """The reply's verdict at each position in `where`, counting a structured reading that fell back."""
        read = read_verdict(reply.text, reply.label_logprobs, self.config.verdict)
        for i in where:
            verdicts[i] = read.verdict
        if self.config.verdict != "text" and read.source == "regex":
            self._usage.count(fallbacks=len(where))

    def _count_unparsed(self, verdicts: list[Verdict | None]) -> None:
        unparsed = sum(v == "unparsed" for v in verdicts)
        if unparsed:
            log.warning("%s: %d of %d verdicts could not be parsed", self.name, unparsed, len(verdicts))
        self._usage.count(unparsed=unparsed)

    def _ask_all(
        self,
        todo: list[str],
        rendered: dict[str, str],
        positions: dict[str, list[int]],
        verdicts: list[Verdict | None],
        cache: ResponseCache,
    ) -> None:
        """Ask every key in `todo` in parallel, caching and parsing each reply as it lands."""
        cfg = self.config
        api_key = read_key(cfg, name=self.name)
        abort = threading.Event()  # set when one request fails for good: the others send nothing new
        meter = Meter(self._usage, abort, name=self.name)
        client = open_client(cfg, meter, api_key)
        pool = ThreadPoolExecutor(max_workers=min(cfg.max_concurrency, len(todo)), thread_name_prefix="api-judge")
        try:
            futures = {
                pool.submit(
                    send, client, meter, request_args(cfg, rendered[key], with_key=api_key is not None), api_key=api_key
                ): key
                for key in todo
            }
            budget_hit, error = self._collect(futures, positions, verdicts, cache, abort)
        finally:
            # A worker asleep in the client's backoff sends nothing once it wakes (e.g. after KeyboardInterrupt).
            abort.set()
            pool.shutdown(wait=True, cancel_futures=True)
            client.close()
        if error is not None:
            raise error
        if budget_hit:
            raise self._budget_exceeded(verdicts)

    def _collect(
        self,
        futures: dict[Future, str],
        positions: dict[str, list[int]],
        verdicts: list[Verdict | None],
        cache: ResponseCache,
        abort: threading.Event,
    ) -> tuple[bool, Exception | None]:
        """Cache and parse the replies as they land: (whether a budget was reached, the first failure)."""
        cfg = self.config
        budget_hit, error = False, None
        for future in as_completed(futures):
            key = futures[future]
            try:
                reply = future.result()
            except BudgetStop:
                budget_hit = True
                continue
            except Cancelled:
                continue
            except Exception as exc:
                if error is None:
                    error = exc
                abort.set()
                continue
            cache.put(key, cfg.model, reply)
            self._record(reply, positions[key], verdicts)
            if cfg.max_cost_usd is not None and not reply.has_usage:
                # Paid for and cached above, but further spending could not be tracked: stop here.
                if error is None:
                    error = ApiJudgeError(
                        f"{self.name}: max_cost_usd is set but a response carries no "
                        f"`usage` token counts, so spending cannot be tracked"
                    )
                abort.set()
        return budget_hit, error

    def _budget_exceeded(self, verdicts: list[Verdict | None]) -> BudgetExceeded:
        cfg = self.config
        stats = self.stats
        judged = sum(v is not None for v in verdicts)
        where = (
            f"replies so far are cached in {cfg.cache_path}; rerun with a larger budget to continue"
            if cfg.cache_path
            else "no cache_path is set, so a rerun starts over"
        )
        return BudgetExceeded(
            f"{self.name}: budget reached after {stats.requests} requests (max_requests="
            f"{cfg.max_requests}) and ${stats.cost_usd:.4f} (max_cost_usd={cfg.max_cost_usd}); "
            f"{judged} of {len(verdicts)} pairs of this call judged; {where}",
            requests=stats.requests,
            cost_usd=stats.cost_usd,
            judged=judged,
            total=len(verdicts),
            verdicts=list(verdicts),
        )


# Keys of earlier versions: a config that still has one fails naming why instead of "unknown key".
REMOVED_KEYS = {
    "backoff_base_s": "the openai client's own backoff applies (0.5 s doubling to 8 s, Retry-After honoured)",
    "backoff_max_s": "the openai client's own backoff applies (0.5 s doubling to 8 s, Retry-After honoured)",
}


def make_api_judge(
    config: Mapping[str, Any], *, where: str = "evaluate.judge_api", default_cache_path: str | None = None
) -> ApiJudge:
    """An `ApiJudge` from a plain mapping (a YAML section). Unknown keys are errors naming their path.

    default_cache_path: the cache used when the section leaves `cache_path` out (an explicit null keeps none).
    """
    known = {f.name for f in dataclasses.fields(ApiJudgeConfig)}
    for key in sorted(set(config) & set(REMOVED_KEYS)):
        raise ConfigError(f"{where}.{key}: removed; {REMOVED_KEYS[key]}")
    unknown = sorted(set(config) - known)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    required = [
        f.name
        for f in dataclasses.fields(ApiJudgeConfig)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in config]
    if missing:
        raise ConfigError(f"{where}: {', '.join(missing)} not set (the API judge needs {', '.join(required)})")
    return ApiJudge(ApiJudgeConfig(**{"cache_path": default_cache_path, **config}))
