"""The API judge's settings, its errors, and its counters."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import ConfigError
from pipeline.evaluation.api_judge.templates import TASKS, builtin_prompt
from pipeline.evaluation.api_judge.verdicts import VERDICT_MODES
from pipeline.evaluation.judges import Verdict


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
    # json: structured output (a JSON verdict); logprobs: the answer labels' log-probs; text: the reply's
    # "Preferred: X" line. The first two fall back to reading the text where the server gives neither.
    verdict: str = "json"
    max_concurrency: int = 8  # requests in flight at once; rate limits, not our CPUs, bound this
    # Re-sends by the openai client after a connection error, timeout, 408, 409, 429 or 5xx: it waits 0.5 s
    # doubling to 8 s (jittered), or the server's Retry-After up to 2 min; 6 waits about 30 s in all.
    max_retries: int = 6
    timeout_s: float = 60.0  # per request, connect and read; judge replies are short
    max_requests: int | None = None  # cap on HTTP requests sent (retries count) over this judge's life
    price_per_1k_input_tokens: float | None = None  # USD; with the output price, turns `usage` into cost
    price_per_1k_output_tokens: float | None = None
    max_cost_usd: float | None = None  # cap on spend; may overshoot by the requests already in flight
    # SQLite file, or JSONL if it ends in .jsonl; None: no cache. The evaluate stage's default, when the key is
    # left out: <run_dir>/judge_cache.sqlite, so a rerun never pays twice.
    cache_path: str | None = None
    temperature: float = 0.0  # greedy: the same pair gets the same verdict, which the cache relies on
    max_tokens: int | None = 256  # reply length cap; a sentence and a verdict line need far fewer

    def __post_init__(self) -> None:
        problems = []
        if not self.base_url:
            problems.append("base_url: must be set")
        if not self.model:
            problems.append("model: must be set")
        if self.verdict not in VERDICT_MODES:
            problems.append(f"verdict: {self.verdict!r} is not one of {', '.join(VERDICT_MODES)}")
        if self.task not in TASKS:
            problems.append(f"task: {self.task!r} is not one of {', '.join(TASKS)}")
        if self.prompt_template is not None:
            missing = [p for p in ("prompt", "first", "second") if "{" + p + "}" not in self.prompt_template]
            if missing:
                problems.append(
                    f"prompt_template: lacks the placeholder(s) {', '.join('{' + m + '}' for m in missing)}"
                )
        if self.max_concurrency < 1:
            problems.append(f"max_concurrency: must be >= 1, got {self.max_concurrency}")
        if self.max_retries < 0:
            problems.append(f"max_retries: must be >= 0, got {self.max_retries}")
        if self.timeout_s <= 0:
            problems.append(f"timeout_s: must be > 0, got {self.timeout_s}")
        if self.max_requests is not None and self.max_requests < 0:
            problems.append(f"max_requests: must be >= 0, got {self.max_requests}")
        if self.max_cost_usd is not None and not self.priced:
            problems.append("max_cost_usd: needs price_per_1k_input_tokens and price_per_1k_output_tokens")
        if problems:
            raise ConfigError("ApiJudgeConfig: " + "; ".join(problems))

    @property
    def template(self) -> str:
        """The prompt actually sent: the override if given, else the task's built-in one for this verdict."""
        return self.prompt_template if self.prompt_template is not None else builtin_prompt(self.task, self.verdict)

    @property
    def priced(self) -> bool:
        """Whether both token prices are set, so that replies' `usage` can be turned into dollars."""
        return self.price_per_1k_input_tokens is not None and self.price_per_1k_output_tokens is not None


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

    def __init__(
        self, message: str, *, requests: int, cost_usd: float, judged: int, total: int, verdicts: list[Verdict | None]
    ):
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
    fallbacks: int = 0  # verdicts of `verdict: json | logprobs` read from the text instead (found or not)
    input_tokens: int = 0  # from the responses' `usage`
    output_tokens: int = 0
    cost_usd: float = 0.0  # 0.0 unless prices are configured
