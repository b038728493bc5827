"""metrics/results.py: an experiment's results from sufficient statistics — the minimum-sample guard, the
sample-ratio check, guardrails, lower-is-better metrics, and the definitions' validation."""

from __future__ import annotations

import random

import pytest
from flywheel.metrics import stats
from flywheel.metrics.definitions import MetricsError, parse_metrics
from flywheel.metrics.results import results
from flywheel.metrics.stats import Arm

SPEC = {"name": "checkout_button", "exposure": {"experiment_id": "checkout_button"},
        "variations": {"control": 0.5, "green": 0.5}, "control": "control",
        "metrics": [{"name": "purchased", "conversion": {"event": "Order Completed", "within": "7d"}},
                    {"name": "revenue", "sum": {"event": "Order Completed", "property": "revenue", "within": "7d"}},
                    {"name": "errors", "count": {"event": "Error Shown", "within": "7d"}, "higher_is_better": False},
                    {"name": "orders_per_checkout", "ratio": {"numerator": {"count": "Order Completed"},
                                                              "denominator": {"count": "Checkout Started"},
                                                              "within": "7d"}}],
        "guardrails": ["revenue", "errors"]}
EXPERIMENT = parse_metrics({"experiments": [SPEC]}).experiments[0]


def sample(n: int, values: list[float], seed: int) -> Arm:
    rng = random.Random(seed)
    ys = [rng.choice(values) for _ in range(n)]
    return Arm(n, sum(ys), sum(y * y for y in ys))


def arms(n_control: int, n_green: int, *, green_revenue: list[float], green_errors: list[float]) -> dict:
    out = {}
    for name, n, revenue, errors, rate in (("control", n_control, [0, 0, 0, 10, 20], [0, 0, 1], 0.10),
                                           ("green", n_green, green_revenue, green_errors, 0.13)):
        k = round(n * rate)
        out[(name, "purchased")] = Arm(n, k, k, "proportion")
        out[(name, "revenue")] = sample(n, revenue, 1)
        out[(name, "errors")] = sample(n, errors, 2)
        out[(name, "orders_per_checkout")] = Arm(n, k, k, "ratio", 2 * n, 5 * n, 2 * k)
    return out


def test_a_winning_variation_and_its_numbers():
    got = results(EXPERIMENT, {"control": 5000, "green": 5000},
                  arms(5000, 5000, green_revenue=[0, 0, 0, 10, 20], green_errors=[0, 0, 1]))
    assert not got["srm"]["flagged"] and got["guardrails_violated"] == []
    purchased = got["metrics"][0]["variations"]["green"]
    c, g = Arm(5000, 500, 500, "proportion"), Arm(5000, 650, 650, "proportion")
    assert purchased["relative"]["point"] == pytest.approx(0.3)
    assert purchased["absolute"]["point"] == pytest.approx(0.03)
    assert purchased["absolute"]["p_value"] == stats.z_test(c, g).p_value  # conversions: the z-test
    assert purchased["sequential"]["lower"] < purchased["relative"]["lower"] > 0  # anytime-valid: wider
    assert purchased["chance_to_win"] == stats.beta_binomial(c, g)[0] > 0.999


def test_a_guardrail_loss_is_flagged_whatever_the_primary_metric_says():
    got = results(EXPERIMENT, {"control": 5000, "green": 5000},
                  arms(5000, 5000, green_revenue=[0, 0, 0, 0, 10], green_errors=[0, 1, 1, 2]))
    by_metric = {m["metric"]: m for m in got["metrics"]}
    assert by_metric["purchased"]["variations"]["green"]["chance_to_win"] > 0.999  # the primary wins
    assert by_metric["revenue"]["variations"]["green"]["guardrail_violated"]  # revenue fell
    errors = by_metric["errors"]["variations"]["green"]
    assert errors["guardrail_violated"] and errors["chance_to_win"] < 0.001  # more errors: lower is better
    assert got["guardrails_violated"] == ["errors:green", "revenue:green"]


def test_minimum_sample_guard():
    got = results(EXPERIMENT, {"control": 99, "green": 120},
                  arms(99, 120, green_revenue=[0, 10], green_errors=[0, 1]))
    green = got["metrics"][0]["variations"]["green"]
    assert green["status"] == "not enough data: 99 of 100 exposed persons" and "relative" not in green


def test_sample_ratio_mismatch_is_flagged():
    skewed = results(EXPERIMENT, {"control": 10_300, "green": 9_700},
                     arms(10_300, 9_700, green_revenue=[0, 10], green_errors=[0, 1]))
    assert skewed["srm"]["flagged"] and skewed["srm"]["p_value"] < 0.001
    fair = results(EXPERIMENT, {"control": 10_050, "green": 9_950},
                   arms(10_050, 9_950, green_revenue=[0, 10], green_errors=[0, 1]))
    assert not fair["srm"]["flagged"]


@pytest.mark.parametrize(("change", "message"), [
    ({"control": "blue"}, "control: 'blue' is not one of the variations"),
    ({"variations": {"control": 0.5, "green": 0.4}}, "sum to 0.9, not 1"),
    ({"guardrails": ["nope"]}, r"guardrails: \['nope'\] are not metrics"),
    ({"metrics": [{"name": "x", "conversion": {"event": "A", "within": "7d"},
                   "sum": {"event": "A", "property": "p", "within": "7d"}}]}, "exactly one of conversion"),
    ({"metrics": [{"name": "x", "ratio": {"numerator": {"count": "A"}, "denominator": {}, "within": "1d"}}],
      "guardrails": []}, "exactly one of count"),
    ({"metrics": [{"name": "x", "conversion": {"event": "A", "within": "0s"}}], "guardrails": []},
     "within: Value error, must be positive"),
    ({"cuped": "60d"}, "cuped: the lookback must be positive and at most 30d"),
])
def test_invalid_experiments_are_refused(change, message):
    with pytest.raises(MetricsError, match=message):
        parse_metrics({"experiments": [{**SPEC, **change}]})


