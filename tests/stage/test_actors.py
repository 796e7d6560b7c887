"""ActorJobs on a local Ray: jobs run side by side up to the cap, each actor dies when its own work is
done, results come back by name, and a failure surfaces with no actor left behind. And where sampler actors
sit: a tensor-parallel vLLM sampler's placement group, checked with logical GPUs (no device is used)."""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from pathlib import Path

import pytest
import ray

from pipeline.config import load_config
from pipeline.runtime.actors import ActorJobError, ActorJobs, actor_options
from pipeline.runtime.resources import ResourceError, check_resources
from pipeline.runtime.sampler import sampler_placement, start_placed, stop_sampler
from pipeline.stages.evaluate import evaluate_requests


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    # Logical GPUs: Ray schedules them like real ones, and nothing here touches a device.
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0.25)
class Worker:
    def work(self, seconds: float, value):
        time.sleep(seconds)
        return value

    def meet(self, folder: str, name: str, partner: str | None) -> tuple[str, int, bool]:
        """Mark this call started in `folder` and count the calls running now (this one included); then wait
        until `partner`'s call has counted too (at most 60 s: a guard that only ends a hung test) and mark this
        one finished. Returns (name, calls running on arrival, whether the partner's call was seen)."""
        here = Path(folder)
        (here / f"{name}.started").touch()
        running = len(list(here.glob("*.started"))) - len(list(here.glob("*.finished")))
        (here / f"{name}.counted").touch()
        deadline = time.monotonic() + 60
        while partner and not (here / f"{partner}.counted").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        (here / f"{name}.finished").touch()
        return name, running, not partner or (here / f"{partner}.counted").exists()

    def fail(self):
        raise RuntimeError("this model does not load")


def job(seconds: float, value, started: list | None = None):
    def start():
        actor = Worker.remote()
        if started is not None:
            started.append(actor)
        return actor

    return start, lambda actor: [actor.work.remote(seconds, value), actor.work.remote(0.0, value + "!")]


def test_jobs_run_side_by_side_up_to_the_cap_and_return_by_name(caplog, tmp_path):
    started = []

    def meeting(name: str, partner: str | None):
        """A job whose first call meets `partner`'s: neither ends until both have started."""

        def start():
            started.append(Worker.remote())
            return started[-1]

        return start, lambda actor: [
            actor.meet.remote(str(tmp_path), name, partner),
            actor.work.remote(0.0, name + "!"),
        ]

    caplog.set_level(logging.INFO, logger="pipeline.runtime.actors")
    with ActorJobs(max_actors=2, label="evaluate") as jobs:
        for name, partner in [("a", "b"), ("b", "a"), ("c", None), ("d", None)]:
            jobs.submit(name, *meeting(name, partner))
        assert len(started) == 2  # the others wait for a slot
        results = jobs.wait_for(["d", "a"])
        assert list(results) == ["d", "a"]
        assert jobs.wait_for("bc")["c"][1] == "c!"
        results |= jobs.wait_for("bc")
    assert {n: [results[n][0][0], results[n][1]] for n in results} == {n: [n, n + "!"] for n in "abcd"}
    assert len(started) == 4
    # Each job's end is logged as it happens, with the counts a person watching needs.
    assert re.search(r"evaluate: [ab] done \(1 of 4 jobs done, 2 running, 1 waiting\)", caplog.text)
    assert "of 4 jobs done, 0 running, 0 waiting)" in caplog.text
    # Side by side: a's and b's calls met, each waiting for the other. Never more than the cap: no call
    # found more than two running when it started, and the second of a and b found two.
    assert results["a"][0][2] and results["b"][0][2]
    assert max(running for _, running, _ in (results[n][0] for n in "abcd")) == 2
    for actor in started:  # each killed once its calls were done
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.work.remote(0.0, "x"), timeout=30)


def test_a_failing_job_surfaces_and_no_actor_outlives_the_block():
    started = []
    with ActorJobs(max_actors=3) as jobs:
        jobs.submit("slow", *job(30.0, "slow", started))
        bad = lambda: started.append(Worker.remote()) or started[-1]
        jobs.submit("bad", bad, lambda actor: [actor.fail.remote()])
        with pytest.raises(RuntimeError, match="this model does not load"):
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


