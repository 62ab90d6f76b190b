"""GPU shares and autoscaling, verified without GPUs: Ray is started with two logical GPUs, the pools ask for
1.0 / 0.5 / 0.25 GPU per replica in the Serve config, and load on the INT4 pool scales it up and back down. The
pools run the fake engine (tests/fake_engine.py, a token every 2 ms): placement and autoscaling are Serve's."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import httpx
import pytest

from tests.serving import engine_stats_by_replica, local_config, replicas, running, wait_for

pytestmark = pytest.mark.slow
APP = "chatglm2"
SHARES = {"chatglm2-6b": 1.0, "chatglm2-6b-int8": 0.5, "chatglm2-6b-int4": 0.25}


def gpu_config(checkpoint):
    config = local_config(checkpoint, fake_engine={"token_delay_s": 0.002},
                          engine={"max_batch_size": 2, "max_seq_len": 2048, "max_waiting": 64})
    for deployment in config["applications"][0]["deployments"]:
        name = deployment["name"]
        if name not in SHARES:
            continue
        deployment["ray_actor_options"] = {"num_cpus": 0.1, "num_gpus": SHARES[name]}
        deployment.pop("autoscaling_config")
        deployment["num_replicas"] = 1
        if name == "chatglm2-6b-int4":
            # Up to 3 replicas: the third cannot get a quarter GPU (1.0 + 0.5 + 0.25 * 2 = 2.0 GPUs taken).
            del deployment["num_replicas"]
            deployment["autoscaling_config"] = {
                "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1, "metrics_interval_s": 0.5,
                "look_back_period_s": 1, "upscale_delay_s": 0.5, "downscale_delay_s": 3,
            }
    return config


@pytest.fixture(scope="module")
def base_url(tiny_checkpoint):
    with running(gpu_config(tiny_checkpoint), num_cpus=8, num_gpus=2) as (url, _):
        yield url


def gpus_by_replica(pool: str, calls: int = 12) -> dict[str, list[str]]:
    return {replica: stats.gpu_ids for replica, stats in engine_stats_by_replica(pool, APP, calls).items()}


def test_replicas_are_packed_by_their_fractions(base_url):
    import ray

    placed = {pool: gpus_by_replica(pool) for pool in SHARES}
    (fp16_gpus,) = placed["chatglm2-6b"].values()
    (int8_gpus,) = placed["chatglm2-6b-int8"].values()
    (int4_gpus,) = placed["chatglm2-6b-int4"].values()
    assert len(fp16_gpus) == len(int8_gpus) == len(int4_gpus) == 1
    # The full-GPU replica has a GPU to itself; the half and the quarter share the other one.
    assert fp16_gpus != int8_gpus and int8_gpus == int4_gpus
    assert ray.available_resources().get("GPU", 0) == pytest.approx(0.25)


def test_load_scales_the_int4_pool_up_then_down_and_a_replica_that_does_not_fit_waits(base_url):
    from ray import serve

    stop = threading.Event()
    outcomes: dict[int, int] = defaultdict(int)

    def client():
        body = {"model": "chatglm2-6b-int4", "messages": [{"role": "user", "content": "你好"}],
                "temperature": 0, "max_tokens": 400, "stream": True}
        while not stop.is_set():
            with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=120) as response:
                for _ in response.iter_lines():
                    pass
                outcomes[response.status_code] += 1

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: replicas(APP, "chatglm2-6b-int4") == 2, 90, "the int4 pool to scale up to 2 replicas")

        def third_waits() -> bool:
            states = serve.status().applications[APP].deployments["chatglm2-6b-int4"].replica_states
            return sum(states.values()) == 3 and states.get("RUNNING", 0) == 2

        wait_for(third_waits, 60, "a third int4 replica waiting for a GPU share")
        time.sleep(2)
        # The app keeps serving every pool while a replica waits for resources.
        assert serve.status().applications[APP].status == "RUNNING"
        for pool in SHARES:
            reply = httpx.post(f"{base_url}/v1/chat/completions", timeout=60,
                               json={"model": pool, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            assert reply.status_code == 200, reply.text
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert set(outcomes) == {200} and sum(outcomes.values()) > 0
    wait_for(lambda: replicas(APP, "chatglm2-6b-int4") == 1
             and sum(serve.status().applications[APP].deployments["chatglm2-6b-int4"].replica_states.values()) == 1,
             90, "the int4 pool to scale back down to 1 replica")
