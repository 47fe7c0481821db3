"""Canary and shadow releases (issue 13 item 3).

Without Ray: the judge's decisions on a clock the test drives, cohort buckets, and the router's
shadow path (the client's answer never waits for, or fails with, the mirrored call).

With Ray, under load, on one app: the image workload's candidate (a healthy version 2) is promoted
after one window — the registry's alias moves with its history record — and the click workload's
candidate (version 2, whose forward pass raises) is rolled back on its error rate. Both with no
failed request. Models are the workloads' real architectures with seeded random weights,
registered in a temporary registry: the release path is under test, not what the models learned.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import secrets
import threading
import time

import numpy as np
import pytest
import requests

from ray_app.config import ReleaseConfig, ServeConfig
from ray_app.serving.http import RequestError
from ray_app.serving.release import CANDIDATE, STABLE, ReleaseJudge, ReleaseRouter, answer_decision, choose_role, cohort_bucket

API_KEY = secrets.token_urlsafe(16)
AUTH = {"Authorization": f"Bearer {API_KEY}"}
IMAGE = ({"image_size": 28, "channels": 1, "width": 4}, {"classes": [str(i) for i in range(10)], "shape": [1, 28, 28]})
CTR_MANIFEST = {
    "classes": ["no_click", "click"],
    "transform": {"numeric_columns": ["age"], "categorical_columns": ["user"], "buckets": 16, "means": [0.0], "stds": [1.0]},
}
CTR = ({"numeric_columns": ["age"], "categorical_columns": ["user"], "buckets": 16}, CTR_MANIFEST)


# ---- the judge, on a clock the test drives -----------------------------------------------------
def _judge(**overrides) -> ReleaseJudge:
    cfg = ReleaseConfig(candidate="2", window_s=10, min_requests=10, max_error_rate_margin=0.05, **overrides)
    return ReleaseJudge(cfg, now=0.0)


def _traffic(judge: ReleaseJudge, at: float, stable: tuple[int, int, float], candidate: tuple[int, int, float]) -> None:
    """(requests, errors, latency ms) per role, observed at ``at``."""
    outcomes = []
    for role, (n, errors, latency) in ((STABLE, stable), (CANDIDATE, candidate)):
        outcomes += [(role, i >= errors, latency) for i in range(n)]
    judge.observe(outcomes, [], now=at)


def test_a_healthy_candidate_is_promoted_after_one_full_window_not_before():
    judge = _judge()
    assert judge.decide(30.0) is None  # a release with no traffic yet decides nothing
    _traffic(judge, 1.0, stable=(30, 0, 20.0), candidate=(30, 0, 22.0))
    assert judge.decide(5.0) is None  # healthy, but the window is not over
    _traffic(judge, 9.0, stable=(30, 0, 20.0), candidate=(30, 0, 22.0))
    assert judge.decide(10.5) is None  # the window counts from the candidate's first request (1.0)
    action, reason = judge.decide(11.0)
    assert action == "promote" and "held for 10 s" in reason


def test_too_few_candidate_requests_in_the_window_decide_nothing():
    judge = _judge()
    _traffic(judge, 1.0, stable=(100, 0, 20.0), candidate=(9, 9, 20.0))  # all failed, but 9 < min_requests
    assert judge.decide(20.0) is None
    _traffic(judge, 20.0, stable=(0, 0, 0), candidate=(5, 0, 20.0))  # the old ones left the window
    assert judge.decide(20.0) is None


def test_errors_over_the_margin_roll_back_and_the_margin_is_relative_to_stable():
    judge = _judge()
    _traffic(judge, 1.0, stable=(20, 2, 20.0), candidate=(20, 3, 20.0))  # 15% vs 10%: within 5 points
    assert judge.decide(2.0) is None
    _traffic(judge, 2.0, stable=(0, 0, 0), candidate=(20, 6, 20.0))  # candidate 9/40 = 22.5%
    action, reason = judge.decide(3.0)
    assert action == "rollback" and "error rate 22.5%" in reason and "stable's 10.0%" in reason


def test_a_slow_candidate_rolls_back_on_p99():
    judge = _judge(max_p99_margin_ratio=0.5, max_p99_margin_ms=50)
    _traffic(judge, 1.0, stable=(50, 0, 100.0), candidate=(50, 0, 180.0))  # limit 100 * 1.5 + 50 = 200
    assert judge.decide(2.0) is None
    _traffic(judge, 2.0, stable=(0, 0, 0), candidate=(10, 0, 900.0))
    action, reason = judge.decide(3.0)
    assert action == "rollback" and "p99" in reason


def test_a_decided_release_stays_decided():
    judge = _judge()
    judge.settle("rolled_back", "test", 1.0)
    _traffic(judge, 30.0, stable=(30, 0, 20.0), candidate=(30, 0, 20.0))
    assert judge.decide(40.0) is None
    assert choose_role(judge.cfg, judge.phase, {"x-ray-app-cohort": "canary"}) == STABLE


def test_shadow_mode_never_promotes():
    judge = _judge(mode="shadow")
    _traffic(judge, 9.0, stable=(30, 0, 20.0), candidate=(30, 0, 20.0))
    assert judge.decide(50.0) is None


def test_routing_by_header_cohort_and_share():
    cfg = ReleaseConfig(candidate="2", traffic_percent=25, cohort_header="x-user-id")
    assert choose_role(cfg, "canary", {"x-ray-app-cohort": "canary"}) == CANDIDATE
    assert choose_role(cfg, "canary", {"x-ray-app-cohort": "stable", "x-user-id": "u1"}) == STABLE
    users = [f"user-{i}" for i in range(4000)]
    first = [choose_role(cfg, "canary", {"x-user-id": u}) for u in users]
    assert first == [choose_role(cfg, "canary", {"x-user-id": u}) for u in users]  # sticky per user
    assert 0.22 < first.count(CANDIDATE) / len(users) < 0.28
    assert cohort_bucket("user-1") == cohort_bucket("user-1") and 0 <= cohort_bucket("x") < 100
    draws = iter([0.1, 0.3])  # without a cohort key: a draw against traffic_percent
    assert [choose_role(cfg, "canary", {}, lambda: next(draws)) for _ in range(2)] == [CANDIDATE, STABLE]


def test_answers_compare_by_what_they_decided():
    top = {"predictions": [{"label": "3", "probability": 0.6}, {"label": "5", "probability": 0.2}]}
    same_top = {"predictions": [{"label": "3", "probability": 0.4}, {"label": "8", "probability": 0.3}]}
    assert answer_decision(top) == answer_decision(same_top)
    assert answer_decision({"click_probability": [0.7, 0.2]}) != answer_decision({"click_probability": [0.4, 0.2]})
    assert answer_decision({"results": [{"label": "fresh", "score": 0.9}]}) == answer_decision(
        {"results": [{"label": "fresh", "score": 0.6}]}
    )


# ---- the router's shadow path, in-process -----------------------------------------------------
def _answer(label: str, version: int) -> dict:
    return {"status": 200, "body": {"model": {"version": version}, "predictions": [{"label": label, "probability": 0.9}]}}


def test_shadow_answers_come_from_stable_without_waiting_for_the_candidate():
    settings = ServeConfig(release={"candidate": "2", "mode": "shadow", "traffic_percent": 100})

    async def scenario() -> tuple[list[float], ReleaseRouter]:
        router = ReleaseRouter("image", settings, judge=None)
        labels = iter(["3", "4", "3", "3"])

        async def stable() -> dict:
            return _answer("3", 1)

        async def slow_candidate() -> dict:
            await asyncio.sleep(0.5)
            return _answer(next(labels), 2)

        async def broken_candidate() -> dict:
            raise RequestError(500, "candidate crashed")

        waits = []
        for candidate in (slow_candidate, slow_candidate, broken_candidate, slow_candidate, slow_candidate):
            started = time.perf_counter()
            answer = await router.predict({}, stable, candidate)
            waits.append(time.perf_counter() - started)
            assert answer == _answer("3", 1)
        await asyncio.sleep(0.8)  # the mirrored calls finish in the background
        return waits, router

    waits, router = asyncio.run(scenario())
    assert max(waits) < 0.2  # the candidate takes 0.5 s: nobody waited for it
    assert list(router.agreements) == [True, False, True, True]
    outcomes = list(router.outcomes)
    assert sum(1 for role, _, _ in outcomes if role == STABLE) == 5
    assert [ok for role, ok, _ in outcomes if role == CANDIDATE].count(False) == 1
    assert router.versions == {STABLE: "1", CANDIDATE: "2"}


def test_a_failing_canary_call_is_answered_by_stable():
    settings = ServeConfig(release={"candidate": "2", "traffic_percent": 100})

    async def scenario() -> tuple[dict, ReleaseRouter]:
        router = ReleaseRouter("image", settings, judge=None)

        async def stable() -> dict:
            return _answer("3", 1)

        async def broken() -> dict:
            raise RequestError(503, "no answer within 10 s")

        return await router.predict({}, stable, broken), router

    answer, router = asyncio.run(scenario())
    assert answer == _answer("3", 1)
    assert [(role, ok) for role, ok, _ in router.outcomes] == [(CANDIDATE, False), (STABLE, True)]


# ---- under load, on Serve ---------------------------------------------------------------------
def _registry(root: str) -> str:
    """Versions 1 and 2 (different seeds) of the image and click models; production -> 1."""
    import torch

    from ray_app.bundle import save_bundle
    from ray_app.registry import ModelRegistry
    from ray_app.workloads import get_workload

    models = os.path.join(root, "models")
    registry = ModelRegistry(models)
    for name, (options, manifest) in (("image", IMAGE), ("ctr", CTR)):
        workload = get_workload(name)
        parsed = workload.parse_options(options)
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = workload.build_model(parsed, manifest, pretrained=False).eval()
            bundle = os.path.join(root, f"{name}-{seed}")
            save_bundle(model, bundle, {"workload": name, "options": parsed.model_dump(mode="json"), "manifest": manifest, "metrics": {}})
            registry.register(name, bundle, {"run_name": f"seed-{seed}"}, alias="production" if seed == 0 else None)
    return models


def _breaking_loader(models: str, broken: set[tuple[str, str]]):
    """The registry loader, except that the named (workload, version) models raise in their
    forward pass: a candidate that loads and takes traffic, then fails every request. Defined in
    a function so that Ray ships the class by value to the replicas."""
    from ray_app.serving.loaders import RegistryLoader

    class BreakingLoader(RegistryLoader):
        def load(self, workload: str, resolved: str, use_gpu: bool):
            bundle = super().load(workload, resolved, use_gpu)
            if (workload, str(bundle.info.get("version"))) in broken:

                def fail(inputs):
                    raise RuntimeError("deliberately broken candidate")

                bundle.predict_proba = fail
            return bundle

    return BreakingLoader(models)


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def release_app(session_serve, tmp_path_factory):
    from ray import serve

    from ray_app.serving.app import compose_app

    models = _registry(str(tmp_path_factory.mktemp("canary")))
    small = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0, "alias_poll_s": 0.5}
    judged = {"candidate": "2", "traffic_percent": 50, "min_requests": 10, "report_interval_s": 0.25}
    args = {
        "models": models,
        "gateway": {"api_key_sha256": [hashlib.sha256(API_KEY.encode()).hexdigest()], "min_replicas": 1, "max_replicas": 1, "num_cpus": 0},
        "workloads": {
            # Latency margins wide enough for 2 shared cores: the p99 rule has its own test above.
            "image": {**small, "release": {**judged, "window_s": 3, "max_p99_margin_ratio": 4, "max_p99_margin_ms": 1000}},
            "ctr": {**small, "release": {**judged, "window_s": 30}},
        },
    }
    url = session_serve.start()  # the session's Serve: the app is deleted afterwards, Serve is not shut down
    serve.run(compose_app(args, loaders={"ctr": _breaking_loader(models, {("ctr", "2")})}), name="canary", route_prefix="/canary")
    yield {"url": f"{url}/canary", "models": models}
    serve.delete("canary")


def _load_until(url: str, body: bytes, content_type: str, done, limit_s: float = 30, after_s: float = 1.0) -> dict:
    """4 clients posting until ``done()`` holds (then ``after_s`` more): status counts and the
    versions that answered."""
    stop, lock = threading.Event(), threading.Lock()
    statuses: dict[int, int] = {}
    versions: dict[int, int] = {}

    def client() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                answer = session.post(url, data=body, headers={**AUTH, "Content-Type": content_type}, timeout=60)
                with lock:
                    statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
                    if answer.status_code == 200:
                        version = answer.json()["model"]["version"]
                        versions[version] = versions.get(version, 0) + 1

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + limit_s
    try:
        while not done() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(after_s)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return {"statuses": statuses, "versions": versions}


def _phase(url: str, workload: str) -> str:
    return requests.get(f"{url}/{workload}/release", headers=AUTH, timeout=10).json().get("phase", "")


def test_canary_promotes_a_healthy_candidate_under_load_with_no_failed_request(release_app, metrics_port):
    from ray_app.registry import ModelRegistry

    url = release_app["url"]
    load = _load_until(f"{url}/image/predict", _png(), "image/png", lambda: _phase(url, "image") == "promoted")
    assert load["statuses"].keys() == {200}, load
    assert load["versions"].keys() == {1, 2}, load  # both versions answered during the canary

    status = requests.get(f"{url}/image/release", headers=AUTH, timeout=10).json()
    assert status["phase"] == "promoted", status
    assert status["totals"]["candidate"]["requests"] >= 10 and status["totals"]["candidate"]["errors"] == 0
    registry = ModelRegistry(release_app["models"])
    assert registry.aliases("image")["production"] == 2
    move = registry.alias_history("image", "production")[-1]
    assert (move["from"], move["to"], move["user"]) == (1, 2, "release-judge")
    assert move["reason"].startswith("canary promoted: canary held for 3 s") and move["metrics"]["candidate"]["requests"] >= 10

    # The stable replicas follow the moved alias: requests that pick stable get version 2 now.
    body, deadline = _png(), time.monotonic() + 15
    stable = {**AUTH, "x-ray-app-cohort": "stable", "Content-Type": "image/png"}
    while requests.post(f"{url}/image/predict", data=body, headers=stable, timeout=30).json()["model"]["version"] != 2:
        assert time.monotonic() < deadline, "the stable model did not follow the promoted alias"
        time.sleep(0.25)

    # Requests and latency per version, in Prometheus.
    wanted = ('role="candidate"', 'version="2"', "ray_app_release_latency_ms_bucket")
    deadline, text = time.monotonic() + 30, ""
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        lines = [line for line in text.splitlines() if "ray_app_release_requests_total{" in line]  # Ray adds a ray_ prefix
        if any(all(w in line for w in wanted[:2]) for line in lines) and wanted[2] in text:
            break
        time.sleep(1)
    assert any(all(w in line for w in wanted[:2]) for line in lines), lines
    assert wanted[2] in text


def test_canary_rolls_back_a_broken_candidate_under_load_with_no_failed_request(release_app):
    from ray_app.registry import ModelRegistry

    url = release_app["url"]
    registry = ModelRegistry(release_app["models"])
    moves_before = len(registry.alias_history("ctr"))
    event = json.dumps({"age": 31, "user": "u7"}).encode()
    load = _load_until(f"{url}/ctr/predict", event, "application/json", lambda: _phase(url, "ctr") == "rolled_back")
    assert load["statuses"].keys() == {200}, load  # every request the candidate failed was answered by stable
    assert load["versions"].keys() == {1}, load

    status = requests.get(f"{url}/ctr/release", headers=AUTH, timeout=10).json()
    assert status["phase"] == "rolled_back", status
    assert "candidate error rate 100.0%" in status["reason"], status
    assert status["events"][-1]["phase"] == "rolled_back"
    # The registry is untouched: a rollback only stops the candidate's traffic.
    assert registry.aliases("ctr")["production"] == 1 and len(registry.alias_history("ctr")) == moves_before
    # The candidate takes no more traffic, not even when a request asks for it.
    canary = {**AUTH, "x-ray-app-cohort": "canary", "Content-Type": "application/json"}
    answers = [requests.post(f"{url}/ctr/predict", data=event, headers=canary, timeout=30) for _ in range(5)]
    assert [(a.status_code, a.json()["model"]["version"]) for a in answers] == [(200, 1)] * 5


def test_release_route_needs_a_key_and_a_release(release_app):
    url = release_app["url"]
    assert requests.get(f"{url}/image/release", timeout=10).status_code == 401
    assert requests.get(f"{url}/text/release", headers=AUTH, timeout=10).status_code == 404
