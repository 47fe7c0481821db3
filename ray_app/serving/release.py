"""Canary and shadow releases: a candidate model version served next to the stable one, judged on
live traffic, then promoted or rolled back on its own.

Why two model deployments joined in the gateway: Ray Serve has had no weighted split between two
versions of one deployment since 1.5, and one deployment holding both models would scale and fail
as one. So a workload with a ``release`` section gets a second ``ModelServer`` deployment
(``<workload>-candidate``, the same class and loader, pointed at the candidate), and the gateway,
which sees every request, picks the version per request (a percentage, a header, or a cohort key
hashed to a stable bucket) — KServe's ``canaryTrafficPercent`` convention.

Judging needs every gateway replica's counts in one place, or two replicas could decide apart (one
promoting, one rolling back). ``ReleaseJudge`` is that place: a one-replica deployment that each
gateway replica sends its outcomes to every ``report_interval_s`` (batched: one call per interval,
not per request) and that answers with the release's phase. Over a trailing window it compares the
candidate's error rate and p99 with the stable version's; a candidate over the margins stops taking
traffic (rolled back), a candidate that held for one full window is promoted by moving the stable
alias through the registry (``ModelRegistry.move_alias``: alias history, user and reason recorded,
so ``ray-app <workload> rollback`` undoes it like any other move). The stable replicas follow the
alias as they always do.

A canary request the candidate fails (an error, no answer within ``candidate_timeout_s``, its
replica lost) is counted against the candidate and answered by the stable version: inference is
idempotent, so a broken candidate costs latency, not failed requests. In shadow mode every answer
comes from the stable version; the mirrored call runs beside it in a task of its own (never
awaited by the client's request), and only the comparison of the two answers is kept.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np
from ray import serve

from ray_app.config import ReleaseConfig, ServeConfig
from ray_app.serving.http import RequestError

log = logging.getLogger("ray.serve")  # Serve's logger: lines land in the replica's log file

STABLE, CANDIDATE = "stable", "candidate"
# Phases in which the candidate takes (canary) or mirrors (shadow) traffic; the others are final.
LIVE_PHASES = ("canary", "shadow")
MAX_BUFFERED = 100_000  # outcomes a gateway keeps while the judge is unreachable; older ones dropped
EVENTS_KEPT = 50


def cohort_bucket(key: str) -> float:
    """A stable position in [0, 100) for a cohort key (e.g. a user id): the same key always falls
    in the same bucket, on every gateway replica and across restarts (no per-process hash salt)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 * 100


def choose_role(cfg: ReleaseConfig, phase: str, headers: Mapping[str, str], draw: Callable[[], float] = random.random) -> str:
    """Which version a request goes to (canary) or whether it is mirrored (shadow). An explicit
    header wins, then the cohort key's bucket, then a random draw against ``traffic_percent``."""
    if phase not in LIVE_PHASES:
        return STABLE
    forced = headers.get(cfg.header, "").strip().lower()
    if forced in ("canary", CANDIDATE):
        return CANDIDATE
    if forced == STABLE:
        return STABLE
    key = headers.get(cfg.cohort_header) if cfg.cohort_header else None
    position = cohort_bucket(key) if key else draw() * 100
    return CANDIDATE if position < cfg.traffic_percent else STABLE


def answer_decision(body: Mapping[str, Any]) -> Any:
    """What an answer decided, for comparing two versions' answers to one request: the top label
    (image), the findings (multi-label image), each text's label, each event's click at 0.5.
    Probabilities are left out: two versions rarely agree on them to the last digit."""
    if "predictions" in body:
        return [p["label"] for p in body["predictions"][:1]]
    if "findings" in body:
        return sorted(body["findings"])
    if "results" in body:
        return [r["label"] for r in body["results"]]
    if "click_probability" in body:
        return [p >= 0.5 for p in body["click_probability"]]
    return {k: v for k, v in body.items() if k != "model"}


def answer_version(answer: Mapping[str, Any]) -> str | None:
    version = (answer.get("body") or {}).get("model", {}).get("version")
    return None if version is None else str(version)


# ---- judging (pure: no Ray, a clock passed in) ------------------------------------------------
@dataclasses.dataclass
class WindowStats:
    requests: int
    errors: int
    p99_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, Any]:
        p99 = None if self.p99_ms is None else round(self.p99_ms, 1)
        return {"requests": self.requests, "errors": self.errors, "error_rate": round(self.error_rate, 4), "p99_ms": p99}


