"""Alert rules (metrics/alerts.py): each rule kind on series with known answers, hysteresis as a property,
the definitions' validation, the commands (the statistics: test_stats.py)."""

from __future__ import annotations

import alerts_gen
import orjson
import pytest
from flywheel.metrics import alerts
from flywheel.metrics.alerts import FIRING, RESOLVED, Point, RuleState
from flywheel.metrics.definitions import DAY_MS, MetricsError, parse_metrics
from hypothesis import given
from hypothesis import strategies as st

HOUR = 3_600_000
FUNNEL = {"name": "checkout", "window": "1h", "steps": [{"event": "Product Viewed"}, {"event": "Order Completed"}]}


def alert(series: dict, rule: dict, **more):
    return parse_metrics({"funnels": [FUNNEL], "segments": [{"name": "buyers", "all": [
        {"performed": "Order Completed", "within": "7d"}]}],
        "alerts": [{"name": "a", "series": series, "rule": rule, **more}]}).alerts[0]


def hourly(values: list[float], start: int = alerts_gen.START) -> dict[int, Point]:
    return {start + i * HOUR: Point(v, v) for i, v in enumerate(values)}


# ---- threshold --------------------------------------------------------------------------------------

def test_threshold_on_a_rate_respects_the_sample_size():
    a = alert({"invalid_rate": True, "source": "any"}, {"threshold": {"above": 0.02}})
    p = alerts_gen.START
    # 1 of 20 is 5 % — but its Wilson interval reaches far below 2 %: no verdict of breach
    assert alerts.evaluate(a, {p: Point(1 / 20, 20)}, p).breach is False
    assert alerts.evaluate(a, {p: Point(50 / 1000, 1000)}, p).breach is True
    assert alerts.evaluate(a, {p: Point(15 / 1000, 1000)}, p).breach is False


def test_invalid_rate_jump_fires_and_min_count_guards():
    a = alert({"invalid_rate": True, "source": "any"}, {"threshold": {"above": 0.02}, "min_count": 100})
    rates = [(2, 400), (3, 500), (1, 300), (60, 20), (80, 500), (90, 450), (3, 400), (2, 420)]
    series = {alerts_gen.START + i * HOUR: Point(bad / n, n) for i, (bad, n) in enumerate(rates)}
    run = alerts.backtest(a, series, sorted(series))
    assert [v.breach for v, _ in run] == [False, False, False, None, True, True, False, False]
    assert [(v.period, t) for v, t in run if t] == [(alerts_gen.START + 4 * HOUR, FIRING),
                                                     (alerts_gen.START + 6 * HOUR, RESOLVED)]


def test_threshold_on_funnel_conversion():
    a = alert({"funnel": "checkout", "step": 2, "rate": True}, {"threshold": {"below": 0.05}})
    assert a.series.period == "day" and a.series.rate
    d = 20_000 * DAY_MS
    assert alerts.evaluate(a, {d: Point(0.01, 5_000)}, d).breach is True
    assert alerts.evaluate(a, {d: Point(0.01, 40)}, d).breach is False  # 0 or 1 of 40 says little


# ---- relative ---------------------------------------------------------------------------------------

def test_a_source_going_quiet_fires():
    a = alert({"events": "any", "source": "writekey:web", "period": "hour"},
              {"relative": {"vs": "previous_period", "below": -0.8}})
    series = hourly([120, 130, 118, 125, 0, 0, 3, 110, 121])
    run = alerts.backtest(a, series, sorted(series)[1:])
    # 0 against 0, 3 against 0: no relative change to judge — still firing until traffic is back
    assert [t for _, t in run] == [None, None, None, FIRING, None, None, RESOLVED, None]
    assert [v.breach for v, _ in run] == [False, False, False, True, None, None, False, False]
    quiet = run[3][0]
    assert quiet.value == 0 and quiet.baseline == 125 and quiet.score == -1.0 and quiet.lower == pytest.approx(25)


def test_relative_on_small_counts_stays_within_poisson_noise():
    a = alert({"events": "Order Completed"}, {"relative": {"below": -0.5}})
    # 4 → 1 is −75 %, but a Poisson(4) count is 1 or less one time in ten: no breach
    series = hourly([4, 1, 40, 10])
    v = alerts.evaluate(a, series, alerts_gen.START + HOUR)
    assert v.breach is False and v.lower == 1  # the 95 % Poisson interval of 4 starts at 1
    v = alerts.evaluate(a, series, alerts_gen.START + 3 * HOUR)  # 40 → 10: as large a fall, and beyond the noise
    assert v.breach is True and v.lower == 20


