"""A pairwise LLM judge over any OpenAI-compatible chat-completions API (OpenAI, `vllm serve`, ...).

The DPO paper (Rafailov et al., 2023, sec. 6 and app. C) measured win rates with GPT-4 as the judge: it
was shown a post or a query and two candidate answers and asked which one was better. `ApiJudge` does the
same for our `Judge` protocol (pipeline/evaluation/judges.py), so `judge_both_orders` can ask in both
orders and cancel the judge's position bias.

Verdicts do not hang on a regex alone: `verdict: json` (the default) asks for structured output, a JSON
object with the choice in a field of its own, and `verdict: logprobs` reads the log-probabilities of the
labels A, B and Tie where the reply writes its verdict; the "Preferred: X" regex reads the text where the
server gives neither, and such fallbacks are counted like parse failures (verdicts.py).

What makes it safe to point at a paid API:
- HTTP through the `openai` client library: its timeouts, and its retries with jittered exponential
  backoff on 408, 409, 429, 5xx, connection errors and timeouts, honouring Retry-After; other 4xx fail at
  once, naming the status; a thread pool bounded by `max_concurrency` (client.py);
- a response cache (SQLite, or JSONL for a `.jsonl` path) keyed by sha256 of (model, rendered prompt,
  pair texts): a rerun pays nothing twice, and one stopped by a budget continues where it stopped
  (cache.py);
- caps on requests (each HTTP attempt the client makes, retries included) and on dollars (from the `usage`
  field of responses): reaching one raises `BudgetExceeded` after every answer received so far is in the
  cache (judge.py);
- the API key is read from an environment variable at request time and never stored in the config,
  the cache, log lines or exception messages.

The settings and errors are in config.py, the prompts and the verdict parser in prompts.py.
"""

from pipeline.evaluation.api_judge.cache import cache_key
from pipeline.evaluation.api_judge.config import ApiJudgeConfig, ApiJudgeError, ApiJudgeStats, BudgetExceeded
from pipeline.evaluation.api_judge.judge import ApiJudge, make_api_judge
from pipeline.evaluation.api_judge.templates import (
    PROMPT_TEMPLATES,
    TASKS,
    builtin_prompt,
    parse_verdict,
    render_prompt,
)
from pipeline.evaluation.api_judge.verdicts import VERDICT_MODES, VERDICT_SCHEMA, label_logprobs, read_verdict

__all__ = [
    "PROMPT_TEMPLATES",
    "TASKS",
    "VERDICT_MODES",
    "VERDICT_SCHEMA",
    "ApiJudge",
    "ApiJudgeConfig",
    "ApiJudgeError",
    "ApiJudgeStats",
    "BudgetExceeded",
    "builtin_prompt",
    "cache_key",
    "label_logprobs",
    "make_api_judge",
    "parse_verdict",
    "read_verdict",
    "render_prompt",
]