class ReleaseJudge:
    """One workload's release: outcomes per version over a trailing window, and the decision.

    ``observe`` takes ``(role, ok, latency_ms)`` outcomes stamped ``now``; ``decide(now)`` returns
    ``("rollback" | "promote", reason)`` once, or None. Rollback: the candidate has at least
    ``min_requests`` in the window and its error rate exceeds the stable one's (0 when stable has
    fewer than ``min_requests``) by more than the margin, or — both versions having enough
    requests — its p99 exceeds stable's by more than the p99 margin. Promotion (canary with
    ``promote``): one full window since the candidate's first request, ``min_requests`` for it in
    the window, and no rollback."""

    def __init__(self, cfg: ReleaseConfig, now: float) -> None:
        self.cfg = cfg
        self.phase = cfg.mode
        self.started = now
        self.candidate_since: float | None = None  # first candidate outcome: the window starts there
        self.reason: str | None = None
        self.decided_at: float | None = None
        self.outcomes: dict[str, collections.deque[tuple[float, bool, float]]] = {
            STABLE: collections.deque(),
            CANDIDATE: collections.deque(),
        }
        self.totals = {role: {"requests": 0, "errors": 0} for role in (STABLE, CANDIDATE)}
        self.compared = self.agreed = 0

    def observe(self, outcomes: list[tuple[str, bool, float]], agreements: list[bool], now: float) -> None:
        for role, ok, latency_ms in outcomes:
            if role == CANDIDATE and self.candidate_since is None:
                self.candidate_since = now
            self.outcomes[role].append((now, bool(ok), float(latency_ms)))
            self.totals[role]["requests"] += 1
            self.totals[role]["errors"] += 0 if ok else 1
        self.compared += len(agreements)
        self.agreed += sum(bool(a) for a in agreements)
        self._forget(now)

    def _forget(self, now: float) -> None:
        for window in self.outcomes.values():
            while window and window[0][0] < now - self.cfg.window_s:
                window.popleft()

    def stats(self, role: str, now: float) -> WindowStats:
        self._forget(now)
        window = self.outcomes[role]
        latencies = [latency for _, _, latency in window]
        p99 = float(np.percentile(latencies, 99)) if latencies else None
        return WindowStats(len(window), sum(1 for _, ok, _ in window if not ok), p99)

    def decide(self, now: float) -> tuple[str, str] | None:
        if self.phase not in LIVE_PHASES:
            return None
        cfg = self.cfg
        candidate, stable = self.stats(CANDIDATE, now), self.stats(STABLE, now)
        if candidate.requests < cfg.min_requests:
            return None
        baseline_errors = stable.error_rate if stable.requests >= cfg.min_requests else 0.0
        if candidate.error_rate > baseline_errors + cfg.max_error_rate_margin:
            return "rollback", (
                f"candidate error rate {candidate.error_rate:.1%} over {candidate.requests} requests exceeds stable's "
                f"{baseline_errors:.1%} by more than {cfg.max_error_rate_margin:.1%} (window {cfg.window_s:g} s)"
            )
        if stable.requests >= cfg.min_requests and candidate.p99_ms is not None and stable.p99_ms is not None:
            limit = stable.p99_ms * (1 + cfg.max_p99_margin_ratio) + cfg.max_p99_margin_ms
            if candidate.p99_ms > limit:
                return "rollback", (
                    f"candidate p99 {candidate.p99_ms:.0f} ms exceeds stable's {stable.p99_ms:.0f} ms beyond the margin "
                    f"(limit {limit:.0f} ms; window {cfg.window_s:g} s)"
                )
        if self.phase == "canary" and cfg.promote and now - self.candidate_since >= cfg.window_s:
            return "promote", (
                f"canary held for {cfg.window_s:g} s: {candidate.requests} requests, error rate {candidate.error_rate:.1%} "
                f"(stable {stable.error_rate:.1%}), p99 {candidate.p99_ms:.0f} ms (stable "
                f"{'-' if stable.p99_ms is None else f'{stable.p99_ms:.0f}'} ms)"
            )
        return None

    def settle(self, phase: str, reason: str, now: float) -> None:
        self.phase, self.reason, self.decided_at = phase, reason, now

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "mode": self.cfg.mode,
            "phase": self.phase,
            "reason": self.reason,
            "running_s": round(now - self.started, 1),
            "window": {role: self.stats(role, now).as_dict() for role in (STABLE, CANDIDATE)},
            "totals": self.totals,
            "agreement": {
                "compared": self.compared,
                "agreed": self.agreed,
                "rate": round(self.agreed / self.compared, 4) if self.compared else None,
            },
        }


