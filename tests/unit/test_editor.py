"""web/editor.py: the UI's forms ↔ definitions (docs/design.md §13). A definition the form can show comes back
from it unchanged (hypothesis); what the form cannot express is refused with a reason, never guessed."""

from __future__ import annotations

import pytest
from flywheel.config import Settings
from flywheel.metrics.definitions import parse_metrics
from flywheel.model.plan import load_plan
from flywheel.web import editor
from hypothesis import given, settings
from hypothesis import strategies as st

EVENTS = st.sampled_from(["Product Viewed", "Order Completed", "Signed Up", "Home"])
VALUES = st.one_of(st.sampled_from(["shoes", "a b", "x"]), st.integers(-5, 500), st.booleans(),
                   st.sampled_from([1.5, 0.25]))
DURATIONS = st.builds(lambda n, u: f"{n}{u}", st.integers(1, 90), st.sampled_from(["m", "h", "d"]))
WHERE = st.one_of(st.just({}), st.dictionaries(st.sampled_from(["category", "plan", "price"]), VALUES,
                                               min_size=1, max_size=1))


def step():
    return st.builds(lambda e, w: {"event": e, **({"where": w} if w else {})}, EVENTS, WHERE)


FUNNELS = st.builds(lambda steps, window: {"name": "f_1", "window": window, "steps": steps},
                    st.lists(step(), min_size=2, max_size=editor.MAX_STEPS), DURATIONS)
RETENTION = st.builds(lambda c, r, p, h: {"name": "r.2", "cohort_event": c, "return_event": r, "period": p,
                                         "horizon": h},
                      st.one_of(st.just("any"), EVENTS), st.one_of(st.just("any"), EVENTS),
                      st.sampled_from(["day", "week"]), st.integers(1, 31))


def condition():
    def build(how, event, where, count, within):
        c = {how: event}
        if where:
            c["where"] = where
        if how == "performed" and count > 1:
            c["count"] = {"gte": count}
        c["within"] = within
        return c
    return st.builds(build, st.sampled_from(["performed", "not_performed"]), st.one_of(st.just("any"), EVENTS),
                     WHERE, st.integers(1, 5), DURATIONS)


SEGMENTS = st.builds(lambda mode, cs: {"name": "s-3", mode: cs}, st.sampled_from(["all", "any"]),
                     st.lists(condition(), min_size=1, max_size=editor.MAX_CONDITIONS))


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.tuples(st.just("funnels"), FUNNELS), st.tuples(st.just("retention"), RETENTION),
                 st.tuples(st.just("segments"), SEGMENTS)))
def test_a_definition_the_form_can_show_comes_back_unchanged(case):
    kind, spec = case
    assert editor.editable(kind, spec)
    assert editor.spec_from_form(kind, editor.form_from_spec(kind, spec)) == spec
    parse_metrics({kind: [spec]})  # and it is a valid definition


@pytest.mark.parametrize(("kind", "form", "why"), [
    ("funnels", {"name": "f", "step1_event": "A", "window_n": "1", "window_unit": "d"}, "at least two steps"),
    ("funnels", {"name": "f", "step1_event": "A", "step2_event": "B", "window_n": "0", "window_unit": "d"},
     "conversion window"),
    ("funnels", {"name": "f", "step1_event": "A", "step1_prop": "category", "step2_event": "B", "window_n": "1",
                 "window_unit": "d"}, "needs a value"),
    ("funnels", {"step1_event": "A", "step2_event": "B", "window_n": "1", "window_unit": "d"}, "name is missing"),
    ("retention", {"name": "r", "horizon": "x"}, "horizon"),
    ("segments", {"name": "s"}, "at least one condition"),
    ("segments", {"name": "s", "cond1_event": "A", "cond1_within_n": "1", "cond1_within_unit": "y"}, "within"),
    ("settings", {"name": "e"}, "cannot be edited here"),
    ("experiments", {"name": "e"}, "experiment id"),
    ("experiments", {"name": "e", "experiment_id": "x", "v1_name": "a", "v1_share": "1"}, "two variations"),
    ("experiments", {"name": "e", "experiment_id": "x", "v1_name": "a", "v1_share": "0.5", "v2_name": "b",
                     "v2_share": "0.5"}, "control"),
    ("alerts", {"name": "a"}, "what the rule watches"),
    ("alerts", {"name": "a", "series_kind": "events", "rule_kind": "x"}, "the rule"),
    ("alerts", {"name": "a", "series_kind": "funnel", "series_step": "two", "rule_kind": "threshold"}, "step"),
    ("alerts", {"name": "a", "series_kind": "events", "rule_kind": "threshold", "rule_above": "nan"}, "finite"),
])
def test_a_form_that_says_too_little_is_refused_with_the_reason(kind, form, why):
    with pytest.raises(editor.FormError, match=why):
        editor.spec_from_form(kind, form)


