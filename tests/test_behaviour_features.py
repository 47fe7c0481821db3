"""Behaviour features (issue 18): one definition, offline (Ray Data, point-in-time) and online (a real
redis-server), equal for every event of a replayed log; late and out-of-order events; purge.

These tests need Debian's ``redis-server`` (``make setup`` installs it): they fail, not skip, when
it is missing."""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
import requests
from ray import serve

from ray_app.features import behaviour
from ray_app.features.behaviour import NO_HISTORY_S, BehaviourSpec, add_behaviour_features, behaviour_frame
from ray_app.features.online_store import SEEDED_KEY, BadEvent, LocalRedis, OnlineStore, StoreUnavailable, StoreUnseeded, backfill
from ray_app.serving.app import compose_app
from ray_app.serving.loaders import InMemoryLoader, untrained_model
from ray_app.workloads.ctr import CLASSES, STORE_RETRY_S, CTRPreparer, CTRTransform

# Small windows and history so that retention trimming happens inside a short log.
SPEC = BehaviourSpec(
    user_column="user_id",
    item_column="item_id",
    time_column="timestamp",
    label_column="click",
    event_column="event_id",
    category_column="genre",
    last_n=3,
    user_windows_s=(30, 300),
    item_windows_s=(60,),
)


@pytest.fixture(scope="module")
def redis_url():
    with LocalRedis() as url:  # FileNotFoundError (a failure) when redis-server is missing
        yield url


@pytest.fixture
def store(redis_url):
    store = OnlineStore(redis_url, SPEC, timeout_s=2.0)
    store.client.flushdb()
    store.mark_seeded({"source": "test"})
    return store


def click_log(events: int = 400, seed: int = 3) -> pd.DataFrame:
    """Bursty sessions of a few users over a few items, with same-second ties and gaps longer than
    the windows, so windows, ties and trimming are all exercised."""
    rng = np.random.default_rng(seed)
    gaps = np.where(rng.random(events) < 0.1, rng.integers(100, 900, events), rng.integers(0, 4, events))
    return pd.DataFrame(
        {
            "event_id": [f"e{i}" for i in range(events)],
            "user_id": rng.choice([f"u{k}" for k in range(6)], events),
            "item_id": rng.choice([str(k) for k in range(12)], events),
            "genre": rng.choice(["Drama", "Comedy", "Action"], events),
            "timestamp": np.cumsum(gaps).astype(float),
            "click": rng.integers(0, 2, events),
        }
    )


def assert_same_features(offline: pd.DataFrame, served: dict[str, dict]) -> None:
    offline = offline.set_index("event_id")
    for event_id, row in served.items():
        for column, value in row.items():
            expected = offline.at[event_id, column]
            expected = list(expected) if isinstance(value, list) else expected
            if isinstance(value, list):
                assert [str(v) if column != "bh_last_clicks" else int(v) for v in expected] == value, (event_id, column)
            else:
                assert math.isclose(value, float(expected), rel_tol=1e-12), (event_id, column, value, expected)


def served_row(columns: dict[str, list], k: int = 0) -> dict:
    return {name: values[k] for name, values in columns.items()}


def test_offline_features_use_only_earlier_events():
    log = click_log(200)
    features = behaviour_frame(log, SPEC).set_index("event_id")
    # Changing what happens later never changes an earlier event's features.
    future = log.copy()
    future.loc[future.index[150:], "click"] = 1 - future.loc[future.index[150:], "click"]
    changed = behaviour_frame(future, SPEC).set_index("event_id")
    early = log["event_id"].iloc[:150]
    pd.testing.assert_frame_equal(features.loc[early, SPEC.numeric_columns()], changed.loc[early, SPEC.numeric_columns()])
    # One event by hand: u's events before t, newest first.
    event = log.iloc[120]
    before = log[(log.user_id == event.user_id) & (log.timestamp < event.timestamp)].sort_values("timestamp")
    row = features.loc[event.event_id]
    assert row["bh_user_events_5m"] == (before.timestamp >= event.timestamp - 300).sum()
    assert list(row["bh_last_items"])[:1] == ([before.item_id.iloc[-1]] if len(before) else [])
    assert row["bh_user_since_last_s"] == (event.timestamp - before.timestamp.iloc[-1] if len(before) else NO_HISTORY_S)