def test_relative_to_last_week():
    a = alert({"events": "any", "period": "day"}, {"relative": {"vs": "last_week", "above": 0.5}})
    d = 20_000 * DAY_MS
    series = {d - 7 * DAY_MS: Point(1000, 1000), d - DAY_MS: Point(5000, 5000), d: Point(1600, 1600)}
    v = alerts.evaluate(a, series, d)
    assert v.baseline == 1000 and v.breach is True


# ---- anomaly ----------------------------------------------------------------------------------------

SEASONAL = {"anomaly": {"baseline": "same_hour_of_week", "weeks": 4, "sensitivity": 3.5, "min_count": 20}}


def test_weekend_dip_with_weekly_seasonality_does_not_fire():
    a = alert({"events": "Order Completed", "period": "hour"}, SEASONAL, fire_after=2)
    naive = alert({"events": "Order Completed", "period": "hour"},
                  {"anomaly": {"baseline": "previous_periods", "periods": 12, "min_count": 20}}, fire_after=2)
    for seed in range(5):
        series, _ = alerts_gen.series(seed=seed, weeks=6)  # weekends at 40 % of weekdays
        periods = sorted(series)[4 * 168:]
        weekend = [p for p in periods if (p - alerts_gen.START) // HOUR % 168 >= 120]
        run = alerts.backtest(a, series, periods)
        assert [v.period for v, _ in run if v.breach and v.period in weekend] == []
        assert [t for _, t in run if t] == []
        # the same series against the last 12 hours (no seasonality): the weekend is "a drop"
        assert any(t == FIRING for _, t in alerts.backtest(naive, series, periods))


def test_anomalies_are_found():
    incidents = [alerts_gen.Incident("spike", 4 * 168 + 30, 3, 3.0), alerts_gen.Incident("drop", 4 * 168 + 100, 2, 0.2),
                 alerts_gen.Incident("drop", 5 * 168 + 130, 3, 0.2)]  # the last on a Saturday
    series, abnormal = alerts_gen.series(seed=3, weeks=6, incidents=incidents)
    a = alert({"events": "Order Completed", "period": "hour"}, SEASONAL)
    periods = sorted(series)[4 * 168:]
    breached = {v.period for v, _ in alerts.backtest(a, series, periods) if v.breach}
    assert breached == abnormal


def test_level_shift_is_found():
    shift = 5 * 168 + 10  # Monday of week 5, 10:00: traffic halves for good
    series, abnormal = alerts_gen.series(seed=5, weeks=6, incidents=[alerts_gen.Incident("shift", shift, 158, 0.5)])
    a = alert({"events": "Order Completed", "period": "hour"}, SEASONAL, fire_after=2, resolve_after=3)
    run = alerts.backtest(a, series, sorted(series)[4 * 168:])
    firing = [v.period for v, t in run if t == FIRING]
    assert firing[0] == alerts_gen.START + (shift + 1) * HOUR  # the second hour of it
    assert all(p in abnormal for p in firing)
    assert sum(bool(v.breach) for v, _ in run if v.period in abnormal) / len(abnormal) > 0.8


def test_a_low_volume_series_does_not_flap():
    a = alert({"events": "Order Completed", "period": "hour"}, SEASONAL)
    series, _ = alerts_gen.series(seed=11, weeks=6, level=6.0)  # a handful per hour, zeros at night
    run = alerts.backtest(a, series, sorted(series)[4 * 168:])
    assert [t for _, t in run if t] == []
    assert all(v.breach is None for v, _ in run)  # below min_count: no verdict at all
    # without the guard it does: a few events an hour are too few to judge
    unguarded = alert({"events": "Order Completed", "period": "hour"},
                      {"anomaly": {"baseline": "same_hour_of_week", "weeks": 4}})
    assert [t for _, t in alerts.backtest(unguarded, series, sorted(series)[4 * 168:]) if t]


def test_anomaly_needs_a_baseline():
    a = alert({"events": "Order Completed", "period": "hour"}, SEASONAL)
    series = hourly([100] * 24)
    v = alerts.evaluate(a, series, alerts_gen.START + 23 * HOUR)
    assert v.breach is None and "baseline" in v.reason


@given(st.lists(st.integers(0, 1000), min_size=4, max_size=12), st.integers(0, 5000))
def test_anomaly_bounds_contain_the_median_and_decide_the_breach(base, value):
    a = alert({"events": "Order Completed", "period": "hour"},
              {"anomaly": {"baseline": "previous_periods", "periods": len(base)}})
    series = hourly([*base, value])
    v = alerts.evaluate(a, series, alerts_gen.START + len(base) * HOUR)
    assert v.lower < v.baseline < v.upper
    assert v.breach == (value < v.lower or value > v.upper)
    assert v.upper - v.baseline >= 3.5 * max(1.0, v.baseline) ** 0.5 - 1e-9  # never tighter than Poisson noise


# ---- hysteresis -------------------------------------------------------------------------------------

@given(st.lists(st.sampled_from([True, False, None]), max_size=60), st.integers(1, 4), st.integers(1, 4))
def test_hysteresis(breaches, fire_after, resolve_after):
    a = alert({"events": "any"}, {"threshold": {"above": 1}}, fire_after=fire_after, resolve_after=resolve_after)
    state, transitions = RuleState(), []
    firing, run = False, 0
    for i, b in enumerate(breaches):
        state, t = alerts.step(a, state, alerts.Verdict(i, b))
        # the reference: count the run of periods pointing away from the current state
        want = None
        if b is not None:  # no verdict: the run neither grows nor breaks
            run = 0 if b == firing else run + 1
        if run >= (resolve_after if firing else fire_after):
            firing, run = not firing, 0
            want = FIRING if firing else RESOLVED
        assert t == want
        assert state.firing == firing and state.last == i
        if t:
            transitions.append(t)
    assert transitions == [FIRING, RESOLVED] * (len(transitions) // 2) + [FIRING] * (len(transitions) % 2)


def test_state_round_trips_json():
    s = RuleState(True, 1, 5, 9)
    assert RuleState.from_json(s.to_json()) == s


# ---- closing periods --------------------------------------------------------------------------------

def test_closable_waits_for_the_grace_and_goes_in_order():
    a = alert({"events": "any", "period": "hour"}, {"threshold": {"above": 1}}, grace="5m")
    t0 = alerts_gen.START
    assert alerts.newest_closed(a, t0 + 2 * HOUR + 4 * 60_000) == t0
    assert alerts.closable(a, t0, t0 + 2 * HOUR + 4 * 60_000) == []
    assert alerts.closable(a, t0, t0 + 2 * HOUR + 5 * 60_000) == [t0 + HOUR]
    assert alerts.closable(a, t0, t0 + 5 * HOUR + 5 * 60_000) == [t0 + i * HOUR for i in (1, 2, 3, 4)]


def test_weekly_periods_start_on_monday():
    a = parse_metrics({"retention": [{"name": "r", "period": "week", "horizon": 4}],
                       "alerts": [{"name": "w", "series": {"retention": "r", "n": 1},
                                   "rule": {"threshold": {"below": 0.1}}}]}).alerts[0]
    assert a.series.period == "week" and a.series.rate
    monday = alerts_gen.START
    assert a.series.period_of(monday + 3 * DAY_MS + 5) == monday


# ---- records ----------------------------------------------------------------------------------------

def test_transition_record_and_its_key():
    a = alert({"events": "Order Completed", "period": "hour"}, {"threshold": {"below": 10}})
    v = alerts.evaluate(a, hourly([3]), alerts_gen.START)
    state, t = alerts.step(a, RuleState(), v)
    rec = alerts.transition_record(a, t, v, state=state, decided_at=alerts_gen.START + HOUR, late=False)
    assert rec["state"] == FIRING and rec["value"] == 3 and rec["upper"] is None and rec["lower"] == 10
    assert rec["series"] == {"kind": "events", "period": "hour", "event": "Order Completed"}
    assert rec["idempotencyKey"] == alerts.idempotency_key(a, FIRING, alerts_gen.START)
    assert alerts.idempotency_key(a, RESOLVED, alerts_gen.START) != rec["idempotencyKey"]
    assert "a firing: 3 for the hour from" in alerts.text(rec)


# ---- definitions ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("series", "rule", "message"), [
    ({"funnel": "nope", "step": 1}, {"threshold": {"below": 1}}, "no funnel named 'nope'"),
    ({"funnel": "checkout", "step": 3}, {"threshold": {"below": 1}}, "has 2 steps"),
    ({"funnel": "checkout"}, {"threshold": {"below": 1}}, "needs step"),
    ({"segment": "nope"}, {"threshold": {"below": 1}}, "no segment named 'nope'"),
    ({"events": "x", "funnel": "checkout", "step": 1}, {"threshold": {"below": 1}}, "exactly one of events"),
    ({"events": "x", "period": "day"}, {"anomaly": {"baseline": "same_hour_of_week"}}, "needs period hour"),
    ({"events": "x"}, {"threshold": {}}, "give above, below or both"),
    ({"events": "x"}, {"threshold": {"above": 1}, "relative": {"above": 1}}, "exactly one of threshold"),
    ({"active": "dau", "period": "hour"}, {"threshold": {"below": 1}}, "daily"),
    ({"events": "x", "step": 2}, {"threshold": {"below": 1}}, "funnel series only"),
])
def test_invalid_alerts_are_refused_with_the_place(series, rule, message):
    with pytest.raises(MetricsError, match=message):
        alert(series, rule)