def test_what_the_form_cannot_show_is_left_to_the_metrics_file():
    two_filters = {"name": "f", "window": "1d", "steps": [{"event": "A", "where": {"a": 1, "b": 2}}, {"event": "B"}]}
    assert not editor.editable("funnels", two_filters)
    nested = {"name": "s", "all": [{"any": [{"performed": "A", "within": "1d"}]}]}
    assert not editor.editable("segments", nested)
    assert not editor.editable("segments", {"name": "s", "all": [{"trait": {"plan": "pro"}}]})
    assert not editor.editable("segments", {"name": "s", "all": [{"performed": "A", "count": {"lte": 2},
                                                                   "within": "1d"}]})


def test_pickers_offer_the_tracking_plan_then_what_clickhouse_has_seen():
    plan = load_plan(Settings().tracking_plan)
    events, properties = editor.pickers(plan, [("Home", 9), ("Product Viewed", 5)], [("utm_source", 3),
                                                                                      ("category", 2)])
    assert events[:len(plan.events)] == sorted(plan.events) and events[len(plan.events):] == ["Home"]
    assert "category" in properties and properties[-1] == "utm_source" and properties.count("category") == 1


def test_previews_are_tables_of_what_the_oracle_said():
    m = parse_metrics({"funnels": [{"name": "f", "window": "1d", "steps": [{"event": "A"}, {"event": "B"}]}],
                       "retention": [{"name": "r", "cohort_event": "A", "return_event": "B", "horizon": 2}]})
    f = editor.definition(m, "funnels", "f")
    assert editor.preview_table("funnels", f, [("2026-11-30", 1, 5), ("2026-11-30", 2, 2), ("2026-12-01", 1, 1)]) == {
        "head": ["day", "1. A", "2. B"], "rows": [["2026-12-01", 1, 0], ["2026-11-30", 5, 2]]}
    r = editor.definition(m, "retention", "r")
    assert editor.preview_table("retention", r, [("2026-11-30", 0, 4, 4), ("2026-11-30", 2, 1, 4)]) == {
        "head": ["cohort", "size", "+1", "+2"], "rows": [["2026-11-30", 4, 0, 1]]}
    assert "windowFunnel" in editor.preview_sql("funnels", f, m, 0)


def alert_spec():
    series = st.one_of(
        st.builds(lambda e, src: {"events": e, **({"source": src} if src else {})}, st.one_of(st.just("any"), EVENTS),
                  st.sampled_from(["", "web"])),
        st.just({"invalid_rate": True}),
        st.builds(lambda step, rate: {"funnel": "f_1", "step": step, **({"rate": True} if rate else {})},
                  st.integers(1, 2), st.booleans()),
        st.builds(lambda n: {"retention": "r.2", "n": n}, st.integers(1, 3)),
        st.builds(lambda a: {"active": a}, st.sampled_from(["dau", "wau", "mau"])))
    bounds = st.dictionaries(st.sampled_from(["above", "below"]), st.one_of(st.integers(-5, 500),
                                                                            st.sampled_from([0.05, 2.5])), min_size=1)
    rule = st.one_of(
        st.builds(lambda b: {"threshold": b}, bounds),
        st.builds(lambda b, vs: {"relative": {**b, **({"vs": "last_week"} if vs else {})}}, bounds, st.booleans()),
        st.builds(lambda s, d: {"anomaly": {**({"sensitivity": s} if s != 3.5 else {}),
                                            **({"direction": d} if d != "both" else {})}},
                  st.sampled_from([3.5, 2.0, 5.0]), st.sampled_from(["both", "up", "down"])))
    return st.builds(
        lambda series, rule, mc, fire, hook: {
            "name": "a-1", "series": series, "rule": {**rule, **({"min_count": mc} if mc is not None else {})},
            **({"fire_after": fire} if fire > 1 else {}),
            **({"notify": [{"webhook": hook}]} if hook else {})},
        series, rule, st.one_of(st.none(), st.integers(0, 50)), st.integers(1, 3),
        st.sampled_from(["", "https://hooks.example.com/x/y"]))


