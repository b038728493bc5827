"""The metrics file: the documented shape compiles; mistakes are reported with the file and the place."""

from __future__ import annotations

import pytest
from flywheel import paths
from flywheel.metrics.definitions import MetricsError, load_metrics, parse_duration_ms, parse_metrics


def test_the_shipped_example_compiles():
    m = load_metrics(paths.schemas_dir() / "metrics.yaml")
    assert [f.name for f in m.funnels] == ["checkout", "shoes_purchase"]
    assert m.funnels[0].window_ms == 6 * 3_600_000
    assert [r.name for r in m.retention] == ["new_users", "signup_weekly"]
    assert m.lateness_ms == 7 * 86_400_000


def test_predicates_are_shared_and_matching_follows_filters():
    m = parse_metrics({"funnels": [
        {"name": "a", "window": "1h", "steps": [{"event": "V"}, {"event": "A", "where": {"c": "shoes"}}]},
        {"name": "b", "window": "1h", "steps": [{"event": "V"}, {"event": "A", "where": {"n": 2, "g": True}}]},
    ]})
    assert len(m.predicates) == 3  # "V" is one predicate for both funnels
    v, shoes, typed = m.predicates
    assert m.funnels[0].steps[0] is m.funnels[1].steps[0] is v
    assert m.matching("V", {}) == [v]
    assert m.matching("A", {"c": "shoes"}) == [shoes]
    assert m.matching("A", {"c": "hats"}) == []
    assert m.matching("A", {"n": 2.0, "g": True}) == [typed]
    assert m.matching("A", {"n": "2", "g": True}) == [] and m.matching("A", {"n": 2, "g": 1}) == []


def test_the_registry_is_keyed_by_name_and_a_version_that_follows_the_meaning():
    doc = {"funnels": [{"name": "a", "window": "1h", "steps": [{"event": "V"}, {"event": "B"}]},
                       {"name": "b", "window": "1h", "steps": [{"event": "V"}]}],
           "retention": [{"name": "r", "cohort_event": "any", "return_event": "V", "horizon": 3}]}
    one = parse_metrics(doc)
    again = parse_metrics(doc)
    assert [(f.name, f.version) for f in one.funnels] == [(f.name, f.version) for f in again.funnels]
    edited = parse_metrics({**doc, "funnels": [{**doc["funnels"][0], "window": "2h"}, doc["funnels"][1]]})
    assert edited.funnels[0].version != one.funnels[0].version  # a new version of "a"...
    assert edited.funnels[1].version == one.funnels[1].version  # ...and "b" and "r" untouched
    assert edited.retention[0].version == one.retention[0].version
    assert [p.pid for p in edited.predicates] == [p.pid for p in one.predicates]  # conditions keep their ids
    assert one.by_ref(f"a@{one.funnels[0].version}") is one.funnels[0]
    assert edited.by_ref(f"a@{one.funnels[0].version}") is None
    # a removed definition: the others keep their versions
    fewer = parse_metrics({**doc, "funnels": doc["funnels"][1:]})
    assert fewer.funnels[0].version == one.funnels[1].version


def test_typed_filter_values_are_different_conditions():
    m = parse_metrics({"funnels": [{"name": "a", "window": "1h", "steps": [
        {"event": "A", "where": {"n": 1}}, {"event": "A", "where": {"n": "1"}},
        {"event": "A", "where": {"n": True}}]}]})
    assert len({p.pid for p in m.predicates}) == 3


@pytest.mark.parametrize(("doc", "place"), [
    ({"funnels": [{"name": "x", "window": "6 hours", "steps": [{"event": "A"}]}]}, "funnels[0].window"),
    ({"funnels": [{"name": "x", "window": "1h", "steps": []}]}, "funnels[0].steps"),
    ({"funnels": [{"name": "x", "window": "1h", "steps": [{"evnt": "A"}]}]}, "funnels[0].steps[0]"),
    ({"funnels": [{"name": "x", "window": "1h", "steps": [{"event": "A", "where": {"c": [1]}}]}]},
     "funnels[0].steps[0].where.c"),
    ({"retention": [{"name": "r", "period": "month", "horizon": 3}]}, "retention[0].period"),
    ({"retention": [{"name": "r", "horizon": 40}]}, "retention[0].horizon"),
    ({"funnels": [{"name": "x", "window": "1h", "steps": [{"event": "A"}]}] * 2}, "duplicate name"),
    ({"lateness": "soon"}, "lateness"),
    ({"funnel": []}, "funnel"),
])
def test_errors_name_the_place(doc, place):
    with pytest.raises(MetricsError) as exc:
        parse_metrics(doc, source="metrics.yaml")
    assert "metrics.yaml" in str(exc.value) and place in str(exc.value)


def test_missing_or_broken_files_say_so(tmp_path):
    with pytest.raises(MetricsError, match="no such metrics file"):
        load_metrics(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("funnels: [")
    with pytest.raises(MetricsError, match="not valid YAML"):
        load_metrics(tmp_path / "bad.yaml")


def test_durations():
    assert parse_duration_ms("90m") == 5_400_000 and parse_duration_ms(30) == 30_000
    with pytest.raises(ValueError):
        parse_duration_ms("1w")


def test_cli_check_prints_the_definitions_or_the_error(tmp_path):
    from flywheel.cli import cli
    from typer.testing import CliRunner

    ok = CliRunner().invoke(cli, ["metrics", "check", str(paths.schemas_dir() / "metrics.yaml")])
    assert ok.exit_code == 0 and "funnel checkout (version " in ok.output
    assert "Product Viewed → Product Added" in ok.output
    bad = tmp_path / "m.yaml"
    bad.write_text("funnels:\n  - name: x\n    window: 1h\n    steps: [{event: A, where: {c: [1]}}]\n")
    failed = CliRunner().invoke(cli, ["metrics", "check", str(bad)])
    assert failed.exit_code == 1 and "funnels[0].steps[0].where.c" in failed.output


def test_cli_check_lists_alerts_and_refuses_webhooks_not_allowed(tmp_path, monkeypatch):
    from flywheel.cli import cli
    from typer.testing import CliRunner

    rules = tmp_path / "alerts.yaml"
    rules.write_text("alerts:\n  - name: orders_low\n    series: {events: Order Completed}\n"
                     "    rule: {threshold: {below: 3}}\n    notify: [{webhook: 'http://127.0.0.1:9/hook'}]\n")
    monkeypatch.setenv("FLYWHEEL_ALERT_WEBHOOKS", "http://127.0.0.1:9/")
    ok = CliRunner().invoke(cli, ["metrics", "check", str(rules)])
    assert ok.exit_code == 0 and "alert orders_low (version " in ok.output
    assert "events Order Completed from any source per hour: threshold below 3" in ok.output
    monkeypatch.setenv("FLYWHEEL_ALERT_WEBHOOKS", "https://hooks.example.com/")
    refused = CliRunner().invoke(cli, ["metrics", "check", str(rules)])
    assert refused.exit_code == 1
    assert "webhook http://127.0.0.1:9/hook is not allowed by FLYWHEEL_ALERT_WEBHOOKS" in refused.output
