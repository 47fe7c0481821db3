"""The one definition of the click workload's behaviour features, for both paths:

- offline (training, batch backfill checks): ``add_behaviour_features`` computes each row's features
  from the events strictly before it, per user and per item, with Ray Data (``groupby`` +
  ``map_groups``: a user's events are sorted by time inside one group);
- online (serving): ``ray_app.features.online_store.OnlineStore`` keeps the same history in Redis as
  events arrive and ``assemble`` turns what it reads into the same columns.

Features of an event by user ``u`` on item ``i`` at time ``t`` (seconds), all from events with time
``< t`` (an event at the same second is not "before"):

- ``bh_last_items`` / ``bh_last_categories`` / ``bh_last_clicks``: the user's last ``last_n``
  events, newest first (ties in time broken by the stored member string, as Redis orders them);
- ``bh_user_events_<w>``, ``bh_user_clicks_<w>``, ``bh_user_click_rate_<w>``: the user's events and
  clicks in ``[t - w, t)`` per window ``w``, and the smoothed rate ``(clicks + 1) / (events + 2)``;
- ``bh_user_since_last_s``: ``t`` minus the time of the user's last event (``NO_HISTORY_S`` if none);
- ``bh_item_events_<w>``, ``bh_item_clicks_<w>``, ``bh_item_click_rate_<w>``: the same over every
  user's events on item ``i`` (recency and popularity).

Late and out-of-order events: history is kept by event time, not arrival time, so an event that
arrives late takes its place in the timeline and every later read sees it exactly as the offline
path does; a read is always "as of" the request's time, so an event stamped after it is never seen.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import ray.data

PREFIX = "bh_"
SEQUENCE_ITEMS, SEQUENCE_CATEGORIES, SEQUENCE_CLICKS = "bh_last_items", "bh_last_categories", "bh_last_clicks"
# "Never seen before": far beyond any window, so the model reads it as "no recent activity".
NO_HISTORY_S = 10 * 365 * 86400.0
SEPARATOR = "\x1f"  # between the fields of one stored history entry (unit separator: not in ids)


def window_name(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True)
class BehaviourSpec:
    """Which log columns hold the user, item, category, time, click and event id; how much history."""

    user_column: str
    item_column: str
    time_column: str
    label_column: str
    event_column: str
    category_column: str | None = None
    last_n: int = 10
    user_windows_s: tuple[int, ...] = (3600, 86400, 7 * 86400)
    item_windows_s: tuple[int, ...] = (86400, 7 * 86400)

    def __post_init__(self) -> None:
        if self.last_n < 1 or not self.user_windows_s or not self.item_windows_s:
            raise ValueError("behaviour features need last_n >= 1 and at least one user and one item window")
        object.__setattr__(self, "user_windows_s", tuple(int(w) for w in self.user_windows_s))
        object.__setattr__(self, "item_windows_s", tuple(int(w) for w in self.item_windows_s))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BehaviourSpec:
        return cls(**values)

    def numeric_columns(self) -> list[str]:
        columns = []
        for w in map(window_name, self.user_windows_s):
            columns += [f"bh_user_events_{w}", f"bh_user_clicks_{w}", f"bh_user_click_rate_{w}"]
        columns.append("bh_user_since_last_s")
        for w in map(window_name, self.item_windows_s):
            columns += [f"bh_item_events_{w}", f"bh_item_clicks_{w}", f"bh_item_click_rate_{w}"]
        return columns

    def sequence_columns(self) -> list[str]:
        return [SEQUENCE_ITEMS, SEQUENCE_CATEGORIES, SEQUENCE_CLICKS]

    def columns(self) -> list[str]:
        return self.numeric_columns() + self.sequence_columns()

    def event_fields(self) -> list[str]:
        """The log columns an event must carry to update the history."""
        return [self.event_column, self.user_column, self.item_column, self.time_column, self.label_column] + (
            [self.category_column] if self.category_column else []
        )


def click_rate(clicks: Any, events: Any) -> Any:
    """Smoothed (Laplace) so a user with one event is not "100 %"."""
    return (np.asarray(clicks, dtype=np.float64) + 1.0) / (np.asarray(events, dtype=np.float64) + 2.0)


def encode_entry(event_id: str, item: str, category: str, click: int) -> str:
    """One history entry as stored (a Redis sorted-set member; its time is the score)."""
    return SEPARATOR.join((str(event_id), str(item), str(category), str(int(click))))


def decode_entry(entry: str) -> tuple[str, str, int]:
    """(item, category, click) of a stored entry."""
    _, item, category, click = entry.rsplit(SEPARATOR, 3)
    return item, category, int(click)


def assemble(
    spec: BehaviourSpec,
    t: float,
    recent: Sequence[tuple[str, float]],
    user_counts: Sequence[tuple[int, int]],
    item_counts: Sequence[tuple[int, int]],
) -> dict[str, Any]:
    """One event's features from what its history holds: ``recent`` = up to ``last_n`` (entry,
    time) newest first, all before ``t``; ``user_counts`` / ``item_counts`` = (events, clicks) per
    window in ``[t - w, t)``. Both paths end here, so they cannot drift apart in the arithmetic."""
    row: dict[str, Any] = {}
    for w, (events, clicks) in zip(map(window_name, spec.user_windows_s), user_counts, strict=True):
        row[f"bh_user_events_{w}"], row[f"bh_user_clicks_{w}"] = float(events), float(clicks)
        row[f"bh_user_click_rate_{w}"] = float(click_rate(clicks, events))
    row["bh_user_since_last_s"] = float(t - recent[0][1]) if recent else NO_HISTORY_S
    for w, (events, clicks) in zip(map(window_name, spec.item_windows_s), item_counts, strict=True):
        row[f"bh_item_events_{w}"], row[f"bh_item_clicks_{w}"] = float(events), float(clicks)
        row[f"bh_item_click_rate_{w}"] = float(click_rate(clicks, events))
    decoded = [decode_entry(entry) for entry, _ in recent[: spec.last_n]]
    row[SEQUENCE_ITEMS] = [item for item, _, _ in decoded]
    row[SEQUENCE_CATEGORIES] = [category for _, category, _ in decoded]
    row[SEQUENCE_CLICKS] = [click for _, _, click in decoded]
    return row


def empty_history(spec: BehaviourSpec, n: int) -> dict[str, list[Any]]:
    """Columns for ``n`` events with no known history: what serving falls back to when the store is
    down (the model also learns this case, from first events and from behaviour dropout)."""
    row = assemble(spec, 0.0, [], [(0, 0)] * len(spec.user_windows_s), [(0, 0)] * len(spec.item_windows_s))
    return {name: [list(value) if isinstance(value, list) else value for _ in range(n)] for name, value in row.items()}


# ---- offline: point-in-time over a log ------------------------------------------------------------
def _clicks_of(raw: pd.Series) -> np.ndarray:
    """A label that is not exactly 1 counts as "no click" in the history (prepare rejects the row)."""
    return (pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan) == 1.0).astype(np.int64)


def _ordered(group: pd.DataFrame, spec: BehaviourSpec) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """Rows with a usable time, sorted by (time, stored entry) as Redis orders a sorted set."""
    times = pd.to_numeric(group[spec.time_column], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    clicks = _clicks_of(group[spec.label_column])
    categories = group[spec.category_column].astype(str) if spec.category_column else pd.Series([""] * len(group), index=group.index)
    entries = [
        encode_entry(e, i, c, k)
        for e, i, c, k in zip(group[spec.event_column].astype(str), group[spec.item_column].astype(str), categories, clicks, strict=True)
    ]
    order = pd.DataFrame({"t": times, "entry": entries}).sort_values(["t", "entry"], kind="stable").index.to_numpy()
    order = order[np.isfinite(times[order])]
    return group.iloc[order], times[order], clicks[order], np.asarray(entries, dtype=object)[order]


def _untimed(group: pd.DataFrame, spec: BehaviourSpec, columns: list[str]) -> pd.DataFrame:
    """Rows without a usable time: no place in the timeline, so no history (and they are not history
    for others); kept, with empty features, so prepare still rejects them with a reason."""
    times = pd.to_numeric(group[spec.time_column], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    rows = group[~np.isfinite(times)].reset_index(drop=True)
    empty = empty_history(spec, len(rows))
    return pd.concat([rows, pd.DataFrame({c: empty[c] for c in columns}, index=rows.index)], axis=1)


def _window_counts(times: np.ndarray, clicks: np.ndarray, windows: Sequence[int]) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Per row: how many rows are strictly earlier (``before``), and (events, clicks) in [t - w, t)."""
    before = np.searchsorted(times, times, side="left")
    cumulative = np.concatenate([[0], np.cumsum(clicks)])
    counts = []
    for w in windows:
        start = np.searchsorted(times, times - w, side="left")
        counts.append((before - start, cumulative[before] - cumulative[start]))
    return before, counts