def test_versions_follow_meaning_not_delivery():
    one = alert({"events": "x"}, {"threshold": {"above": 1}})
    other_hook = alert({"events": "x"}, {"threshold": {"above": 1}}, notify=[{"webhook": "http://127.0.0.1:1/h"}])
    other_rule = alert({"events": "x"}, {"threshold": {"above": 2}})
    assert one.version == other_hook.version != other_rule.version


def test_describe():
    a = alert({"events": "Order Completed", "period": "hour"}, SEASONAL, fire_after=2,
              notify=[{"webhook": "http://127.0.0.1:9999/hook"}])
    assert alerts.describe(a) == (
        "events Order Completed from any source per hour: anomaly vs same hour of week over 4 weeks, |z| > 3.5 "
        "(both), min_count 20; fires after 2, resolves after 1; grace 120 s; notify http://127.0.0.1:9999/hook")


# ---- the commands, over a store ----------------------------------------------------------------------


def test_backtest_and_list_commands(ch, tmp_path, monkeypatch):
    """`flywheel alerts backtest` recomputes the series from the stored events (oracle.alert_series_sql) and
    judges it with the stream's rule code; `alerts list` shows each rule's latest transition."""
    from datetime import UTC, datetime

    import orjson
    from flywheel import cli as cli_module
    from flywheel.cli import cli
    from flywheel.model.rows import alert_row
    from helpers import load_stream
    from typer.testing import CliRunner

    counts = [12, 11, 13, 2, 1, 12, 14]  # orders per hour from START: a drop in hours 3 and 4
    rows = []
    for hour, n in enumerate(counts):
        for i in range(n):
            ts = datetime.fromtimestamp((alerts_gen.START + hour * HOUR + i * 1000) / 1000, tz=UTC)
            rows.append({"message_id": f"m{hour}-{i}", "type": "track", "event": "Order Completed",
                         "anonymous_id": "", "user_id": f"u{i}", "person_id": f"u{i}", "previous_id": "",
                         "group_id": "", "timestamp": ts, "received_at": ts, "sent_at": None, "properties": "{}",
                         "traits": "{}", "context": "{}", "source": "web", "late": 0})
    load_stream(ch, rows)
    metrics_file = tmp_path / "metrics.yaml"
    metrics_file.write_text(orjson.dumps({"alerts": [
        {"name": "orders_drop", "series": {"events": "Order Completed", "period": "hour"},
         "rule": {"relative": {"below": -0.5}}, "resolve_after": 1},
        {"name": "quiet", "series": {"events": "any", "source": "web"}, "rule": {"threshold": {"below": 1}}},
    ]}).decode())
    monkeypatch.setattr(cli_module, "_query", lambda settings: ch.rows)
    monkeypatch.setenv("FLYWHEEL_METRICS", str(metrics_file))
    runner = CliRunner()
    out = runner.invoke(cli, ["alerts", "backtest", "orders_drop", "--from", "2024-09-30T01:00Z",
                              "--to", "2024-09-30T07:00Z"])
    assert out.exit_code == 0, out.output
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    # 2 against 13: down 85 % and beyond Poisson(13): firing; 1 against 2 is within the noise of 2: clear
    assert [line.split()[:2] for line in lines] == [["2024-09-30T03:00:00.000Z", "FIRING"],
                                                     ["2024-09-30T04:00:00.000Z", "RESOLVED"]]
    assert "fired 1 times in 6 hours" in out.stderr
    every = runner.invoke(cli, ["alerts", "backtest", "orders_drop", "--from", "2024-09-30", "--to",
                                "2024-09-30T07:00Z", "--all", "--json"])
    verdicts = [orjson.loads(line) for line in every.stdout.splitlines()]
    assert [v["value"] for v in verdicts] == [float(n) for n in counts]
    assert verdicts[0]["breach"] is None and verdicts[0]["reason"] == "baseline is zero: no relative change"
    missing = runner.invoke(cli, ["alerts", "backtest", "nope", "--from", "2024-09-30", "--to", "2024-10-01"])
    assert missing.exit_code == 1 and "no alert 'nope'" in missing.output

    ch.command("TRUNCATE TABLE flywheel.alert_events")
    a = parse_metrics(orjson.loads(metrics_file.read_text())).alerts[0]
    series = {alerts_gen.START + h * HOUR: Point(n, n) for h, n in enumerate(counts)}
    state = RuleState()
    for period in sorted(series)[1:4]:
        verdict = alerts.evaluate(a, series, period)
        state, t = alerts.step(a, state, verdict)
        if t:
            rec = alerts.transition_record(a, t, verdict, state=state, decided_at=period + 2 * HOUR, late=False)
            ch.insert("flywheel.alert_events", [alert_row(orjson.loads(orjson.dumps(rec)))])
    listed = runner.invoke(cli, ["alerts", "list"])
    assert listed.exit_code == 0, listed.output
    assert "orders_drop: FIRING since the hour from 2024-09-30 03:00:00" in listed.stdout
    assert "quiet: never fired" in listed.stdout


