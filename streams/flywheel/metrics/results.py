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

from collections.abc import Mapping
from typing import Any

from flywheel.metrics import stats
from flywheel.metrics.definitions import Experiment, ExperimentMetric
from flywheel.metrics.stats import Arm, Estimate

SRM_P = 0.001  # a sample-ratio mismatch is flagged below this p-value
ALPHA = 0.05


def _interval(e: Estimate) -> dict[str, float]:
    return {"point": e.point, "lower": e.lower, "upper": e.upper, "p_value": e.p_value}


def compare(metric: ExperimentMetric, control: Arm, variation: Arm, *, min_sample: int) -> dict[str, Any]:
    """One variation against the control on one metric."""
    out: dict[str, Any] = {"n": variation.n, "mean": variation.mean}
    if control.n < min_sample or variation.n < min_sample:
        out["status"] = f"not enough data: {min(control.n, variation.n)} of {min_sample} exposed persons"
        return out
    if control.mean == 0 or control.variance <= 0 or variation.variance <= 0:
        out["status"] = "not enough data: no variation in the metric yet"
        return out
    relative = stats.t_test(control, variation, relative=True, alpha=ALPHA)
    absolute = (stats.z_test(control, variation, alpha=ALPHA) if metric.kind == "conversion"
                else stats.t_test(control, variation, relative=False, alpha=ALPHA))
    anytime = stats.sequential(control, variation, relative=True, alpha=ALPHA)
    sign = 1 if metric.higher_is_better else -1
    if metric.kind == "conversion":
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
    """The experiment's results: sample ratio, then per metric each variation against the control."""
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
                                           min_sample=experiment.min_sample)
        out["metrics"].append({"metric": metric.name, "kind": metric.kind, "guardrail": metric.guardrail,
                               "control": {"n": control.n, "mean": control.mean}, "variations": variations})
    out["guardrails_violated"] = sorted({f"{m['metric']}:{v}" for m in out["metrics"]
                                         for v, r in m["variations"].items() if r.get("guardrail_violated")})
    return out


def _empty(metric: ExperimentMetric) -> Arm:
    return Arm(0, 0, 0, {"conversion": "proportion", "ratio": "ratio"}.get(metric.kind, "mean"))