def user_history_features(group: pd.DataFrame, spec: BehaviourSpec) -> pd.DataFrame:
    """One user's events (any order) with the user features added: ``map_groups`` body."""
    rows, times, clicks, entries = _ordered(group, spec)
    before, counts = _window_counts(times, clicks, spec.user_windows_s)
    out = rows.reset_index(drop=True).copy()
    features = []
    for k in range(len(rows)):
        recent = [(entries[j], times[j]) for j in range(before[k] - 1, max(before[k] - spec.last_n, 0) - 1, -1)]
        user_counts = [(int(e[k]), int(c[k])) for e, c in counts]
        row = assemble(spec, times[k], recent, user_counts, [(0, 0)] * len(spec.item_windows_s))
        features.append({name: row[name] for name in row if not name.startswith("bh_item_")})
    columns = [c for c in spec.columns() if not c.startswith("bh_item_")]
    timed = pd.concat([out, pd.DataFrame(features, columns=columns)], axis=1)
    return pd.concat([timed, _untimed(group, spec, columns)], ignore_index=True)


def item_history_features(group: pd.DataFrame, spec: BehaviourSpec) -> pd.DataFrame:
    """One item's events with the item features added: ``map_groups`` body."""
    rows, times, clicks, _ = _ordered(group, spec)
    _, counts = _window_counts(times, clicks, spec.item_windows_s)
    out = rows.reset_index(drop=True).copy()
    for w, (events, clicked) in zip(map(window_name, spec.item_windows_s), counts, strict=True):
        out[f"bh_item_events_{w}"] = events.astype(np.float64)
        out[f"bh_item_clicks_{w}"] = clicked.astype(np.float64)
        out[f"bh_item_click_rate_{w}"] = click_rate(clicked, events)
    return pd.concat([out, _untimed(group, spec, [c for c in spec.numeric_columns() if c.startswith("bh_item_")])], ignore_index=True)


