"""The online side of the behaviour features: per-user and per-item history in Redis.

Why plain Redis (redis-py) and not Feast on top of it: the features here are sliding windows and
last-N sequences updated per event; Feast's online store serves precomputed rows that a batch or
stream job materializes, so the windows would still need this code (or a Spark/Flink job), plus
Feast's registry and its heavy dependency set in every replica. Redis sorted sets do the windows
natively (``ZCOUNT`` over a time range) and keep the read to one round trip.

Layout (score = event time in seconds): ``bh:u:<user>`` the user's history entries
(``behaviour.encode_entry``), ``bh:uc:<user>`` the user's clicked event ids, ``bh:i:<item>`` and
``bh:ic:<item>`` every user's event ids and clicks on the item. One Lua script adds an event to all
four and trims them, atomically; ingesting the same event id twice changes nothing. Retention: a
user keeps their last ``last_n`` entries plus everything within the longest window of their newest
event; an item keeps its longest window. Reads ``as of t`` never see entries at or after ``t``.

``bh:meta:seeded`` says the store holds the whole history: ``backfill`` sets it when it completes
(``start-empty`` on a new deployment with no log). A Redis that restarts without persistence comes
back empty, marker included, and still answers: reads then raise ``StoreUnseeded``, so serving
degrades (static features, ``"degraded": true``, counted) instead of scoring every user as new,
until a backfill runs again. The check is one more command in the read's round trip.
(On Redis Cluster the four keys of one event are in different slots: run one primary, or shard by
user with a proxy; a single Redis holds ~100 M entries per 10 GB.)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ray_app.features.behaviour import BehaviourSpec, assemble, encode_entry

PASSWORD_ENV = "RAY_APP_REDIS_PASSWORD"  # the password stays out of configs and URLs that get logged

INGEST = """
local t = tonumber(ARGV[1])
local clicked = ARGV[3] == '1'
redis.call('ZADD', KEYS[1], t, ARGV[2])
redis.call('ZADD', KEYS[3], t, ARGV[4])
if clicked then
  redis.call('ZADD', KEYS[2], t, ARGV[4])
  redis.call('ZADD', KEYS[4], t, ARGV[4])
end
local last_n, user_window, item_window = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local newest = tonumber(redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2])
-- Kept: the last N entries before the newest time (a read at that very time must still find N:
-- entries at the same time are not "before" it), plus everything within the longest window.
local older = redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. string.format('%.17g', newest))
if older > last_n then
  local cutoff = newest - user_window
  local nth = tonumber(redis.call('ZRANGE', KEYS[1], older - last_n, older - last_n, 'WITHSCORES')[2])
  if nth < cutoff then cutoff = nth end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.17g', cutoff))
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. string.format('%.17g', newest - user_window))
local item_newest = tonumber(redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')[2])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. string.format('%.17g', item_newest - item_window))
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. string.format('%.17g', item_newest - item_window))
return 1
"""


class StoreUnavailable(RuntimeError):
    """The online store did not answer (down, unreachable, too slow): callers degrade, never fail."""


class StoreUnseeded(StoreUnavailable):
    """The store answers but holds no complete history (e.g. Redis restarted empty): backfill it."""


SEEDED_KEY = "bh:meta:seeded"


class BadEvent(ValueError):
    """An event that cannot update the history (missing field, time not a finite number, click not 0/1)."""


def connect(url: str, timeout_s: float = 0.05):
    """A Redis client with short timeouts: a store that hangs must cost a prediction milliseconds
    (then it degrades), not the request's whole time budget."""
    import redis

    return redis.Redis.from_url(
        url,
        password=os.environ.get(PASSWORD_ENV) or None,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        decode_responses=True,
        health_check_interval=0,
    )


