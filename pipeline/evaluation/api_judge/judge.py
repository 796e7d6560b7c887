"""`ApiJudge`: pairwise verdicts from a chat model, asked in parallel, each distinct pair once."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Any

from pipeline.evaluation.api_judge.cache import ResponseCache, cache_key, open_cache
from pipeline.evaluation.api_judge.client import (BudgetStop, Cancelled, Usage, endpoint, open_session, request_body,
                                                  send)
from pipeline.evaluation.api_judge.config import ApiJudgeConfig, ApiJudgeError, ApiJudgeStats, BudgetExceeded
from pipeline.evaluation.api_judge.prompts import parse_verdict, render_prompt
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
            key = cache_key(self.config.model, text, p, a, b)
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

    def _answer_from_cache(self, cache: ResponseCache, positions: dict[str, list[int]],
                           verdicts: list[Verdict | None]) -> list[str]:
        """Fill in the verdicts of cached pairs; the keys still to ask."""
        todo = []
        for key, where in positions.items():
            cached = cache.get(key)
            if cached is None:
                todo.append(key)
                continue
            for i in where:
                verdicts[i] = parse_verdict(cached)
            self._usage.count(cache_hits=len(where))
        return todo

    def _count_unparsed(self, verdicts: list[Verdict | None]) -> None:
        unparsed = sum(v == "unparsed" for v in verdicts)
        if unparsed:
            log.warning("%s: %d of %d verdicts could not be parsed", self.name, unparsed, len(verdicts))
        self._usage.count(unparsed=unparsed)

    def _ask_all(self, todo: list[str], rendered: dict[str, str], positions: dict[str, list[int]],
                 verdicts: list[Verdict | None], cache: ResponseCache) -> None:
        """Ask every key in `todo` in parallel, caching and parsing each reply as it lands."""
        cfg = self.config
        target = endpoint(cfg, name=self.name)
        abort = threading.Event()  # set when one request fails for good: the others send nothing new
        session = open_session(cfg.max_concurrency)
        pool = ThreadPoolExecutor(max_workers=min(cfg.max_concurrency, len(todo)), thread_name_prefix="api-judge")
        try:
            futures = {pool.submit(send, session, target, request_body(cfg, rendered[key]), usage=self._usage,
                                   abort=abort, name=self.name): key for key in todo}
            budget_hit, error = self._collect(futures, positions, verdicts, cache, abort)
        finally:
            abort.set()  # wakes workers asleep in a backoff (e.g. on KeyboardInterrupt)
            pool.shutdown(wait=True, cancel_futures=True)
            session.close()
        if error is not None:
            raise error
        if budget_hit:
            raise self._budget_exceeded(verdicts)

    def _collect(self, futures: dict[Future, str], positions: dict[str, list[int]], verdicts: list[Verdict | None],
                 cache: ResponseCache, abort: threading.Event) -> tuple[bool, Exception | None]:
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
            except Exception as exc:  # noqa: BLE001  (raised by the caller once the rest have landed)
                if error is None:
                    error = exc
                abort.set()
                continue
            cache.put(key, cfg.model, reply)
            for i in positions[key]:
                verdicts[i] = parse_verdict(reply.text)
            if cfg.max_cost_usd is not None and not reply.has_usage:
                # Paid for and cached above, but further spending could not be tracked: stop here.
                if error is None:
                    error = ApiJudgeError(f"{self.name}: max_cost_usd is set but a response carries no "
                                          f"`usage` token counts, so spending cannot be tracked")
                abort.set()
        return budget_hit, error

    def _budget_exceeded(self, verdicts: list[Verdict | None]) -> BudgetExceeded:
        cfg = self.config
        stats = self.stats
        judged = sum(v is not None for v in verdicts)
        where = (f"replies so far are cached in {cfg.cache_path}; rerun with a larger budget to continue"
                 if cfg.cache_path else "no cache_path is set, so a rerun starts over")
        return BudgetExceeded(
            f"{self.name}: budget reached after {stats.requests} requests (max_requests="
            f"{cfg.max_requests}) and ${stats.cost_usd:.4f} (max_cost_usd={cfg.max_cost_usd}); "
            f"{judged} of {len(verdicts)} pairs of this call judged; {where}",
            requests=stats.requests, cost_usd=stats.cost_usd, judged=judged, total=len(verdicts),
            verdicts=list(verdicts))


def make_api_judge(config: Mapping[str, Any], *, where: str = "evaluate.judge_api") -> ApiJudge:
    """An `ApiJudge` from a plain mapping (a YAML section). Unknown keys are errors naming their path."""
    known = {f.name for f in dataclasses.fields(ApiJudgeConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    return ApiJudge(ApiJudgeConfig(**config))
