"""The API judge against a scripted chat-completions server on loopback: retries, caps, cache, secrecy."""

import logging
import pickle
import re
import socket

import pytest

from pipeline.evaluation.api_judge import (
    PROMPT_TEMPLATES,
    ApiJudge,
    ApiJudgeConfig,
    ApiJudgeError,
    BudgetExceeded,
    make_api_judge,
    parse_verdict,
    render_prompt,
)
from pipeline.evaluation.judges import judge_both_orders
from tests.helpers.fake_chat_server import KEY_ENV, SECRET, TEMPLATE, make_judge, pairs

pytestmark = pytest.mark.usefixtures("api_key")


def test_valid_answers_request_shape_and_key_header(server):
    judge = make_judge(server, price_per_1k_input_tokens=0.01, price_per_1k_output_tokens=0.03)
    prompts, first, second, expected = pairs(6)
    assert judge.judge(prompts, first, second) == expected
    assert judge.name == "api:judge-model"
    assert server.count == 6
    for request in server.received:
        assert request["path"] == "/v1/chat/completions"
        assert request["auth"] == f"Bearer {SECRET}"  # the key comes from the environment variable
        assert request["body"]["model"] == "judge-model"
        assert request["body"]["temperature"] == 0.0
        assert request["body"]["messages"][0]["role"] == "user"
        schema = request["body"]["response_format"]["json_schema"]  # verdict: json, the default
        assert schema["strict"] and schema["schema"]["properties"]["preferred"]["enum"] == ["A", "B", "tie"]
    contents = {r["body"]["messages"][0]["content"] for r in server.received}
    assert render_prompt(TEMPLATE, prompts[0], first[0], second[0]) in contents
    stats = judge.stats
    assert (stats.requests, stats.retries, stats.cache_hits, stats.unparsed, stats.fallbacks) == (6, 0, 0, 0, 0)
    assert (stats.input_tokens, stats.output_tokens) == (600, 60)
    assert stats.cost_usd == pytest.approx(6 * (100 * 0.01 + 10 * 0.03) / 1000)


def test_transient_failures_are_retried_until_they_succeed(server, caplog):
    # The first two retries wait the client's own backoff (about 0.5 s, then 1 s); the rest wait what the
    # server asks for in retry-after-ms, as OpenAI's API sends it.
    server.faults.extend(
        [
            ("slow", 1.0),  # beyond timeout_s=0.5
            ("drop",),  # connection closed without a reply
            ("status", 429, {"retry-after-ms": "10"}),
            ("status", 500, {"retry-after-ms": "10"}),
            ("status", 503, {"retry-after-ms": "10"}),
        ]
    )
    judge = make_judge(server, max_concurrency=1, max_retries=6, timeout_s=0.5)
    prompts, first, second, expected = pairs(4)
    with caplog.at_level(logging.WARNING, logger="pipeline.evaluation.api_judge"):
        assert judge.judge(prompts, first, second) == expected
    assert server.count == 4 + 5
    stats = judge.stats
    assert (stats.requests, stats.retries, stats.unparsed) == (9, 5, 0)
    assert "retry" in caplog.text and "HTTP 429; retry 3 of 6" in caplog.text and SECRET not in caplog.text


def test_retry_after_is_honoured(server, caplog):
    server.faults.extend([("status", 429, {"Retry-After": "1"}), ("status", 429, {"retry-after-ms": "300"})])
    judge = make_judge(server, max_concurrency=1)
    prompts, first, second, expected = pairs(1)
    with caplog.at_level(logging.INFO, logger="openai"):
        assert judge.judge(prompts, first, second) == expected
    assert server.count == 3
    # The waits the client chose before each retry, as it logs them: the server's, not its own backoff
    # (0.5 s, then 1 s, each less up to a quarter).
    waits = [float(s) for s in re.findall(r"Retrying request in ([0-9.]+) seconds", caplog.text)]
    assert waits == [1.0, 0.3]


