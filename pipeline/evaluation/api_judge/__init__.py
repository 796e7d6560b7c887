"""A pairwise LLM judge over any OpenAI-compatible chat-completions API (OpenAI, `vllm serve`, ...).

The DPO paper (Rafailov et al., 2023, sec. 6 and app. C) measured win rates with GPT-4 as the judge: it
was shown a post or a query and two candidate answers and asked which one was better. `ApiJudge` does the
same for our `Judge` protocol (pipeline/evaluation/judges.py), so `judge_both_orders` can ask in both
orders and cancel the judge's position bias.

What makes it safe to point at a paid API:
- a thread pool bounded by `max_concurrency`; retries with jittered exponential backoff on 429, 408,
  5xx, connection errors and timeouts, honouring Retry-After; other 4xx fail at once, naming the status
  (client.py);
- a response cache (SQLite, or JSONL for a `.jsonl` path) keyed by sha256 of (model, rendered prompt,
  pair texts): a rerun pays nothing twice, and one stopped by a budget continues where it stopped
  (cache.py);
- caps on requests and on dollars (from the `usage` field of responses): reaching one raises
  `BudgetExceeded` after every answer received so far is in the cache (judge.py);
- the API key is read from an environment variable at request time and never stored in the config,
  the cache, log lines or exception messages.

The settings and errors are in config.py, the prompts and the verdict parser in prompts.py.
"""

from pipeline.evaluation.api_judge.cache import cache_key
from pipeline.evaluation.api_judge.config import ApiJudgeConfig, ApiJudgeError, ApiJudgeStats, BudgetExceeded
from pipeline.evaluation.api_judge.judge import ApiJudge, make_api_judge
from pipeline.evaluation.api_judge.prompts import PROMPT_TEMPLATES, TASKS, parse_verdict, render_prompt

__all__ = [
    "PROMPT_TEMPLATES", "TASKS", "ApiJudge", "ApiJudgeConfig", "ApiJudgeError", "ApiJudgeStats", "BudgetExceeded",
    "cache_key", "make_api_judge", "parse_verdict", "render_prompt",
]