def test_online_replay_serves_the_offline_features_for_every_event(ray_session, store):
    """The parity test extended to time: replay the log through Redis (read as of the event, then
    ingest it) and compare each served vector with the Ray Data point-in-time one."""
    import ray.data

    log = click_log()
    offline = add_behaviour_features(ray.data.from_pandas(log), SPEC).to_pandas()
    assert len(offline) == len(log)
    served = {}
    for event in log.to_dict("records"):
        served[event["event_id"]] = served_row(store.read([event["user_id"]], [event["item_id"]], [event["timestamp"]]))
        store.ingest([event])
    assert any(row["bh_last_items"] for row in served.values()) and any(row["bh_user_events_30s"] for row in served.values())
    assert_same_features(offline, served)
    # Retention kept state bounded: no user holds more than last_n entries beyond its longest window.
    assert max(store.client.zcard(f"bh:u:{u}") for u in log.user_id.unique()) < len(log) / 6


def test_late_and_out_of_order_events_take_their_place_in_time(store):
    """Events arriving in any order (and twice) give the same state: reads are as of the request's time."""
    log = click_log(120, seed=5)
    log = log[log.timestamp < 250]  # inside the longest user window: nothing is trimmed yet
    shuffled = log.sample(frac=1.0, random_state=0)
    store.ingest(shuffled.to_dict("records"))
    store.ingest(shuffled.iloc[:20].to_dict("records"))  # duplicates are no-ops
    offline = behaviour_frame(log, SPEC)
    columns = store.read(list(log.user_id), list(log.item_id), list(log.timestamp))
    assert_same_features(offline, {e: served_row(columns, k) for k, e in enumerate(log.event_id)})


def test_bad_events_are_refused_before_anything_is_written(store):
    good = click_log(2).to_dict("records")
    for bad, reason in (
        ({**good[0], "click": 2}, "click"),
        ({**good[0], "timestamp": float("nan")}, "timestamp"),
        ({**good[0], "user_id": None}, "missing user_id"),
    ):
        with pytest.raises(BadEvent, match=reason):
            store.ingest([good[1], bad])
    assert store.client.keys() == [SEEDED_KEY]  # nothing but the marker the fixture set


def test_purge_forgets_a_user(store):
    log = click_log(50)
    store.ingest(log.to_dict("records"))
    user = log.user_id.iloc[0]
    assert store.read([user], ["0"], [1e9])["bh_last_items"][0]
    assert store.purge_user(user) >= 1
    assert store.read([user], ["0"], [1e9])["bh_last_items"] == [[]]


def test_store_down_is_an_error_the_caller_can_degrade_on():
    with LocalRedis() as url:
        store = OnlineStore(url, SPEC, timeout_s=0.2)
        assert store.ping()
    with pytest.raises(StoreUnavailable):
        store.read(["u0"], ["0"], [10.0])
    with pytest.raises(StoreUnavailable):
        store.ingest(click_log(1).to_dict("records"))


def test_a_store_without_its_history_is_unseeded_until_backfilled(ray_session, tmp_path):
    """A Redis restarted without persistence answers, empty: reads say so instead of serving every
    user as new; the backfill (which ingests the whole log, in Ray Data) marks it complete."""
    log = click_log(50)
    path = tmp_path / "log.parquet"
    log.to_parquet(path)
    server = LocalRedis()
    url = server.start()
    try:
        store = OnlineStore(url, SPEC, timeout_s=2.0)
        with pytest.raises(StoreUnseeded):
            store.read(["u0"], ["0"], [1e9])
        assert backfill(url, SPEC, str(path)) == {"ingested": 50, "rejected": 0}
        assert store.read(["u0"], ["0"], [1e9])["bh_last_items"][0]
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        server.stop()
        server.start(port=port)  # the same address, restarted without its data
        with pytest.raises(StoreUnseeded):
            store.read(["u0"], ["0"], [1e9])
    finally:
        server.stop()


# ---- the endpoint: POST /ctr/events, POST /ctr/predict, DELETE /ctr/users/<id>, store down ------
API_KEY = secrets.token_urlsafe(16)
AUTH = {"Authorization": f"Bearer {API_KEY}"}
OPTIONS = {
    "numeric_columns": ["age"],
    "categorical_columns": ["user_id", "item_id", "genre"],
    "item_column": "item_id",
    "id_column": "event_id",
    "behaviour_user_column": "user_id",
    "behaviour_category_column": "genre",
    "behaviour_last_n": SPEC.last_n,
    "behaviour_user_windows_s": list(SPEC.user_windows_s),
    "behaviour_item_windows_s": list(SPEC.item_windows_s),
}