# ---- the judge deployment ---------------------------------------------------------------------
@serve.deployment(name="release-judge", num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class ReleaseJudgeDeployment:
    """Every gateway replica's outcomes in one place, one decision per workload. A promotion moves
    the stable alias in the registry; the decision then stands for this app's life. A restarted
    judge starts each release again, except one whose stable alias already names the candidate
    (promoted before the restart)."""

    def __init__(self, models: str, workloads: dict[str, ServeConfig | dict[str, Any]]) -> None:
        self.models = models
        self.settings = {name: ServeConfig.model_validate(s) for name, s in workloads.items()}
        now = time.monotonic()
        self.judges = {name: ReleaseJudge(s.release, now) for name, s in self.settings.items() if s.release}
        self.events: list[dict[str, Any]] = []
        self._checked_promoted = False

    async def _already_promoted(self) -> None:
        """A judge restarted after its promotion must not promote again (a second alias move)."""
        if self._checked_promoted:
            return
        self._checked_promoted = True
        for name, judge in self.judges.items():
            try:
                same = await asyncio.to_thread(self._same_version, name)
            except Exception:  # noqa: BLE001 - no registry (in-memory models) or no such ref: judge from scratch
                continue
            if same:
                judge.settle("promoted", "the stable alias already names the candidate", time.monotonic())

    def _same_version(self, workload: str) -> bool:
        from ray_app.registry import ModelRegistry

        registry, s = ModelRegistry(self.models), self.settings[workload]
        return registry.resolve_version(workload, s.model) == registry.resolve_version(workload, s.release.candidate)

    async def report(self, workload: str, outcomes: list[tuple[str, bool, float]], agreements: list[bool]) -> dict[str, Any]:
        """A gateway's outcomes since its last report; returns the release's phase."""
        await self._already_promoted()
        judge, now = self.judges[workload], time.monotonic()
        judge.observe(outcomes, agreements, now)
        decision = judge.decide(now)
        if decision is not None:
            action, reason = decision
            if action == "rollback":
                judge.settle("rolled_back", reason, now)
                log.warning("%s release: candidate rolled back: %s", workload, reason)
            else:
                await self._promote(workload, judge, reason, now)
            self.events = [*self.events, {"workload": workload, "phase": judge.phase, "reason": judge.reason, "at": time.time()}][
                -EVENTS_KEPT:
            ]
        return {"phase": judge.phase, "reason": judge.reason}

    async def _promote(self, workload: str, judge: ReleaseJudge, reason: str, now: float) -> None:
        # Settled before the registry write: reports arriving meanwhile see the decision, not a
        # second promotion.
        judge.settle("promoting", reason, now)
        try:
            record = await asyncio.to_thread(self._move_alias, workload, reason, judge.snapshot(now)["window"])
        except Exception as exc:  # noqa: BLE001 - a registry that refuses leaves stable serving, said in the state
            judge.settle("promotion_failed", f"{reason}; the alias was not moved: {type(exc).__name__}: {exc}", now)
            log.error("%s release: %s", workload, judge.reason)
            return
        judge.settle("promoted", f"{reason}; alias {record['alias']!r} {record['from']} -> {record['to']} (history #{record['seq']})", now)
        log.warning("%s release: %s", workload, judge.reason)

    def _move_alias(self, workload: str, reason: str, window: dict[str, Any]) -> dict[str, Any]:
        from ray_app.registry import ModelRegistry
        from ray_app.serving.model_server import follows_alias

        s = self.settings[workload]
        if not follows_alias(s.model):
            raise ValueError(f"the stable model is pinned to {s.model!r}, not an alias: move it yourself")
        registry = ModelRegistry(self.models)
        version = registry.resolve_version(workload, s.release.candidate)
        return registry.move_alias(workload, s.model, version, reason=f"canary promoted: {reason}", metrics=window, user="release-judge")

    async def status(self, workload: str) -> dict[str, Any]:
        await self._already_promoted()
        s, judge = self.settings[workload], self.judges[workload]
        return {
            "workload": workload,
            "stable": s.model,
            "candidate": s.release.candidate,
            **judge.snapshot(time.monotonic()),
            "config": s.release.model_dump(),
            "events": [e for e in self.events if e["workload"] == workload],
        }


# ---- the gateway's side -----------------------------------------------------------------------
class ReleaseMetrics:
    """Requests and latency per version (and role), and shadow agreement; created in the gateway
    replica (``ray.serve.metrics`` adds the deployment and replica tags)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        from ray_app.serving.metrics import LATENCY_BOUNDARIES_MS

        self.requests = Counter(
            "ray_app_release_requests",
            description="inference calls of a release by model version, role (stable/candidate) and outcome (ok/error)",
            tag_keys=("workload", "version", "role", "outcome"),
        )
        self.latency_ms = Histogram(
            "ray_app_release_latency_ms",
            description="latency of a release's model calls in the gateway, by model version and role",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("workload", "version", "role"),
        )
        self.comparisons = Counter(
            "ray_app_shadow_comparisons",
            description="shadow answers compared with the stable version's, by candidate version and agreement",
            tag_keys=("workload", "version", "agreement"),
        )


class ReleaseRouter:
    """One workload's release inside a gateway replica: picks the version per request, counts the
    outcomes, and trades them for the judge's phase every ``report_interval_s``."""

    def __init__(self, workload: str, settings: ServeConfig, judge: Any, metrics: ReleaseMetrics | None = None) -> None:
        self.workload, self.cfg, self.judge = workload, settings.release, judge
        self.phase, self.reason = self.cfg.mode, None
        self.versions = {STABLE: settings.model, CANDIDATE: self.cfg.candidate}  # refs until an answer names the version
        self.metrics = metrics
        self.outcomes: collections.deque[tuple[str, bool, float]] = collections.deque(maxlen=MAX_BUFFERED)
        self.agreements: collections.deque[bool] = collections.deque(maxlen=MAX_BUFFERED)
        self.shadows_in_flight = 0
        self._tasks: set[asyncio.Task] = set()
        self._reporter: asyncio.Task | None = None

    # ---- requests ------------------------------------------------------------------------------
    async def predict(
        self, headers: Mapping[str, str], call_stable: Callable[[], Awaitable[dict]], call_candidate: Callable[[], Awaitable[dict]]
    ) -> dict[str, Any]:
        """The answer to one request: ``{"status", "body" | "message"}`` as ``ModelServer.predict``."""
        self._start_reporting()
        role = choose_role(self.cfg, self.phase, headers)
        if self.phase == "shadow":
            answer = asyncio.ensure_future(self._timed(STABLE, call_stable))
            if role == CANDIDATE and self.shadows_in_flight < self.cfg.max_shadow_in_flight:
                self.shadows_in_flight += 1
                self._spawn(self._shadow(call_candidate, answer))
            return await answer
        if role == CANDIDATE:
            try:
                return await self._timed(CANDIDATE, call_candidate)
            except Exception:  # noqa: BLE001 - counted against the candidate; stable answers instead
                pass
        return await self._timed(STABLE, call_stable)

    async def _timed(self, role: str, call: Callable[[], Awaitable[dict]]) -> dict[str, Any]:
        started, ok, version = time.perf_counter(), False, None
        try:
            answer = await call()
            ok, version = answer["status"] < 500, answer_version(answer)
            return answer
        except RequestError as exc:
            ok = exc.status_code < 500  # a refused body (4xx) is the client's, not the version's
            raise
        finally:
            self.record(role, ok, (time.perf_counter() - started) * 1000, version)

    async def _shadow(self, call_candidate: Callable[[], Awaitable[dict]], stable: asyncio.Future) -> None:
        try:
            mirrored = await self._timed(CANDIDATE, call_candidate)
            answered = await asyncio.shield(stable)
        except Exception:  # noqa: BLE001 - a failed mirror or stable call leaves nothing to compare
            return
        finally:
            self.shadows_in_flight -= 1
        if mirrored["status"] == 200 and answered["status"] == 200:
            agree = answer_decision(mirrored["body"]) == answer_decision(answered["body"])
            self.agreements.append(agree)
            if self.metrics:
                tags = {"workload": self.workload, "version": self.versions[CANDIDATE], "agreement": "agree" if agree else "disagree"}
                self.metrics.comparisons.inc(tags=tags)

    def record(self, role: str, ok: bool, latency_ms: float, version: str | None = None) -> None:
        if version is not None:
            self.versions[role] = version
        self.outcomes.append((role, ok, latency_ms))
        if self.metrics:
            tags = {"workload": self.workload, "version": self.versions[role], "role": role}
            self.metrics.requests.inc(tags={**tags, "outcome": "ok" if ok else "error"})
            self.metrics.latency_ms.observe(latency_ms, tags=tags)

    # ---- the judge -----------------------------------------------------------------------------
    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    def _start_reporting(self) -> None:
        if self._reporter is None and self.judge is not None:
            self._reporter = asyncio.get_running_loop().create_task(self._report_forever())

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.report_interval_s)
            await self.report()

    async def report(self) -> None:
        outcomes, agreements = list(self.outcomes), list(self.agreements)
        self.outcomes.clear()
        self.agreements.clear()
        try:
            state = await self.judge.report.remote(self.workload, outcomes, agreements)
        except Exception as exc:  # noqa: BLE001 - judge unreachable: keep the counts and the last phase
            self.outcomes.extendleft(reversed(outcomes))
            self.agreements.extendleft(reversed(agreements))
            log.warning("%s release: judge unreachable (%s); %d outcomes held", self.workload, type(exc).__name__, len(self.outcomes))
            return
        if state["phase"] != self.phase:
            log.info("%s release: %s -> %s (%s)", self.workload, self.phase, state["phase"], state["reason"])
        self.phase, self.reason = state["phase"], state["reason"]