@settings(max_examples=150, deadline=None)
@given(alert_spec())
def test_an_alert_rule_the_form_can_show_comes_back_unchanged(spec):
    assert editor.editable("alerts", spec)
    assert editor.spec_from_form("alerts", editor.form_from_spec("alerts", spec)) == spec
    parse_metrics({"funnels": [{"name": "f_1", "window": "1d", "steps": [{"event": "A"}, {"event": "B"}]}],
                   "retention": [{"name": "r.2", "horizon": 3}], "alerts": [spec]})


def test_an_alert_preview_judges_the_rule_over_the_last_week():
    m = parse_metrics({"alerts": [{"name": "quiet", "series": {"events": "Buy", "period": "day"},
                                   "rule": {"threshold": {"below": 2}}}]})
    alert = editor.definition(m, "alerts", "quiet")
    now = 20_400 * 86_400_000 + 3_600_000
    sql, table = editor.alert_preview(alert, m, now)
    assert "Buy" in sql
    days = [20_400 - 7 + i for i in range(7)]
    rows = [(d * 86_400_000, 1 if d in days[3:5] else 5, 0) for d in days]  # two quiet days
    shown = table(rows)
    assert [r[1] for r in shown["rows"]] == ["firing", "resolved"]
    assert shown["summary"] == "fired 1 times in 7 days"


EXPERIMENTS = st.builds(
    lambda shares, control, metrics, guard, sample, cuped: {
        "name": "e_1", "exposure": {"experiment_id": "checkout_button"},
        "variations": {f"v{i}": s for i, s in enumerate(shares)}, "control": f"v{control % len(shares)}",
        "metrics": metrics, **({"guardrails": [metrics[0]["name"]]} if guard else {}),
        **({"min_sample": sample} if sample != 100 else {}), **({"cuped": cuped} if cuped else {})},
    st.sampled_from([[0.5, 0.5], [0.34, 0.33, 0.33], [0.25, 0.25, 0.25, 0.25]]), st.integers(0, 3),
    st.lists(st.builds(lambda i, kind, e, w: {"name": f"m{i}", kind: {"event": e, **({"property": "revenue"}
                                                                                       if kind == "sum" else {}),
                                                                     "within": w}},
                       st.integers(0, 9), st.sampled_from(editor.METRIC_KINDS), EVENTS, DURATIONS),
             min_size=1, max_size=editor.MAX_METRICS, unique_by=lambda m: m["name"]),
    st.booleans(), st.sampled_from([100, 50]), st.sampled_from(["", "7d", "12h"]))


@settings(max_examples=150, deadline=None)
@given(EXPERIMENTS)
def test_an_experiment_the_form_can_show_comes_back_unchanged(spec):
    assert editor.editable("experiments", spec)
    assert editor.spec_from_form("experiments", editor.form_from_spec("experiments", spec)) == spec
    parse_metrics({"experiments": [spec]})


def test_an_experiment_preview_is_its_results_over_history():
    m = parse_metrics({"experiments": [{"name": "b", "exposure": {"experiment_id": "b"},
                                        "variations": {"control": 0.5, "green": 0.5}, "control": "control",
                                        "min_sample": 2,
                                        "metrics": [{"name": "bought",
                                                     "conversion": {"event": "Buy", "within": "7d"}}]}]})
    e = editor.definition(m, "experiments", "b")
    sql, table = editor.experiment_preview(e)
    assert "Buy" in sql
    shown = table([("control", "bought", 40, 10, 10, 0, 0, 0, 0, 0, 0, 2),
                   ("green", "bought", 40, 20, 20, 0, 0, 0, 0, 0, 0, 2)])
    assert shown["summary"] == "80 exposed persons" and "green" in shown["text"] and "2 excluded" in shown["text"]
