"""Verdicts that do not hang on a regex alone: a JSON verdict, the answer labels' log-probs, the regex as
fallback; against the loopback server of tests/helpers/fake_chat_server.py where the server's side matters."""

import logging
import math
import sqlite3

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.evaluation.api_judge import ApiJudgeConfig, label_logprobs, read_verdict
from pipeline.evaluation.api_judge.cache import Reply, SqliteCache
from pipeline.evaluation.judgments import JudgeProgress
from pipeline.evaluation.plugins import make_judge as make_judge_from
from pipeline.runtime.storage import RunDir
from tests.helpers.fake_chat_server import make_judge, pairs

pytestmark = pytest.mark.usefixtures("api_key")


def tokens(*pieces, alternatives=None):
    """A reply as the API's logprobs.content gives it: (token, top alternatives) per position."""
    alternatives = alternatives or {}
    return [(t, alternatives.get(i, [(t, 0.0)])) for i, t in enumerate(pieces)]


def test_label_logprobs_are_read_where_the_verdict_is_written():
    # OpenAI's tokenizer splits "**Preferred:** B" roughly like this; the alternatives sit at " B".
    reply = tokens(
        "Summary",
        " A",
        " misses",
        " the",
        " point",
        ".\n",
        "**",
        "Pre",
        "ferred",
        ":**",
        " B",
        alternatives={
            10: [
                (" B", math.log(0.7)),
                (" A", math.log(0.2)),
                ("B", math.log(0.05)),
                (" Tie", math.log(0.03)),
                (" The", math.log(0.02)),
            ]
        },
    )
    probs = {label: math.exp(lp) for label, lp in label_logprobs(reply).items()}
    assert probs == pytest.approx({"B": 0.75, "A": 0.2, "tie": 0.03})  # " B" and "B" are one label
    # " A" in the first sentence is a label token, but no verdict: "Summary" precedes it, not "Preferred:".
    assert read_verdict("", label_logprobs(reply), "logprobs").verdict == "B"


def test_the_last_verdict_counts_and_a_reply_without_one_has_no_label_logprobs():
    first, second = [(" A", -0.1), (" B", -2.3)], [(" B", -0.2), (" A", -1.7)]
    reply = tokens(
        "Preferred",
        ":",
        " A",
        "\n",
        "On",
        " reflection",
        ",",
        " Preferred",
        ":",
        " B",
        alternatives={2: first, 9: second},
    )
    assert label_logprobs(reply) == {"B": pytest.approx(-0.2), "A": pytest.approx(-1.7)}
    assert label_logprobs(tokens("B", "'s", " summary", " is", " better")) is None  # starts with B, no verdict
    assert label_logprobs(tokens("**", "Tie", "**", alternatives={1: [("Tie", -0.05), ("A", -3.0)]})) == {
        "tie": pytest.approx(-0.05),
        "A": pytest.approx(-3.0),
    }  # a reply that is only a label
    assert label_logprobs([]) is None


@pytest.mark.parametrize(
    "text, mode, verdict, source",
    [
        ('{"comparison": "B is clearer.", "preferred": "B"}', "json", "B", "json"),
        ('```json\n{"comparison": "Even.", "preferred": "tie"}\n```', "json", "tie", "json"),  # fenced
        ("Text A is better.\nPreferred: A", "json", "A", "regex"),  # a server without structured output
        ('{"comparison": "?", "preferred": "C"}', "json", "unparsed", "regex"),
        ("Both are fine.", "json", "unparsed", "regex"),
        ("Preferred: B", "logprobs", "B", "regex"),  # no log-probs came back
        ('{"preferred": "A"}', "text", "unparsed", "regex"),  # text mode never reads JSON
    ],
)
def test_read_verdict_falls_back_to_the_regex(text, mode, verdict, source):
    read = read_verdict(text, None, mode)
    assert (read.verdict, read.source) == (verdict, source)


def test_json_verdicts_are_asked_for_and_read_from_the_field(server):
    judge = make_judge(server)  # verdict: json, the default
    prompts, first, second, expected = pairs(6)
    prompts[3] = prompts[3].replace("question", "equal")
    first[3], second[3] = "good one", "good two"
    expected[3] = "tie"
    assert judge.judge(prompts, first, second) == expected
    body = server.received[0]["body"]
    assert body["response_format"]["type"] == "json_schema" and "logprobs" not in body
    assert (judge.stats.fallbacks, judge.stats.unparsed) == (0, 0)


def test_json_mode_against_a_server_without_structured_output_falls_back_and_counts(server):
    server.structured = False
    judge = make_judge(server)
    prompts, first, second, expected = pairs(4)
    assert judge.judge(prompts, first, second) == expected  # read by the regex instead
    assert (judge.stats.fallbacks, judge.stats.unparsed) == (4, 0)