def behaviour_manifest() -> dict:
    """What prepare records for a behaviour model, without preparing anything (unit statistics)."""
    numeric = ["age", *SPEC.numeric_columns()]
    transform = CTRTransform(numeric, OPTIONS["categorical_columns"], 256, [0.0] * len(numeric), [1.0] * len(numeric), SPEC.last_n, [1, 2])
    return {
        "classes": CLASSES,
        "transform": asdict(transform),
        "behaviour": asdict(SPEC),
        "time_cutoffs": None,
        "split_fractions": [0.1, 0.1],
    }


@pytest.fixture(scope="module")
def ctr_endpoint(session_serve):
    """A behaviour model (real architecture, seeded weights) behind the gateway, with its own Redis."""
    redis_server = LocalRedis()
    url = redis_server.start()
    base = session_serve.start()
    ctr = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25, "feature_store": url}
    args = {"workloads": {"ctr": ctr}, "gateway": {"api_key_sha256": [hashlib.sha256(API_KEY.encode()).hexdigest()]}}
    loader = InMemoryLoader({"production": untrained_model("ctr", behaviour_manifest(), OPTIONS, version=1)})
    serve.run(compose_app(args, loaders={"ctr": loader}), name="ctr-behaviour", route_prefix="/bh")
    yield f"{base}/bh/ctr", redis_server
    serve.delete("ctr-behaviour")
    redis_server.stop()


def test_events_change_the_next_prediction_and_a_store_outage_degrades_it(ctr_endpoint):
    endpoint, redis_server = ctr_endpoint
    ask = {"user_id": "u1", "item_id": "42", "genre": "Drama", "age": 30, "timestamp": 1000.0}

    def predict() -> dict:
        answer = requests.post(f"{endpoint}/predict", json=ask, headers=AUTH, timeout=60)
        assert answer.status_code == 200, answer.text
        return answer.json()

    # A store that was never backfilled (or restarted empty) holds no history: degraded, not "new user".
    assert predict()["degraded"] is True
    OnlineStore(redis_server.url, SPEC).mark_seeded({"source": "test"})
    time.sleep(STORE_RETRY_S)  # the replica looks again after its back-off
    before = predict()
    assert before["degraded"] is False
    events = [
        {"event_id": f"x{k}", "user_id": "u1", "item_id": str(k), "genre": "Drama", "timestamp": 990.0 + k, "click": k % 2}
        for k in range(4)
    ]
    assert requests.post(f"{endpoint}/events", json={"events": events}, timeout=30).status_code == 401  # behind the API key
    ingested = requests.post(f"{endpoint}/events", json={"events": events}, headers=AUTH, timeout=30)
    assert ingested.status_code == 200 and ingested.json() == {"ingested": 4}, ingested.text
    after = predict()
    assert after["degraded"] is False and after["click_probability"] != before["click_probability"]
    late = {**ask, "timestamp": 985.0}  # as of a time before those events: they are not seen
    assert (
        requests.post(f"{endpoint}/predict", json=late, headers=AUTH, timeout=30).json()["click_probability"] == before["click_probability"]
    )
    bad = requests.post(f"{endpoint}/events", json={**events[0], "click": 3}, headers=AUTH, timeout=30)
    assert bad.status_code == 422 and "click" in bad.json()["error"]["message"]
    assert requests.delete(f"{endpoint}/users/u1", timeout=30).status_code == 401
    purged = requests.delete(f"{endpoint}/users/u1", headers=AUTH, timeout=30)
    assert purged.status_code == 200 and purged.json()["purged_keys"] >= 1
    assert predict()["click_probability"] == before["click_probability"]  # no user history; the item had none
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    redis_server.stop()
    redis_server.start(port=port)  # back at the same address without its data (no persistence)
    time.sleep(STORE_RETRY_S)
    assert predict()["degraded"] is True
    redis_server.stop()
    down = predict()  # static features only, marked, never a 5xx
    assert down["degraded"] is True and down["click_probability"] == before["click_probability"]
    refused = requests.post(f"{endpoint}/events", json=events, headers=AUTH, timeout=30)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"