def test_segment_size_series_from_the_published_changes(ch):
    """oracle.alert_series_sql for a segment: members at each period's end, from segment_changes (the latest
    change per person by offset), as the backtest reads them."""
    import orjson
    from flywheel.metrics.oracle import alert_series_sql
    from flywheel.metrics.segments import audience_record
    from flywheel.model.envelope import AUDIENCE_ENTERED, AUDIENCE_EXITED
    from flywheel.model.rows import audience_row

    m = parse_metrics({"segments": [{"name": "buyers", "all": [{"performed": "Order Completed", "within": "7d"}]}],
                       "alerts": [{"name": "s", "series": {"segment": "buyers", "period": "hour"},
                                   "rule": {"threshold": {"below": 1}}}]})
    t0 = alerts_gen.START
    changes = [(AUDIENCE_ENTERED, "u1", t0 + 10), (AUDIENCE_ENTERED, "u2", t0 + HOUR + 5),
               (AUDIENCE_EXITED, "u1", t0 + 2 * HOUR + 1), (AUDIENCE_ENTERED, "u1", t0 + 3 * HOUR + 1)]
    ch.command("TRUNCATE TABLE flywheel.segment_changes")
    for offset, (event, person, at) in enumerate(changes):
        _, rec = audience_record(event, "buyers", "v1", person, user=True, at=at, since=at)
        ch.insert("flywheel.segment_changes", [audience_row(orjson.loads(orjson.dumps(rec)), 0, offset)])
    start, end = t0, t0 + 5 * HOUR
    points = alerts.history_points(m.alerts[0], ch.rows(alert_series_sql(m.alerts[0], m, start, end))[1], start, end)
    assert [p.value for _, p in sorted(points.items())] == [1, 2, 1, 2, 2]


