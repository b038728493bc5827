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


def test_predicates_are_shared_and_masks_follow_filters():
    m = parse_metrics({"funnels": [
        {"name": "a", "window": "1h", "steps": [{"event": "V"}, {"event": "A", "where": {"c": "shoes"}}]},
        {"name": "b", "window": "1h", "steps": [{"event": "V"}, {"event": "A", "where": {"n": 2, "g": True}}]},
    ]})
    assert len(m.predicates) == 3  # "V" is one bit for both funnels
    v, shoes, typed = m.predicates
    assert m.mask("V", {}) == 1 << v.bit
    assert m.mask("A", {"c": "shoes"}) == 1 << shoes.bit
    assert m.mask("A", {"c": "hats"}) == 0
    assert m.mask("A", {"n": 2.0, "g": True}) == 1 << typed.bit
    assert m.mask("A", {"n": "2", "g": True}) == 0 and m.mask("A", {"n": 2, "g": 1}) == 0


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
    assert ok.exit_code == 0 and "funnel checkout: Product Viewed → Product Added" in ok.output
    bad = tmp_path / "m.yaml"
    bad.write_text("funnels:\n  - name: x\n    window: 1h\n    steps: [{event: A, where: {c: [1]}}]\n")
    failed = CliRunner().invoke(cli, ["metrics", "check", str(bad)])
    assert failed.exit_code == 1 and "funnels[0].steps[0].where.c" in failed.output
