"""metrics/exposures.py against ClickHouse (oracle.experiment_stats_sql), in chdb: per variation and metric the
same sufficient statistics on random stitched streams — first exposure anchors, windows, persons in two
variations excluded, an anonymous exposure converting after sign-up counted once for the user."""

from __future__ import annotations

from experiments_gen import EXPERIMENT, event_st, rows_and_persons
from flywheel.metrics import exposures, oracle
from flywheel.metrics.exposures import Event
from flywheel.metrics.person import message_hash
from helpers import load_stream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def oracle_stats(ch) -> tuple[dict, int]:
    _, rows = ch.rows(oracle.experiment_stats_sql(EXPERIMENT))
    stats = {(r[0], r[1]): dict(zip(exposures.STATS, map(int, r[2:11]), strict=True)) for r in rows}
    return stats, int(rows[0][11]) if rows else 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(event_st, min_size=1, max_size=60))
def test_sufficient_statistics_equal_clickhouse(ch, events):
    rows, persons = rows_and_persons(events)
    load_stream(ch, rows)
    ours, excluded = exposures.sufficient(EXPERIMENT, persons.values())
    theirs, their_excluded = oracle_stats(ch)
    assert ours == theirs
    if theirs:
        assert excluded == their_excluded


def test_a_known_stream(ch):
    """u1 sees green anonymously, signs up and buys twice within 2 days (once 3 days later: too late); u2 sees
    control, then blue: excluded; u3 buys before seeing control: nothing counts, but for CUPED's covariate (the
    metric over the day before the exposure)."""
    events = [  # (person, device, hours after T0, kind, variation or revenue index, another experiment)
        (1, 1, 0, "exposure", 1, False), (1, 0, 5, "order", 0, False), (1, 0, 6, "checkout", 0, False),
        (1, 1, 30, "order", 1, False), (1, 0, 80, "order", 5, False), (1, 0, 1, "view_shoes", 0, False),
        (2, 0, 0, "exposure", 0, False), (2, 0, 3, "exposure", 2, False), (2, 0, 4, "order", 0, False),
        (3, 0, 1, "order", 0, False), (3, 0, 2, "exposure", 0, False), (3, 0, 2, "exposure", 4, True),
    ]
    rows, persons = rows_and_persons(events)
    load_stream(ch, rows)
    ours, excluded = exposures.sufficient(EXPERIMENT, persons.values())
    assert excluded == 1
    def stats(**values: int) -> dict[str, int]:
        return dict.fromkeys(exposures.STATS, 0) | values

    assert ours[("green", "purchased")] == stats(n=1, sy=1, syy=1)
    assert ours[("green", "revenue")]["sy"] == round(19.99 * 1e6) + 5 * 10**6  # two orders within 2 days
    assert ours[("green", "orders_per_checkout")] == stats(n=1, sy=2, syy=4, sx=1, sxx=1, sxy=2)
    assert ours[("green", "shoe_views")]["sy"] == 1
    assert ours[("control", "purchased")] == stats(n=1, sp=1, spp=1)  # bought an hour before the exposure
    assert ours[("control", "revenue")] == stats(n=1, sp=19_990_000, spp=19_990_000 ** 2)
    assert ("blue", "purchased") not in ours
    assert oracle_stats(ch) == (ours, 1)


@settings(max_examples=60, deadline=None)
@given(st.lists(event_st, min_size=1, max_size=60), st.randoms(use_true_random=False))
def test_tracks_kept_per_device_and_merged_equal_the_whole_history(events, rng):
    """What the stream will keep (exposures.Track): each device's events observed in any order, some twice
    (redeliveries), then the devices merged into their user in any order — the same statistics as over the
    person's whole history."""
    _, persons = rows_and_persons(events)
    by_device: dict[str, list[Event]] = {}
    for i, (person, device, *_rest) in enumerate(events):
        owner = f"u{person}" if device == 0 else f"u{person}-d{device}"
        by_device.setdefault(owner, []).append(next(e for e in persons[f"u{person}"] if e.message_id == f"m{i}"))
    tracks: dict[str, exposures.Track] = {}
    for owner, evs in by_device.items():
        track = exposures.Track.empty()
        replay = evs + rng.sample(evs, k=len(evs) // 3)  # redeliveries
        rng.shuffle(replay)
        for e in replay:
            exposures.observe(track, exposures.index([EXPERIMENT]), e, message_hash(e.message_id))
        tracks[owner] = track
    want, excluded = exposures.sufficient(EXPERIMENT, persons.values())
    got: dict = {}
    got_excluded = 0
    for user in persons:
        devices = [t for owner, t in tracks.items() if owner.split("-")[0] == user]
        rng.shuffle(devices)
        merged = exposures.Track.empty()
        for t in devices:
            merged = exposures.merge(merged, t)
        result = exposures.track_values(EXPERIMENT, merged)
        if result is None:
            continue
        variation, values = result
        if variation is None:
            got_excluded += 1
            continue
        for name, (y, x, p) in values.items():
            s = got.setdefault((variation, name), dict.fromkeys(exposures.STATS, 0))
            for k, v in zip(exposures.STATS, (1, y, y * y, x, x * x, x * y, p, p * p, p * y), strict=True):
                s[k] += v
    assert got == want and got_excluded == excluded