def test_tally_counts_once_and_forgets_long_closed_periods():
    a = alert({"events": "Order Completed", "period": "hour"}, {"threshold": {"below": 1}})
    t0 = alerts_gen.START
    t = alerts.Tally(a)
    for offset in (1, 2, 3):
        t.count(offset, t0 + offset, t0 + offset, False)
    t.count(2, t0 + 2, t0 + 2, False)  # a redelivery
    assert t.periods == {t0: [3]} and t.offset == 3
    t.count(4, t0 + 3 * DAY_MS, t0 + 3 * DAY_MS, False)  # three days on: the first hour is long judged
    assert t.periods == {t0 + 3 * DAY_MS: [1]}
    t.count(5, t0 + 5, t0 + 3 * DAY_MS, False)  # a straggler for it: not counted
    assert t.periods == {t0 + 3 * DAY_MS: [1]} and t.changed == {t0 + 3 * DAY_MS}
    again = alerts.Tally(a, orjson.loads(orjson.dumps(t.to_json())))
    assert (again.offset, again.floor, again.periods) == (5, t.floor, t.periods)
    changed = alert({"events": "Order Completed", "period": "hour"}, {"threshold": {"below": 2}})
    assert alerts.Tally(changed, t.to_json()).periods == {}  # another version counts afresh
    weekly = alert({"invalid_rate": True, "period": "week"}, {"threshold": {"above": 0.5}})
    w = alerts.Tally(weekly)
    w.count(1, 0, t0 + 3 * DAY_MS, True)  # by arrival (an invalid event has no usable time), weeks from Monday
    w.count(2, 0, t0 + 4 * DAY_MS, False)
    assert w.periods == {t0: [1, 2]}
    assert w.share("i0")["periods"] == {str(t0): {"v": 1, "b": 2}}