def test_a_tensor_parallel_sampler_holds_a_placement_group_of_gpu_bundles():
    class PlacementProbe:  # defined here, so that Ray ships it by value to the worker
        """Stands where a tensor-parallel vLLM sampler stands, and reports what vLLM would find there."""

        def where(self) -> dict:
            group = ray.util.get_current_placement_group()
            return {"bundles": group.bundle_specs if group else None, "gpus": ray.get_gpu_ids()}

        def start_workers(self, n: int) -> list:
            """What vLLM's Ray executor does from inside the actor: one one-GPU worker per bundle."""
            gpu_worker = ray.remote(num_gpus=1, num_cpus=0)(lambda: ray.get_gpu_ids())
            return ray.get([gpu_worker.remote() for _ in range(n)], timeout=60)

    placement = sampler_placement("vllm", use_gpu=True, gpus=2)
    assert placement.bundles == [{"GPU": 1.0, "CPU": 1.0}] * 2 and placement.num_gpus == 0
    assert placement.total == {"CPU": 2.0, "GPU": 2.0}
    actor = start_placed(PlacementProbe, placement)
    try:
        where = ray.get(actor.where.remote(), timeout=60)
        assert where["bundles"] == placement.bundles and where["gpus"] == []  # the actor holds no GPU itself
        assert ray.available_resources().get("GPU", 0.0) == 0.0  # both are the group's
        # Started from inside the actor, workers land in the group: both GPUs, one each.
        assert sorted(g for ids in ray.get(actor.start_workers.remote(2), timeout=90) for g in ids) == [0, 1]
    finally:
        stop_sampler(actor)
    deadline = time.monotonic() + 30
    while ray.available_resources().get("GPU", 0.0) < 2.0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("GPU", 0.0) == 2.0  # stop_sampler removed the group


def test_sampler_placement_per_engine_and_device():
    assert (sampler_placement("hf", use_gpu=False).total, sampler_placement("hf", use_gpu=True).total) == (
        {"CPU": 1, "GPU": 0},
        {"CPU": 1, "GPU": 1},
    )
    on_cpu = sampler_placement("vllm", use_gpu=False)
    assert on_cpu.total == {"CPU": 2, "GPU": 0} and on_cpu.env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert sampler_placement("vllm", use_gpu=True).total == {"CPU": 1, "GPU": 1}
    assert sampler_placement("auto", use_gpu=False).engine == "hf"  # vLLM is not the faster one on the CPU
    # Several GPUs: transformers holds them in the actor (layers spread over them); GPUs mean nothing on the CPU.
    assert sampler_placement("hf", use_gpu=True, gpus=2).total == {"CPU": 1, "GPU": 2}
    assert sampler_placement("vllm", use_gpu=False, gpus=2).total == {"CPU": 2, "GPU": 0}


def test_evaluate_asks_for_its_samplers_gpus_on_one_node():
    ev = ["evaluate.engine=vllm", "evaluate.use_gpu=true"]
    check_resources(evaluate_requests(load_config(None, [*ev, "evaluate.gpus_per_actor=2"])))
    with pytest.raises(
        ResourceError, match=r"evaluate\.gpus_per_actor asks for 4 GPUs per actor but this cluster has 2 GPUs"
    ):
        check_resources(evaluate_requests(load_config(None, [*ev, "evaluate.gpus_per_actor=4"])))
    # On the CPU a vLLM sampler holds 2 CPUs: its engine core's and its worker's.
    assert [r.bundle for r in evaluate_requests(load_config(None, ["evaluate.engine=vllm"]))] == [{"CPU": 2.0}]


@ray.remote(num_cpus=0.25)
class Noted:
    """Each call leaves a file `<name>.<pid>` when it starts: a call redone after a restart leaves two."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def work(self, name: str, seconds: float) -> str:
        (self.folder / f"{name}.{os.getpid()}").touch()
        time.sleep(seconds)
        return name

    def die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_actor_is_restarted_and_redoes_only_its_call_in_flight(tmp_path):
    def start():
        return Noted.options(**actor_options(2)).remote(str(tmp_path))

    with ActorJobs(max_actors=2) as jobs:
        jobs.submit("hurt", start, lambda a: [a.work.remote("first", 0.0), a.work.remote("second", 3.0)])
        jobs.submit("other", start, lambda a: [a.work.remote("other", 1.0)])
        # A liveness bound, not a speed check: two actors start in seconds when the machine is quiet, but
        # under other jobs' load (a load average of 50 on 2 cores) they took over a minute.
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob("second.*")):
            assert time.monotonic() < deadline, "the second call never started"
            time.sleep(0.02)
        (in_flight,) = tmp_path.glob("second.*")
        os.kill(int(in_flight.suffix[1:]), signal.SIGKILL)
        results = jobs.wait_for(["hurt", "other"])
    assert results == {"hurt": ["first", "second"], "other": ["other"]}
    calls = sorted(p.stem for p in tmp_path.iterdir())
    assert calls == ["first", "other", "second", "second"]  # only the killed call ran twice


def test_a_call_that_always_kills_its_actor_fails_its_job_by_name(tmp_path):
    with ActorJobs(max_actors=1) as jobs:
        jobs.submit(
            "poison", lambda: Noted.options(**actor_options(1)).remote(str(tmp_path)), lambda a: [a.die.remote()]
        )
        with pytest.raises(ActorJobError, match="job 'poison': its actor died and could not be restarted again"):
            jobs.wait_for(["poison"])
