"""check_resources on a local Ray (a fixed cluster of 2 CPUs, no GPU): impossible requests fail at once,
naming the resource and the config key, without asking the autoscaler for anything; a request the cluster
can hold passes."""

from __future__ import annotations

import pytest

import pipeline.runtime.resources as resources
from pipeline.config import load_config
from pipeline.runtime.resources import AUTOSCALING_ENV, ResourceError, check_resources
from pipeline.stages import cluster_requests


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)  # new, light: the check needs no dashboard
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def fixed_cluster(monkeypatch):
    # The local Ray is a fixed cluster; make sure a developer's shell setting cannot turn on waiting.
    monkeypatch.delenv(AUTOSCALING_ENV, raising=False)


def config(*overrides: str):
    return load_config(None, list(overrides))


def autoscaler_requests(monkeypatch) -> list:
    """The bundles of every `request_resources` call check_resources makes (each passed on to Ray's): waiting
    for nodes always starts by asking the autoscaler for them, and ends by clearing the request ([])."""
    asked, ask = [], resources.request_resources

    def record(*, bundles):
        asked.append(bundles)
        return ask(bundles=bundles)

    monkeypatch.setattr(resources, "request_resources", record)
    return asked


def test_gpu_request_on_a_cpu_only_cluster_fails_fast_naming_gpu(monkeypatch, caplog):
    asked = autoscaler_requests(monkeypatch)
    with caplog.at_level("INFO", logger="pipeline.runtime.resources"), pytest.raises(ResourceError) as err:
        check_resources(cluster_requests(config("score.use_gpu=true")), wait_s=60)
    # A fixed cluster never waits: nothing asked of the autoscaler, no wait logged.
    assert asked == [] and "waiting for the autoscaler" not in caplog.text
    message = str(err.value)
    assert "score.use_gpu asks for 1 GPU per actor but this cluster has 0 GPUs" in message
    with pytest.raises(ResourceError, match=r"train\.use_gpu .*GPU"):
        check_resources(cluster_requests(config("train.use_gpu=true")))
    with pytest.raises(ResourceError, match=r"evaluate\.use_gpu .*GPU"):
        check_resources(cluster_requests(config("evaluate.use_gpu=true")))
    assert asked == []


def test_too_many_cpus_per_worker_fails_naming_cpu():
    with pytest.raises(ResourceError) as err:
        check_resources(cluster_requests(config("train.cpus_per_worker=4")))
    assert "train.cpus_per_worker asks for 4 CPUs per worker" in str(err.value)
    assert "CPU" in str(err.value)


def test_too_many_workers_in_all_fails_naming_the_count_and_cpu():
    # Each worker fits on the node, but three of 1 CPU do not fit on 2 CPUs at once.
    with pytest.raises(ResourceError) as err:
        check_resources(cluster_requests(config("train.num_workers=3", "train.cpus_per_worker=1")))
    message = str(err.value)
    assert "train.num_workers=3" in message and "CPU" in message and "fits 2" in message


def test_only_the_named_stages_are_checked():
    gpu_score = config("score.use_gpu=true")
    check_resources(cluster_requests(gpu_score, ("train", "evaluate")))  # score is not asked about
    with pytest.raises(ResourceError, match=r"score\.use_gpu"):
        check_resources(cluster_requests(gpu_score, ("score",)))


def test_a_satisfiable_config_passes():
    check_resources(cluster_requests(config()))  # defaults: 1 CPU per actor/worker, no GPU
    check_resources(cluster_requests(load_config("configs/demo_smoke.yaml")))
    check_resources(cluster_requests(config("score.num_actors=2", "train.num_workers=4", "train.cpus_per_worker=0.5")))


def test_requests_mirror_the_stage_modules():
    requests = {
        r.stage: r
        for r in cluster_requests(
            config(
                "score.use_gpu=true",
                "score.gpus_per_actor=0.5",
                "score.num_actors=3",
                "train.use_gpu=true",
                "train.num_workers=2",
                "train.cpus_per_worker=4",
            )
        )
    }
    assert (requests["score"].count, requests["score"].bundle) == (3, {"CPU": 1.0, "GPU": 0.5})
    assert (requests["train"].count, requests["train"].bundle) == (2, {"CPU": 4.0, "GPU": 1.0})
    assert (requests["evaluate"].count, requests["evaluate"].bundle) == (1, {"CPU": 1.0})


def test_an_autoscaling_cluster_waits_then_names_the_resource(monkeypatch, caplog):
    # RAYDPO_AUTOSCALING=1 on a cluster that reports no node groups: ask the autoscaler, wait, then fail.
    monkeypatch.setenv(AUTOSCALING_ENV, "1")
    asked = autoscaler_requests(monkeypatch)
    requests = cluster_requests(config("train.use_gpu=true"))
    with caplog.at_level("INFO", logger="pipeline.runtime.resources"), pytest.raises(ResourceError) as err:
        check_resources(requests, wait_s=1.5, poll_s=0.5)
    assert "train.use_gpu asks for 1 GPU per worker" in str(err.value)
    assert "autoscaler added no node that fits within 2 s" in str(err.value)
    # It waited for the train workers' GPUs: asked the autoscaler for them, logged the wait, and cleared the
    # request once it gave up, so that idle nodes may scale down.
    (train,) = [r for r in requests if r.stage == "train"]
    assert asked[-2:] == [[dict(train.bundle)] * train.count, []]
    assert "waiting for the autoscaler" in caplog.text
    before = len(asked)
    check_resources(cluster_requests(config()), wait_s=1.5)  # what is already here never waits:
    assert len(asked) == before  # nothing asked of the autoscaler