def test_logprob_verdicts_decide_where_the_text_is_ambiguous_and_come_back_from_the_cache(server, tmp_path):
    cache = str(tmp_path / "cache.sqlite")
    # A verdict line that names a second label is ambiguous to the regex, not to the log-probs.
    server.suffix = " (though the other comes close: B or A)"
    prompts, first, second, expected = pairs(4)
    assert make_judge(server, verdict="text").judge(prompts, first, second) == ["unparsed"] * 4
    judge = make_judge(server, verdict="logprobs", cache_path=cache)
    assert judge.judge(prompts, first, second) == expected
    body = server.received[-1]["body"]
    assert body["logprobs"] is True and body["top_logprobs"] == 5 and "response_format" not in body
    assert (judge.stats.fallbacks, judge.stats.unparsed) == (0, 0)

    rerun = make_judge(server, verdict="logprobs", cache_path=cache)
    server.structured = False  # a request now would get no log-probs: the verdicts below come from the cache
    assert rerun.judge(prompts, first, second) == expected
    assert (rerun.stats.requests, rerun.stats.cache_hits, rerun.stats.fallbacks) == (0, 4, 0)
    # Without log-probs the text is all there is: the same ambiguous replies, now counted as fallbacks.
    fresh = make_judge(server, verdict="logprobs")
    assert fresh.judge(prompts, first, second) == ["unparsed"] * 4
    assert (fresh.stats.fallbacks, fresh.stats.unparsed) == (4, 4)


def test_a_sqlite_cache_of_another_version_is_refused_naming_the_file(tmp_path):
    """A cache whose table lacks a column this code writes is not patched up in place: the user is told
    to delete it (its pairs are then judged again), as run directories of other versions are refused."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE replies (key TEXT PRIMARY KEY, model TEXT NOT NULL, text TEXT NOT NULL, "
        "input_tokens INTEGER, output_tokens INTEGER, created REAL NOT NULL)"
    )
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match=f"{path}: a judge cache written by another version of raydpo; delete it"):
        SqliteCache(str(path))
    cache = SqliteCache(str(tmp_path / "new.sqlite"))
    cache.put("k2", "m", Reply("x", None, None, {"A": -0.1}))
    assert cache.get("k2").label_logprobs == {"A": -0.1}
    cache.close()


def test_judge_progress_counts_every_verdict(server, caplog):
    judge = JudgeProgress(make_judge(server), total=8)
    prompts, first, second, expected = pairs(4)
    with caplog.at_level(logging.INFO, logger="pipeline.evaluation.judgments"):
        assert judge.judge(prompts, first, second) == expected
        judge.judge(prompts, second, first)
    assert "judged 4 of 8 (api:judge-model); 4 requests, 0 from the cache, 0 unparsed" in caplog.text
    assert "judged 8 of 8" in caplog.text and judge.name == "api:judge-model"


def test_judge_progress_logs_about_ten_lines_however_many_batches(caplog):
    class Agrees:
        name = "agrees"

        def judge(self, prompts, first, second):
            return ["A"] * len(prompts)

    judge = JudgeProgress(Agrees(), total=200)
    with caplog.at_level(logging.INFO, logger="pipeline.evaluation.judgments"):
        for _ in range(100):
            judge.judge(["p", "q"], ["a", "b"], ["c", "d"])
    lines = [r.getMessage() for r in caplog.records if "judged" in r.getMessage()]
    assert len(lines) == 10 and lines[0].startswith("evaluate: judged 20 of 200") and "200 of 200" in lines[-1]


def test_a_remote_run_dirs_file_is_fetched_and_written_back(tmp_path):
    remote = RunDir(f"file://{tmp_path}/run")  # a URI: taken down to a local copy and back, as on S3
    with remote.local_file("judge_cache.sqlite") as path:
        assert not path.startswith(str(tmp_path / "run"))
        cache = SqliteCache(path)
        cache.put("k", "m", Reply("Preferred: A", 1, 1))
        cache.close()
    assert (tmp_path / "run" / "judge_cache.sqlite").exists()
    with remote.local_file("judge_cache.sqlite") as path:
        assert SqliteCache(path).get("k").text == "Preferred: A"  # fetched again
    local = RunDir(str(tmp_path / "here"))
    with local.local_file("sub/judge_cache.jsonl") as path:
        assert path == str(tmp_path / "here" / "sub" / "judge_cache.jsonl")


def test_the_verdict_key_loads_from_a_config():
    config = load_config(
        None,
        ["evaluate.judge=api", "evaluate.judge_api={base_url: 'http://127.0.0.1:9/v1', model: m, verdict: logprobs}"],
    )
    judge = make_judge_from(config.evaluate, api_cache_path="/runs/x/judge_cache.sqlite")
    assert (judge.config.verdict, judge.config.cache_path) == ("logprobs", "/runs/x/judge_cache.sqlite")
    assert ApiJudgeConfig(base_url="http://x/v1", model="m").verdict == "json"