def test_prepare_blanks_history_only_for_a_share_of_training_rows():
    """Behaviour dropout: the store-down fallback is a case the model has seen; evaluation rows keep theirs."""
    log = behaviour_frame(click_log(400).assign(age=30), SPEC)
    manifest = {**behaviour_manifest(), "time_cutoffs": [log.timestamp.quantile(0.6), log.timestamp.quantile(0.8)]}
    prepared = CTRPreparer({**OPTIONS, "behaviour_dropout": 0.5}, manifest)(log).to_pandas()
    history = np.stack(prepared.categorical)[:, 3 : 3 + SPEC.last_n]  # after user, item, genre
    had_history = np.array([len(items) > 0 for items in log.bh_last_items])
    blank = (history < 0).all(axis=1) & had_history
    train = (prepared.split == "train").to_numpy()
    assert 0.3 < blank[train & had_history].mean() < 0.7
    assert not blank[~train].any()
    assert (prepared.status == "ok").all()


def test_the_groupby_shuffle_is_sized_to_the_cluster():
    # Ray's default (200 partitions) made 400 small shuffle tasks on 2 cores: 117 s for 60k events.
    assert behaviour.shuffle_partitions(2) == 4
    assert behaviour.shuffle_partitions(0) == 1
    assert behaviour.shuffle_partitions(10_000) == behaviour.MAX_PARTITIONS


def test_one_pass_over_many_users_matches_each_event_computed_from_its_own_past():
    """The vectorised offline path against the definition, event by event: a log of several users
    and items with same-second ties, unusable times and a user id missing."""
    log = click_log(300, seed=11)
    log.loc[[4, 90], "timestamp"] = np.nan
    log.loc[[7], "user_id"] = None
    features = behaviour_frame(log, SPEC).set_index("event_id")
    assert sorted(features.index) == sorted(log.event_id)  # nothing dropped, untimed rows included
    timed = log[np.isfinite(log.timestamp)]
    for event in log.itertuples():
        row = features.loc[event.event_id]
        if not np.isfinite(event.timestamp):
            assert row["bh_user_events_30s"] == 0 and list(row["bh_last_items"]) == []
            continue
        same_user = timed.user_id.isna() if event.user_id is None else timed.user_id == event.user_id
        mine = timed[same_user & (timed.timestamp < event.timestamp)]
        on_item = timed[(timed.item_id == event.item_id) & (timed.timestamp < event.timestamp)]
        for w, window in zip(("30s", "5m"), SPEC.user_windows_s, strict=True):
            recent = mine[mine.timestamp >= event.timestamp - window]
            assert (row[f"bh_user_events_{w}"], row[f"bh_user_clicks_{w}"]) == (len(recent), recent.click.sum()), (event.event_id, w)
        recent = on_item[on_item.timestamp >= event.timestamp - 60]
        assert (row["bh_item_events_1m"], row["bh_item_clicks_1m"]) == (len(recent), recent.click.sum())
        # Newest first; same-second events in the order Redis keeps them (by stored entry).
        entries = sorted(
            (
                (t, behaviour.encode_entry(e, i, g, c), i)
                for t, e, i, g, c in zip(mine.timestamp, mine.event_id, mine.item_id, mine.genre, mine.click, strict=True)
            ),
            reverse=True,
        )
        assert list(row["bh_last_items"]) == [i for _, _, i in entries[: SPEC.last_n]], event.event_id
        assert row["bh_user_since_last_s"] == (event.timestamp - mine.timestamp.max() if len(mine) else NO_HISTORY_S)


def test_predict_counts_a_click_log_without_computing_its_behaviour_features(ray_session, tmp_path):
    """Batch predict counts its input before scoring (the row accounting, the pool size). Counting
    the behaviour-featured rows ran the whole feature pipeline, two hash shuffles of the log, once
    more only to count (2.7-4.5 s of a 12.6 s predict of 10,000 events): the log's own rows are the
    same number, from Parquet footers or one read."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from ray_app.workloads.ctr import CTRWorkload

    pq.write_table(pa.table({"user": ["a"] * 7, "click": [0, 1] * 3 + [0]}), tmp_path / "log.parquet", row_group_size=3)
    pd.DataFrame({"user": ["b", "c"], "click": [1, 0]}).to_csv(tmp_path / "log.csv", index=False)

    def never(batch):
        raise AssertionError("the featured rows were computed to count them")

    featured = ray.data.range(9).map_batches(never)
    workload = CTRWorkload()
    assert workload.count_predict_inputs(featured, [str(tmp_path / "log.parquet")]) == 7
    assert workload.count_predict_inputs(featured, [str(tmp_path / "log.parquet"), str(tmp_path / "log.csv")]) == 9