def test_versions_follow_meaning():
    same = parse_metrics({"experiments": [SPEC]}).experiments[0]
    other = parse_metrics({"experiments": [{**SPEC, "min_sample": 500}]}).experiments[0]
    assert same.version == EXPERIMENT.version != other.version
    # what the statistics depend on names their cells: a change of the control or min_sample keeps them
    assert same.stats_version == other.stats_version
    cuped = parse_metrics({"experiments": [{**SPEC, "cuped": "14d"}]}).experiments[0]
    assert cuped.stats_version != same.stats_version and cuped.cuped_ms == 14 * 86_400_000


def test_metrics_check_lists_experiments(tmp_path):
    import yaml
    from flywheel.cli import cli
    from typer.testing import CliRunner

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"experiments": [SPEC]}))
    out = CliRunner().invoke(cli, ["metrics", "check", str(path)])
    assert out.exit_code == 0, out.output
    assert (f"experiment checkout_button (version {EXPERIMENT.version}): exposure Experiment Viewed with "
            "experiment_id=checkout_button; variations control 0.5, green 0.5 (control control); metrics "
            "purchased (conversion), revenue (sum, guardrail)") in out.output


def test_results_from_the_live_statistics_rows_and_their_endpoint():
    """experiment_stats rows (sums in millionths, as text) → the same results as from the arms in the
    property's unit; the excluded persons' row; the admin endpoint serves them, and says what is wrong."""
    import asyncio

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from flywheel.metrics.results import from_stats, stats_sql, text
    from flywheel.web.admin import add_experiments

    given_arms = arms(5000, 5000, green_revenue=[0, 0, 0, 10, 20.5], green_errors=[0, 0, 1])
    scale = {"revenue": 10**6}
    rows = [("", "", 3, "0", "0", "0", "0", "0", "0", "0", "0")]
    for (variation, metric), a in given_arms.items():
        k = scale.get(metric, 1)
        rows.append((variation, metric, a.n, str(round(a.sy * k)), str(round(a.syy * k * k)), str(round(a.sx)),
                     str(round(a.sxx)), str(round(a.sxy)), "0", "0", "0"))
    got = from_stats(EXPERIMENT, rows)
    want = results(EXPERIMENT, {"control": 5000, "green": 5000}, given_arms, excluded=3)
    assert got["excluded"] == 3 and got["units"] == want["units"]
    for g, w in zip(got["metrics"], want["metrics"], strict=True):
        assert g["variations"]["green"]["relative"] == pytest.approx(w["variations"]["green"]["relative"], rel=1e-12)
        assert g["control"]["mean"] == pytest.approx(w["control"]["mean"], rel=1e-12)
    assert "relative lift" in text(got) and "anytime-valid" in text(got)
    assert "experiment_stats WHERE experiment = 'checkout_button'" in stats_sql(EXPERIMENT)

    async def go():
        app = web.Application()
        queries = []

        async def query(sql):
            queries.append(sql)
            if len(queries) == 2:
                raise ConnectionError("Connection refused")
            return rows
        add_experiments(app, metrics=parse_metrics({"experiments": [SPEC]}), query=query)
        async with TestClient(TestServer(app)) as client:
            ok = await client.get("/experiments/checkout_button/results")
            down = await client.get("/experiments/checkout_button/results")
            missing = await client.get("/experiments/nope/results")
            return ok.status, await ok.json(), down.status, missing.status, await missing.json()
    status, body, down, missing, why = asyncio.run(go())
    assert (status, body["units"], down, missing) == (200, {"control": 5000, "green": 5000}, 503, 404)
    assert "checkout_button" in why["error"]


def test_cuped_adjusts_every_estimate_but_not_ratio_metrics():
    """With `cuped:` the results are those of the adjusted arms (θ from both arms pooled), conversions by the
    t-test and the normal posterior; a ratio metric has no covariate and stays as it was."""
    experiment = parse_metrics({"experiments": [{**SPEC, "cuped": "14d"}]}).experiments[0]
    plain = arms(5000, 5000, green_revenue=[0, 0, 0, 10, 20], green_errors=[0, 0, 1])
    rng = random.Random(3)
    with_pre = {}
    for key, a in plain.items():  # a pre-exposure value: the metric's mean plus noise, per arm as sums
        sp = a.sy * rng.uniform(0.8, 1.2)
        with_pre[key] = stats.Arm(a.n, a.sy, a.syy, a.kind, a.sx, a.sxx, a.sxy, sp, a.syy * 0.9, a.syy * 0.7)
    got = results(experiment, {"control": 5000, "green": 5000}, with_pre)
    by_metric = {m["metric"]: m["variations"]["green"] for m in got["metrics"]}
    c, g, theta = stats.cuped(with_pre[("control", "revenue")], with_pre[("green", "revenue")])
    assert by_metric["revenue"]["cuped"]["theta"] == theta != 0
    assert by_metric["revenue"]["relative"]["point"] == stats.t_test(c, g, relative=True).point
    c, g, _ = stats.cuped(with_pre[("control", "purchased")], with_pre[("green", "purchased")])
    assert by_metric["purchased"]["absolute"]["p_value"] == stats.t_test(c, g, relative=False).p_value
    assert "cuped" not in by_metric["orders_per_checkout"]
    assert by_metric["orders_per_checkout"] == results(EXPERIMENT, {"control": 5000, "green": 5000}, with_pre)[
        "metrics"][3]["variations"]["green"]