class OnlineStore:
    """Behaviour history in Redis for one ``BehaviourSpec``."""

    def __init__(self, url: str, spec: BehaviourSpec, timeout_s: float = 0.05) -> None:
        self.spec = spec
        self.client = connect(url, timeout_s)
        self._ingest = self.client.register_script(INGEST)

    # ---- keys ------------------------------------------------------------------------------
    @staticmethod
    def user_keys(user: str) -> tuple[str, str]:
        return f"bh:u:{user}", f"bh:uc:{user}"

    @staticmethod
    def item_keys(item: str) -> tuple[str, str]:
        return f"bh:i:{item}", f"bh:ic:{item}"

    # ---- writes ----------------------------------------------------------------------------
    def parse_event(self, event: Mapping[str, Any]) -> tuple[str, str, str, float, int, str]:
        """(event id, user, item, category, time, click) of one event, or ``BadEvent``."""
        s = self.spec
        missing = [c for c in s.event_fields() if event.get(c) is None]
        if missing:
            raise BadEvent(f"missing {', '.join(missing)}")
        try:
            t = float(event[s.time_column])
        except (TypeError, ValueError, OverflowError):
            t = math.nan
        if not math.isfinite(t):
            raise BadEvent(f"{s.time_column}: not a finite number")
        click = event[s.label_column]
        if isinstance(click, str) or click not in (0, 1):
            raise BadEvent(f"{s.label_column}: must be 0 or 1")
        category = str(event[s.category_column]) if s.category_column else ""
        fields = (str(event[s.event_column]), str(event[s.user_column]), str(event[s.item_column]))
        if any(not f or len(f) > 256 for f in fields):
            raise BadEvent("event, user and item ids must be 1-256 characters")
        return (*fields, category, t, int(click))

    def ingest(self, events: Iterable[Mapping[str, Any]]) -> int:
        """Add events (any order; duplicates are no-ops) in one pipelined round trip. Each event is
        one atomic script call. Raises ``BadEvent`` before writing anything if one is invalid."""
        import redis

        parsed = [self.parse_event(e) for e in events]
        s = self.spec
        pipe = self.client.pipeline(transaction=False)
        for event_id, user, item, category, t, click in parsed:
            self._ingest(
                keys=[*self.user_keys(user), *self.item_keys(item)],
                args=[
                    repr(t),
                    encode_entry(event_id, item, category, click),
                    click,
                    event_id,
                    s.last_n,
                    max(s.user_windows_s),
                    max(s.item_windows_s),
                ],
                client=pipe,
            )
        try:
            pipe.execute()
        except redis.RedisError as exc:
            raise StoreUnavailable(f"online store: {type(exc).__name__}") from None
        return len(parsed)

    def mark_seeded(self, note: Mapping[str, Any]) -> None:
        """Record that the store now holds the whole history (after a backfill, or deliberately empty)."""
        import json
        import time

        import redis

        try:
            self.client.set(SEEDED_KEY, json.dumps({**note, "at": time.time()}))
        except redis.RedisError as exc:
            raise StoreUnavailable(f"online store: {type(exc).__name__}") from None

    def purge_user(self, user: str) -> int:
        """Forget a user's history (e.g. an erasure request); returns the keys removed. Their events
        stay inside item counts, which hold event ids only, not who made them."""
        import redis

        try:
            return int(self.client.delete(*self.user_keys(str(user))))
        except redis.RedisError as exc:
            raise StoreUnavailable(f"online store: {type(exc).__name__}") from None

    # ---- reads -----------------------------------------------------------------------------
    def read(self, users: Sequence[Any], items: Sequence[Any], times: Sequence[float]) -> dict[str, list[Any]]:
        """Feature columns (``BehaviourSpec.columns()``) for events as of their times, in one
        pipelined round trip; raises ``StoreUnavailable`` when the store does not answer, and
        ``StoreUnseeded`` when it answers without its history (``SEEDED_KEY`` missing)."""
        import redis

        s = self.spec
        pipe = self.client.pipeline(transaction=False)
        pipe.exists(SEEDED_KEY)
        for user, item, t in zip(users, items, times, strict=True):
            user_all, user_clicks = self.user_keys(str(user))
            item_all, item_clicks = self.item_keys(str(item))
            before = f"({t!r}"
            pipe.zrevrangebyscore(user_all, before, "-inf", start=0, num=s.last_n, withscores=True)
            for w in s.user_windows_s:
                pipe.zcount(user_all, repr(t - w), before)
                pipe.zcount(user_clicks, repr(t - w), before)
            for w in s.item_windows_s:
                pipe.zcount(item_all, repr(t - w), before)
                pipe.zcount(item_clicks, repr(t - w), before)
        try:
            answers = pipe.execute()
        except redis.RedisError as exc:
            raise StoreUnavailable(f"online store: {type(exc).__name__}") from None
        seeded, answers = answers[0], answers[1:]
        if not seeded:
            raise StoreUnseeded("online store holds no backfilled history (restarted empty?): run the backfill")
        per_event = 1 + 2 * len(s.user_windows_s) + 2 * len(s.item_windows_s)
        columns: dict[str, list[Any]] = {c: [] for c in s.columns()}
        for k, t in enumerate(times):
            answer = answers[k * per_event : (k + 1) * per_event]
            counts = answer[1:]
            user_counts = [(counts[2 * j], counts[2 * j + 1]) for j in range(len(s.user_windows_s))]
            offset = 2 * len(s.user_windows_s)
            item_counts = [(counts[offset + 2 * j], counts[offset + 2 * j + 1]) for j in range(len(s.item_windows_s))]
            row = assemble(s, float(t), answer[0], user_counts, item_counts)
            for name, value in row.items():
                columns[name].append(value)
        return columns

    def ping(self) -> bool:
        import redis

        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False