def behaviour_frame(frame: pd.DataFrame, spec: BehaviourSpec) -> pd.DataFrame:
    """The offline path on an in-memory log (no Ray): the same group functions ``add_behaviour_features``
    runs per group."""
    users = [user_history_features(g, spec) for _, g in frame.groupby(spec.user_column, sort=False)]
    with_users = pd.concat(users, ignore_index=True) if users else frame.iloc[:0]
    items = [item_history_features(g, spec) for _, g in with_users.groupby(spec.item_column, sort=False)]
    return pd.concat(items, ignore_index=True) if items else with_users


# Hash-shuffle partitions per CPU for the two groupbys. Ray's default is 200 whatever the cluster:
# on 2 cores that made 400 small shuffle tasks, and 60k events took 117 s to prepare.
PARTITIONS_PER_CPU = 2
MAX_PARTITIONS = 200


def shuffle_partitions(cluster_cpus: float) -> int:
    return max(1, min(MAX_PARTITIONS, int(PARTITIONS_PER_CPU * cluster_cpus)))


def add_behaviour_features(ds: ray.data.Dataset, spec: BehaviourSpec) -> ray.data.Dataset:
    """The offline path with Ray Data: group by user (each group's events sorted by time), then by
    item, each row getting features from the events strictly before it."""
    import ray

    partitions = shuffle_partitions(ray.cluster_resources().get("CPU", 1))
    by_user = ds.groupby(spec.user_column, num_partitions=partitions).map_groups(
        functools.partial(user_history_features, spec=spec), batch_format="pandas"
    )
    return by_user.groupby(spec.item_column, num_partitions=partitions).map_groups(
        functools.partial(item_history_features, spec=spec), batch_format="pandas"
    )
