"""ActorJobs on a local Ray: jobs run side by side up to the cap, each actor dies when its own work is
done, results come back by name, and a failure surfaces with no actor left behind."""

from __future__ import annotations

import logging
import re
import time

import pytest
import ray

from pipeline.runtime.actors import ActorJobs

pytestmark = pytest.mark.stage


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # a new local Ray, never one `ray start` left
    yield
    ray.shutdown()


@ray.remote(num_cpus=0.25)
class Worker:
    def work(self, seconds: float, value):
        t0 = time.time()
        time.sleep(seconds)
        return value, t0, time.time()

    def fail(self):
        raise RuntimeError("this model does not load")


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(t0, 1) for t0, _ in intervals] + [(t1, -1) for _, t1 in intervals])
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def job(seconds: float, value, started: list | None = None):
    def start():
        actor = Worker.remote()
        if started is not None:
            started.append(actor)
        return actor

    return start, lambda actor: [actor.work.remote(seconds, value), actor.work.remote(0.0, value + "!")]


def test_jobs_run_side_by_side_up_to_the_cap_and_return_by_name(caplog):
    started = []
    caplog.set_level(logging.INFO, logger="pipeline.runtime.actors")
    with ActorJobs(max_actors=2, label="evaluate") as jobs:
        for name in "abcd":
            jobs.submit(name, *job(1.5, name, started))
        assert len(started) == 2  # the others wait for a slot
        results = jobs.wait_for(["d", "a"])
        assert list(results) == ["d", "a"]
        assert jobs.wait_for("bc")["c"][1][0] == "c!"
    assert {n: [r[0] for r in results[n]] for n in results} == {"d": ["d", "d!"], "a": ["a", "a!"]}
    assert len(started) == 4
    # Each job's end is logged as it happens, with the counts a person watching needs.
    assert re.search(r"evaluate: [ab] done \(1 of 4 jobs done, 2 running, 1 waiting\)", caplog.text)
    assert "of 4 jobs done, 0 running, 0 waiting)" in caplog.text
    spans = [(r[0][1], r[0][2]) for r in (results["a"], results["d"])] + \
            [(r[0][1], r[0][2]) for r in jobs.wait_for("bc").values()]
    assert most_at_once(spans) == 2  # side by side, never more than the cap
    for actor in started:  # each killed once its calls were done
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.work.remote(0.0, "x"), timeout=30)


def test_a_failing_job_surfaces_and_no_actor_outlives_the_block():
    started = []
    with pytest.raises(RuntimeError, match="this model does not load"):
        with ActorJobs(max_actors=3) as jobs:
            jobs.submit("slow", *job(30.0, "slow", started))
            bad = lambda: started.append(Worker.remote()) or started[-1]  # noqa: E731
            jobs.submit("bad", bad, lambda actor: [actor.fail.remote()])
            jobs.wait_for(["slow", "bad"])
    for actor in started:  # the slow one too: killed on the way out, not left sleeping
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.work.remote(0.0, "x"), timeout=30)


def test_names_are_checked():
    with ActorJobs(max_actors=1) as jobs:
        jobs.submit("a", *job(0.0, "a"))
        with pytest.raises(ValueError, match="submitted already"):
            jobs.submit("a", *job(0.0, "a"))
        with pytest.raises(KeyError, match="no job named 'b'"):
            jobs.wait_for(["b"])
    with pytest.raises(ValueError, match="at least 1"):
        ActorJobs(max_actors=0)