def backfill(url: str, spec: BehaviourSpec, input_uri: str, batch_size: int = 2000) -> dict[str, Any]:
    """Fill the store from a log with Ray Data: blocks are ingested in parallel, in any order (the
    history is kept by event time, so the result does not depend on it)."""
    from ray_app.workloads.base import read_table

    def ingest_batch(batch: Any) -> dict[str, list[int]]:
        store = OnlineStore(url, spec, timeout_s=5.0)
        events = batch[spec.event_fields()].to_dict("records")
        bad = 0
        good = []
        for event in events:
            try:
                store.parse_event(event)
                good.append(event)
            except BadEvent:
                bad += 1
        store.ingest(good)
        return {"ingested": [len(good)], "rejected": [bad]}

    counts = read_table(input_uri).map_batches(ingest_batch, batch_size=batch_size, batch_format="pandas").sum(["ingested", "rejected"])
    summary = {"ingested": int(counts["sum(ingested)"]), "rejected": int(counts["sum(rejected)"])}
    OnlineStore(url, spec, timeout_s=5.0).mark_seeded({"source": input_uri, **summary})  # only once every block is in
    return summary


class LocalRedis:
    """A throwaway ``redis-server`` on a free loopback port, no persistence: for the demo, the tests
    and the benchmark (a deployment points ``serve.feature_store`` at its own Redis instead)."""

    def __init__(self) -> None:
        import shutil

        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise FileNotFoundError("redis-server is not installed: `make setup` installs it (apt-get install redis-server)")
        self.process: Any = None
        self.url = ""

    def start(self, timeout_s: float = 10.0, port: int | None = None) -> str:
        """Start it (on ``port``, e.g. the one of a server stopped before, as a restart)."""
        import subprocess
        import time

        from ray_app.runtime import unused_loopback_port

        port = port or unused_loopback_port()
        self.process = subprocess.Popen(
            [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + timeout_s
        client = connect(self.url, timeout_s=0.5)
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return self.url
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"redis-server did not answer on port {port} within {timeout_s} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def model_spec(models: str, ref: str) -> BehaviourSpec:
    """The behaviour definition a registered ctr model was trained with (the store must keep that)."""
    from ray_app import storage
    from ray_app.registry import resolve_model_uri

    info = storage.read_json(storage.join(resolve_model_uri(models, "ctr", ref), "bundle.json"))
    behaviour = info.get("manifest", {}).get("behaviour")
    if not behaviour:
        raise ValueError(f"ctr model {ref!r} uses no behaviour features")
    return BehaviourSpec.from_dict(behaviour)


def main(argv: list[str] | None = None) -> None:
    """``python -m ray_app.features.online_store backfill|start-empty|purge``: the batch side of the store. The
    Redis URL comes from --url (password in $RAY_APP_REDIS_PASSWORD); the history layout from the
    registered model, so the store keeps what that model reads."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--url", required=True, help="redis://host:port/db")
    parser.add_argument("--models", default="./workspace/models", help="model registry URI")
    parser.add_argument("--model", default="production", help="ctr alias or version whose behaviour definition to keep")
    actions = parser.add_subparsers(dest="action", required=True)
    fill = actions.add_parser("backfill", help="fill the history from an event log (Parquet/CSV/JSONL), with Ray Data")
    fill.add_argument("--input", required=True)
    actions.add_parser("start-empty", help="a new deployment with no event log: declare the empty store complete")
    purge = actions.add_parser("purge", help="forget one user's history (an erasure request)")
    purge.add_argument("--user", required=True)
    args = parser.parse_args(argv)
    spec = model_spec(args.models, args.model)
    if args.action == "purge":
        print(json.dumps({"purged_keys": OnlineStore(args.url, spec, timeout_s=5.0).purge_user(args.user)}))
        return
    if args.action == "start-empty":
        OnlineStore(args.url, spec, timeout_s=5.0).mark_seeded({"source": "start-empty"})
        print(json.dumps({"seeded": True}))
        return
    from ray_app.runtime import connect

    connect()
    print(json.dumps(backfill(args.url, spec, args.input)))


if __name__ == "__main__":
    main()