def test_garbage_reply_is_unparsed_and_counted(server):
    judge = make_judge(server)
    prompts, first, second, expected = pairs(4)
    prompts[2] = "GARBAGE please"
    verdicts = judge.judge(prompts, first, second)
    assert verdicts == expected[:2] + ["unparsed"] + expected[3:]
    assert judge.stats.unparsed == 1
    assert judge.stats.fallbacks == 1  # no JSON verdict in that reply: the regex read it, and found none
    assert judge.stats.retries == 0  # a reply without a verdict is an answer, not a failure
    assert server.count == 4


def test_retries_exhausted_raise_naming_the_status(server):
    server.faults.extend([("status", 500, {"retry-after-ms": "10"})] * 10)
    judge = make_judge(server, max_concurrency=1, max_retries=2)
    prompts, first, second, _ = pairs(1)
    with pytest.raises(ApiJudgeError, match="HTTP 500") as caught:
        judge.judge(prompts, first, second)
    assert caught.value.status == 500
    assert server.count == 3
    assert SECRET not in str(caught.value)


def test_unreachable_server_is_retried_then_raises():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = ApiJudge(
        ApiJudgeConfig(
            base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key_env=KEY_ENV, max_retries=1, timeout_s=0.5
        )
    )
    with pytest.raises(ApiJudgeError, match=r"gave up after 2 attempts .*ConnectionError") as caught:
        judge.judge(["p"], ["a"], ["b"])
    assert judge.stats.requests == 2 and judge.stats.retries == 1
    assert SECRET not in str(caught.value)


def test_non_retryable_400_raises_at_once_without_the_key(server):
    server.faults.append(("echo", 400))
    judge = make_judge(server, max_concurrency=1)
    prompts, first, second, _ = pairs(3)
    with pytest.raises(ApiJudgeError, match="HTTP 400") as caught:
        judge.judge(prompts, first, second)
    assert caught.value.status == 400
    assert "bad request with Bearer" in str(caught.value)  # the server's own message is kept ...
    assert SECRET not in str(caught.value) and SECRET not in repr(caught.value)  # ... but not the key
    assert server.count == 1  # neither retried nor followed by the other pairs


