"""An experiment's results from its sufficient statistics (docs/design.md §11), pure: what `flywheel
experiments results`, its HTTP endpoint and the dashboard show.

Input: exposed persons per variation (those seen in more than one variation are excluded, and counted), and
per (variation, metric) an `Arm` (metrics/stats.py). Output per metric, each variation against the control:
- the lift, absolute and relative, with 95 % intervals and p-values: Welch's t (relative by the delta
  method; conversions' absolute difference by the two-proportion z-test);
- the anytime-valid relative interval and p-value (sequential): the one to act on while watching live;
- chance to win and expected losses: beta-binomial for conversions, normal on the relative lift otherwise;
- guardrails: a metric marked as one is flagged when its anytime-valid interval says the variation is
  worse (wholly below 0 for a metric where higher is better), whatever the primary metric says.
A variation gets no statistics until it and the control have `min_sample` exposed persons each and the
control's mean is not 0 — the minimum-sample guard: small samples give wild intervals and a Bayesian chance
near 0 or 1 that means nothing. The sample-ratio check (χ², flagged at p < 0.001) comes first: a
mismatch means the assignment or the logging is broken and every other number is suspect.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flywheel.metrics import stats
from flywheel.metrics.definitions import Experiment, ExperimentMetric
from flywheel.metrics.exposures import STATS, scales
from flywheel.metrics.oracle import quote
from flywheel.metrics.stats import Arm, Estimate

SRM_P = 0.001  # a sample-ratio mismatch is flagged below this p-value
ALPHA = 0.05


def _interval(e: Estimate) -> dict[str, float]:
    return {"point": e.point, "lower": e.lower, "upper": e.upper, "p_value": e.p_value}


def compare(metric: ExperimentMetric, control: Arm, variation: Arm, *, min_sample: int,
            cuped: bool = False) -> dict[str, Any]:
    """One variation against the control on one metric; with `cuped`, every estimate on the CUPED-adjusted
    arms (when the covariate and the metric vary: else unadjusted)."""
    out: dict[str, Any] = {"n": variation.n, "mean": variation.mean}
    if control.n < min_sample or variation.n < min_sample:
        out["status"] = f"not enough data: {min(control.n, variation.n)} of {min_sample} exposed persons"
        return out
    if control.mean == 0 or control.variance <= 0 or variation.variance <= 0:
        out["status"] = "not enough data: no variation in the metric yet"
        return out
    theta = 0.0
    if cuped:
        plain = stats.t_test(control, variation, relative=True, alpha=ALPHA)
        control, variation, theta = stats.cuped(control, variation)
    relative = stats.t_test(control, variation, relative=True, alpha=ALPHA)
    absolute = (stats.z_test(control, variation, alpha=ALPHA) if metric.kind == "conversion" and not theta
                else stats.t_test(control, variation, relative=False, alpha=ALPHA))
    anytime = stats.sequential(control, variation, relative=True, alpha=ALPHA)
    sign = 1 if metric.higher_is_better else -1
    if cuped:  # how much of the lift's variance the pre-exposure values explained
        out["cuped"] = {"theta": theta, "variance_reduction": 1 - (relative.se / plain.se) ** 2 if plain.se else 0.0}
    if metric.kind == "conversion" and not theta:
        win, loss_variation, loss_control = stats.beta_binomial(control, variation)
        if not metric.higher_is_better:
            win, loss_variation, loss_control = 1 - win, loss_control, loss_variation
    else:
        win = stats.chance_to_win(sign * relative.point, relative.se)
        loss_control, loss_variation = stats.expected_losses(sign * relative.point, relative.se)
    worse = anytime.upper < 0 if metric.higher_is_better else anytime.lower > 0
    out.update(status="ok", absolute=_interval(absolute), relative=_interval(relative),
               sequential=_interval(anytime), chance_to_win=win,
               expected_loss={"control": loss_control, "variation": loss_variation},
               guardrail_violated=metric.guardrail and worse)
    return out


def results(experiment: Experiment, units: Mapping[str, int], arms: Mapping[tuple[str, str], Arm],
            excluded: int = 0) -> dict[str, Any]:
    """The experiment's results: sample ratio, then per metric each variation against the control (with CUPED
    when the experiment has a lookback: conversions then take the t-test and the normal posterior on the
    adjusted lift, not the z-test and the beta-binomial, which know no covariate)."""
    names = [name for name, _ in experiment.variations]
    counts = [units.get(name, 0) for name in names]
    p = stats.srm(counts, [share for _, share in experiment.variations])
    out: dict[str, Any] = {
        "experiment": experiment.name, "version": experiment.version, "control": experiment.control,
        "units": dict(zip(names, counts, strict=True)), "excluded": excluded,
        "srm": {"p_value": p, "flagged": p < SRM_P,
                "expected": {name: share for name, share in experiment.variations}},
        "metrics": [],
    }
    for metric in experiment.metrics:
        control = arms.get((experiment.control, metric.name)) or _empty(metric)
        variations = {}
        for name in names:
            if name != experiment.control:
                variations[name] = compare(metric, control, arms.get((name, metric.name)) or _empty(metric),
                                           min_sample=experiment.min_sample, cuped=bool(experiment.cuped_for(metric)))
        out["metrics"].append({"metric": metric.name, "kind": metric.kind, "guardrail": metric.guardrail,
                               "control": {"n": control.n, "mean": control.mean}, "variations": variations})
    out["guardrails_violated"] = sorted({f"{m['metric']}:{v}" for m in out["metrics"]
                                         for v, r in m["variations"].items() if r.get("guardrail_violated")})
    return out


def _empty(metric: ExperimentMetric) -> Arm:
    return Arm(0, 0, 0, {"conversion": "proportion", "ratio": "ratio"}.get(metric.kind, "mean"))


# ---- from the live statistics (ClickHouse's experiment_stats view) ------------------------------------------

def stats_sql(experiment: Experiment) -> str:
    """The experiment's rows of experiment_stats: (variation, metric, n, Σy, Σy², Σx, Σx², Σxy, Σp, Σp², Σpy),
    sums as text."""
    sums = ", ".join(f"toString({s})" for s in STATS[1:])
    return (f"SELECT variation, metric, n, {sums} FROM flywheel.experiment_stats "
            f"WHERE experiment = {quote(experiment.name)}")


def from_stats(experiment: Experiment, rows: Iterable[Sequence[Any]]) -> dict[str, Any]:
    """`results` from the rows of `stats_sql`: sums in millionths back in the property's unit; the row with
    no variation and no metric is the excluded persons."""
    by_name = {m.name: m for m in experiment.metrics}
    units: dict[str, int] = {}
    arms: dict[tuple[str, str], Arm] = {}
    excluded = 0
    for variation, metric, n, *sums in rows:
        n, (sy, syy, sx, sxx, sxy, sp, spp, spy) = int(n), map(int, sums)
        if variation == "" and metric == "":
            excluded = n
            continue
        m = by_name.get(metric)
        if m is None:  # a metric removed from the file since
            continue
        units[variation] = n
        ky, kx = scales(m)
        kind = {"conversion": "proportion", "ratio": "ratio"}.get(m.kind, "mean")
        arms[(variation, metric)] = Arm(n, sy / ky, syy / ky ** 2, kind, sx / kx, sxx / kx ** 2, sxy / (kx * ky),
                                        sp / ky, spp / ky ** 2, spy / ky ** 2)
    return results(experiment, units, arms, excluded)


def text(result: Mapping[str, Any]) -> str:
    """`results` as `flywheel experiments results` prints it."""
    def pct(x: float) -> str:
        return f"{x * 100:+.2f}%"

    def interval(e: Mapping[str, float], fmt) -> str:
        return f"{fmt(e['point'])} [{fmt(e['lower'])}, {fmt(e['upper'])}] p={e['p_value']:.4f}"

    units = ", ".join(f"{name} {n}" for name, n in result["units"].items())
    srm = result["srm"]
    lines = [f"experiment {result['experiment']} (version {result['version']}): exposed {units}; "
             f"{result['excluded']} excluded (more than one variation)",
             f"sample ratio: p={srm['p_value']:.4g}" + ("  MISMATCH: check the assignment and the exposure logging; "
                                                        "every result below is suspect" if srm["flagged"] else " ok")]
    for m in result["metrics"]:
        lines.append(f"\n{m['metric']} ({m['kind']}{', guardrail' if m['guardrail'] else ''}): control mean "
                     f"{m['control']['mean']:.6g} (n={m['control']['n']})")
        for name, r in m["variations"].items():
            if r["status"] != "ok":
                lines.append(f"  {name}: mean {r['mean']:.6g} (n={r['n']}): {r['status']}")
                continue
            lines.append(f"  {name}: mean {r['mean']:.6g} (n={r['n']})"
                         + ("  GUARDRAIL VIOLATED" if r["guardrail_violated"] else ""))
            lines.append(f"    relative lift  {interval(r['relative'], pct)}")
            lines.append(f"    absolute lift  {interval(r['absolute'], lambda x: f'{x:+.6g}')}")
            lines.append(f"    anytime-valid  {interval(r['sequential'], pct)}  (act on this one while watching)")
            if "cuped" in r and r["cuped"]["theta"]:
                lines.append(f"    CUPED: θ={r['cuped']['theta']:.4g}, the lift's variance "
                             f"{r['cuped']['variance_reduction']:.0%} smaller than without")
            elif "cuped" in r:
                lines.append("    CUPED: not applied (the values before the exposure do not vary yet)")
            beta_binomial = m["kind"] == "conversion" and not r.get("cuped", {}).get("theta")
            loss = (lambda x: f"{x * 100:.3f} points") if beta_binomial else (lambda x: f"{x * 100:.2f}%")
            lines.append(f"    chance to win {r['chance_to_win']:.1%}; expected loss if shipped "
                         f"{loss(r['expected_loss']['variation'])}, if not {loss(r['expected_loss']['control'])}")
    if result["guardrails_violated"]:
        lines.append(f"\nguardrails violated: {', '.join(result['guardrails_violated'])}")
    return "\n".join(lines)