def test_missing_key_names_the_variable_and_sends_nothing(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    judge = make_judge(server)
    with pytest.raises(ApiJudgeError, match=KEY_ENV):
        judge.judge(*pairs(2)[:3])
    assert server.count == 0


def test_no_authorization_for_a_server_without_keys(server):
    judge = make_judge(server, api_key_env=None)
    prompts, first, second, expected = pairs(2)
    assert judge.judge(prompts, first, second) == expected
    assert all(r["auth"] is None for r in server.received)


@pytest.mark.parametrize("suffix", [".sqlite", ".jsonl"])
def test_cache_makes_a_rerun_free_and_never_holds_the_key(server, tmp_path, suffix):
    cache = tmp_path / f"judge_cache{suffix}"
    prompts, first, second, expected = pairs(6)
    prompts[1] = "GARBAGE here"
    expected[1] = "unparsed"
    assert make_judge(server, cache_path=str(cache)).judge(prompts, first, second) == expected
    assert server.count == 6

    rerun = make_judge(server, cache_path=str(cache))
    assert rerun.judge(prompts, first, second) == expected
    assert server.count == 6  # zero new requests
    stats = rerun.stats
    assert (stats.requests, stats.cache_hits, stats.unparsed) == (0, 6, 1)
    assert SECRET.encode() not in cache.read_bytes()

    # Another judge model is another key: nothing is reused.
    make_judge(server, cache_path=str(cache), model="other-model").judge(prompts, first, second)
    assert server.count == 12


def test_a_rerun_from_cache_needs_no_key(server, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache.sqlite")
    prompts, first, second, expected = pairs(3)
    make_judge(server, cache_path=cache).judge(prompts, first, second)
    monkeypatch.delenv(KEY_ENV)
    assert make_judge(server, cache_path=cache).judge(prompts, first, second) == expected


def test_request_cap_raises_and_a_rerun_continues_from_cache(server, tmp_path):
    cache = str(tmp_path / "cache.sqlite")
    prompts, first, second, expected = pairs(8)
    with pytest.raises(BudgetExceeded) as caught:
        make_judge(server, cache_path=cache, max_requests=3, max_concurrency=2).judge(prompts, first, second)
    exc = caught.value
    assert (exc.requests, exc.judged, exc.total) == (3, 3, 8)
    assert "3 requests" in str(exc) and "3 of 8" in str(exc) and SECRET not in str(exc)
    assert server.count == 3
    assert sum(v is None for v in exc.verdicts) == 5
    assert all(v == e for v, e in zip(exc.verdicts, expected) if v is not None)

    rerun = make_judge(server, cache_path=cache)
    assert rerun.judge(prompts, first, second) == expected
    assert server.count == 8  # only the five that were missing
    assert (rerun.stats.cache_hits, rerun.stats.requests) == (3, 5)


def test_cost_cap_raises_with_the_spend(server):
    # 100 input + 10 output tokens at $0.01 / $0.03 per 1k: $0.0013 a request; the cap is passed on the 4th.
    judge = make_judge(
        server, max_concurrency=1, price_per_1k_input_tokens=0.01, price_per_1k_output_tokens=0.03, max_cost_usd=0.005
    )
    with pytest.raises(BudgetExceeded) as caught:
        judge.judge(*pairs(8)[:3])
    assert server.count == 4
    assert caught.value.cost_usd == pytest.approx(0.0052)
    assert judge.stats.cost_usd == pytest.approx(0.0052)


def test_cost_cap_without_usage_stops_after_caching_the_reply(server, tmp_path):
    server.usage = None
    cache = str(tmp_path / "cache.jsonl")
    judge = make_judge(
        server,
        max_concurrency=1,
        cache_path=cache,
        price_per_1k_input_tokens=0.01,
        price_per_1k_output_tokens=0.03,
        max_cost_usd=1.0,
    )
    prompts, first, second, expected = pairs(3)
    with pytest.raises(ApiJudgeError, match="usage"):
        judge.judge(prompts, first, second)
    assert server.count == 1
    assert make_judge(server, cache_path=cache).judge(prompts[:1], first[:1], second[:1]) == expected[:1]
    assert server.count == 1


def test_concurrency_never_exceeds_the_bound(server):
    server.delay_s = 0.05
    judge = make_judge(server, max_concurrency=3)
    prompts, first, second, expected = pairs(24)
    assert judge.judge(prompts, first, second) == expected
    assert 2 <= server.max_in_flight <= 3


def test_identical_pairs_are_asked_once(server):
    judge = make_judge(server)
    assert judge.judge(["q"] * 5, ["good a"] * 5, ["bad b"] * 5) == ["A"] * 5
    assert server.count == 1


def test_position_biased_server_scores_only_ties_in_both_orders(server):
    server.always = "Both are fine, but the first one reads better.\nPreferred: A"
    judge = make_judge(server)
    prompts, first, second, _ = pairs(6)
    result = judge_both_orders(judge, prompts, first, second)
    assert (result.wins, result.losses, result.ties, result.unparsed) == (0, 0, 6, 0)
    assert result.scores.tolist() == [0.5] * 6


def test_both_orders_credit_a_real_preference(server):
    judge = make_judge(server)
    n = 5
    result = judge_both_orders(
        judge, [f"q{i}" for i in range(n)], [f"good {i}" for i in range(n)], [f"bad {i}" for i in range(n)]
    )
    assert (result.wins, result.losses, result.ties) == (n, 0, 0)
    assert judge.stats.requests == 2 * n


def test_judge_survives_pickling(server):
    judge = pickle.loads(pickle.dumps(make_judge(server)))
    prompts, first, second, expected = pairs(2)
    assert judge.judge(prompts, first, second) == expected


@pytest.mark.parametrize(
    "text, verdict",
    [
        ("Preferred: A", "A"),
        ("preferred: b", "B"),
        ("  PREFERRED :  Tie  ", "tie"),
        ("Summary A misses the point.\n\n**Preferred:** B", "B"),
        ("Reply B is vaguer.\nPreferred: **A**.", "A"),
        ("## Preferred: `B`", "B"),
        ("Preferred: Response A", "A"),
        ("Preferred answer - B", "B"),
        ("Final verdict: Preferred: tie", "tie"),
        ("Preferred: A\n(on reflection)\nPreferred: B", "B"),  # the last verdict line counts
        ("B", "B"),
        ("**A**", "A"),
        ("Preferred: A or B", "unparsed"),  # ambiguous
        ("I would have preferred a shorter summary.", "unparsed"),
        ("Both are good.", "unparsed"),
        ("", "unparsed"),
        (None, "unparsed"),
        ("Preferred: C", "unparsed"),
        ("\x00\xff garbage \u2603", "unparsed"),
    ],
)
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_builtin_prompts_hold_the_texts_and_the_answer_format():
    for task, template in PROMPT_TEMPLATES.items():
        text = render_prompt(template, "THE POST", "FIRST TEXT", "SECOND TEXT")
        assert "THE POST" in text and "FIRST TEXT" in text and "SECOND TEXT" in text
        assert "Preferred: A" in text and "Preferred: B" in text and "Tie" in text
        assert text.index("FIRST TEXT") < text.index("SECOND TEXT")
        for verdict in ("text", "logprobs"):  # both read a "Preferred: X" line
            assert ApiJudgeConfig(base_url="http://x/v1", model="m", task=task, verdict=verdict).template == template
        json_prompt = ApiJudgeConfig(base_url="http://x/v1", model="m", task=task).template
        assert json_prompt.startswith(template.split("Start with")[0]) and '"preferred"' in json_prompt
        assert "Preferred: A" not in json_prompt
    assert "summar" in PROMPT_TEMPLATES["summarization"] and "helpful" in PROMPT_TEMPLATES["dialogue"]
    # Braces inside the texts are left as they are; placeholders inside them are not filled again.
    assert render_prompt("{prompt}|{first}|{second}", "{first}", "{x}", "}{") == "{first}|{x}|}{"


def test_config_errors_and_make_api_judge():
    with pytest.raises(ValueError, match="task"):
        ApiJudgeConfig(base_url="http://x/v1", model="m", task="poetry")
    with pytest.raises(ValueError, match=r"\{second\}"):
        ApiJudgeConfig(base_url="http://x/v1", model="m", prompt_template="{prompt} {first}")
    with pytest.raises(ValueError, match="max_cost_usd"):
        ApiJudgeConfig(base_url="http://x/v1", model="m", max_cost_usd=1.0)
    with pytest.raises(ValueError, match="max_concurrency"):
        ApiJudgeConfig(base_url="http://x/v1", model="m", max_concurrency=0)
    with pytest.raises(ValueError, match="verdict: 'regex' is not one of json, logprobs, text"):
        ApiJudgeConfig(base_url="http://x/v1", model="m", verdict="regex")
    with pytest.raises(ValueError, match=r"evaluate\.judge_api\.modle: unknown key"):
        make_api_judge({"base_url": "http://x/v1", "modle": "m"})
    with pytest.raises(ValueError, match=r"evaluate\.judge_api\.backoff_base_s: removed; the openai client's own"):
        make_api_judge({"base_url": "http://x/v1", "model": "m", "backoff_base_s": 1.0})
    judge = make_api_judge(
        {"base_url": "http://x/v1", "model": "gpt-4o", "task": "summarization"},
        default_cache_path="/runs/r/judge_cache.sqlite",
    )
    assert judge.name == "api:gpt-4o" and judge.config.max_concurrency == 8 and judge.config.verdict == "json"
    assert judge.config.cache_path == "/runs/r/judge_cache.sqlite"  # the stage's default ...
    assert (
        make_api_judge(
            {"base_url": "http://x/v1", "model": "m", "cache_path": None},
            default_cache_path="/runs/r/judge_cache.sqlite",
        ).config.cache_path
        is None
    )  # ... unless off
    assert SECRET not in repr(judge.config)
