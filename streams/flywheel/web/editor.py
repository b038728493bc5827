"""The definitions editor of the UI: forms ↔ definitions, pickers, previews (docs/design.md §13).

Pure: no HTTP here (web/ui.py serves it). An editor builds a funnel, a retention or a segment from pickers —
event names from the tracking plan and from what ClickHouse has seen, property names likewise — never from
free-text YAML; the form becomes the definition as the metrics file writes it (`spec_from_form`), which
the registry checks like any change. The preview runs the definition's oracle query (metrics/oracle.py)
over the history in ClickHouse: what it would have said, before it is saved.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flywheel.metrics import alerts, oracle, results
from flywheel.metrics.definitions import ANY, Alert, Experiment, Funnel, Metrics, Retention, Segment
from flywheel.model.clock import DAY_MS, iso_ms
from flywheel.model.plan import TrackingPlan

KINDS = {"funnels": "funnel", "retention": "retention", "segments": "segment", "alerts": "alert rule",
         "experiments": "experiment"}  # editable here
MAX_VARIATIONS = 4  # variation rows an experiment form offers
MAX_METRICS = 4  # metric rows an experiment form offers
METRIC_KINDS = ("conversion", "count", "sum")
SERIES_KINDS = ("events", "invalid_rate", "funnel", "retention", "active", "segment")
RULE_KINDS = ("threshold", "relative", "anomaly")
PREVIEW_ALERT_DAYS = 7
MAX_STEPS = 8  # step rows a funnel form offers
MAX_CONDITIONS = 6  # condition rows a segment form offers
UNITS = ("m", "h", "d")
PREVIEW_DAYS = 30

EVENTS_SQL = """
SELECT event, count() AS n FROM flywheel.events
WHERE event != '' AND timestamp >= now() - INTERVAL 30 DAY GROUP BY event ORDER BY n DESC, event LIMIT 500"""
PROPERTIES_SQL = """
SELECT key, count() AS n FROM flywheel.events ARRAY JOIN JSONExtractKeys(properties) AS key
WHERE timestamp >= now() - INTERVAL 30 DAY GROUP BY key ORDER BY n DESC, key LIMIT 500"""
_DURATION = re.compile(r"^(\d+)([smhd])$")


class FormError(ValueError):
    """What is wrong with a submitted form, for the editor to fix."""


def pickers(plan: TrackingPlan, seen_events: Sequence[Sequence], seen_properties: Sequence[Sequence]
            ) -> tuple[list[str], list[str]]:
    """(event names, property names): the tracking plan's first (alphabetically), then what ClickHouse has
    seen in the last 30 days (most frequent first)."""
    events = sorted(plan.events)
    events += [str(r[0]) for r in seen_events if str(r[0]) not in plan.events]
    planned = sorted({p.name for rule in plan.events.values() for p in rule.properties})
    properties = planned + [str(r[0]) for r in seen_properties if str(r[0]) not in planned]
    return events, properties


def _text(form: Mapping[str, Any], key: str) -> str:
    return str(form.get(key, "")).strip()


def _duration(form: Mapping[str, Any], key: str, *, what: str) -> str:
    amount, unit = _text(form, f"{key}_n"), _text(form, f"{key}_unit")
    if not amount.isdigit() or int(amount) <= 0 or unit not in UNITS:
        raise FormError(f"{what}: a whole number above 0 and a unit ({', '.join(UNITS)})")
    return f"{int(amount)}{unit}"


def _value(text: str) -> str | int | float | bool:
    """A property value as typed: true/false, a number, else the text itself."""
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            number = kind(text)
        except ValueError:
            continue
        return number if number == number and abs(number) != float("inf") else text  # nan, inf: as text
    return text


def _where(form: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    prop, value = _text(form, f"{prefix}_prop"), _text(form, f"{prefix}_value")
    if not prop:
        return {}
    if not value:
        raise FormError(f"{prefix.replace('_', ' ')}: property {prop!r} needs a value")
    return {prop: _value(value)}


def spec_from_form(kind: str, form: Mapping[str, Any]) -> dict[str, Any]:
    """A submitted form → the definition as the metrics file writes it (checked by the registry next)."""
    name = _text(form, "name")
    if not name:
        raise FormError("the name is missing")
    if kind == "funnels":
        steps = []
        for i in range(1, MAX_STEPS + 1):
            event = _text(form, f"step{i}_event")
            if event:
                where = _where(form, f"step{i}")
                steps.append({"event": event, **({"where": where} if where else {})})
        if len(steps) < 2:
            raise FormError("a funnel needs at least two steps")
        return {"name": name, "window": _duration(form, "window", what="conversion window"), "steps": steps}
    if kind == "retention":
        horizon = _text(form, "horizon")
        if not horizon.isdigit():
            raise FormError("horizon: a whole number of periods")
        return {"name": name, "cohort_event": _text(form, "cohort_event") or ANY,
                "return_event": _text(form, "return_event") or ANY, "period": _text(form, "period") or "day",
                "horizon": int(horizon)}
    if kind == "segments":
        conditions = []
        for i in range(1, MAX_CONDITIONS + 1):
            event = _text(form, f"cond{i}_event")
            if not event:
                continue
            how = _text(form, f"cond{i}_kind") or "performed"
            if how not in ("performed", "not_performed"):
                raise FormError(f"condition {i}: performed or not performed")
            condition: dict[str, Any] = {how: event}
            where = _where(form, f"cond{i}")
            if where:
                condition["where"] = where
            count = _text(form, f"cond{i}_count")
            if how == "performed" and count and count != "1":
                if not count.isdigit():
                    raise FormError(f"condition {i}: at least how many times (a whole number)")
                condition["count"] = {_text(form, f"cond{i}_op") or "gte": int(count)}
            condition["within"] = _duration(form, f"cond{i}_within", what=f"condition {i}: within")
            conditions.append(condition)
        if not conditions:
            raise FormError("a segment needs at least one condition")
        mode = _text(form, "mode") or "all"
        if mode not in ("all", "any"):
            raise FormError("all or any of the conditions")
        return {"name": name, mode: conditions}
    if kind == "alerts":
        return _alert_from_form(form, name)
    if kind == "experiments":
        return _experiment_from_form(form, name)
    raise FormError(f"{kind} cannot be edited here (use flywheel metrics import)")


def _experiment_from_form(form: Mapping[str, Any], name: str) -> dict[str, Any]:
    experiment_id = _text(form, "experiment_id")
    if not experiment_id:
        raise FormError("the experiment id (what the exposure events carry) is missing")
    variations: dict[str, float] = {}
    control = None
    for i in range(1, MAX_VARIATIONS + 1):
        v = _text(form, f"v{i}_name")
        if not v:
            continue
        share = _number(form, f"v{i}_share", f"variation {i}: share")
        if share is None:
            raise FormError(f"variation {i}: its expected share (0.5 = half)")
        variations[v] = float(share)
        if _text(form, "control") == str(i):
            control = v
    if len(variations) < 2:
        raise FormError("an experiment needs at least two variations")
    if control is None:
        raise FormError("which variation is the control")
    metrics, guardrails = [], []
    for i in range(1, MAX_METRICS + 1):
        metric = _text(form, f"m{i}_name")
        if not metric:
            continue
        kind, event = _text(form, f"m{i}_kind"), _text(form, f"m{i}_event")
        if kind not in METRIC_KINDS or not event:
            raise FormError(f"metric {i}: a kind ({', '.join(METRIC_KINDS)}) and an event")
        body: dict[str, Any] = {"event": event}
        if kind == "sum":
            prop = _text(form, f"m{i}_property")
            if not prop:
                raise FormError(f"metric {i}: the property summed")
            body["property"] = prop
        body["within"] = _duration(form, f"m{i}_within", what=f"metric {i}: within")
        metrics.append({"name": metric, kind: body})
        if form.get(f"m{i}_guardrail"):
            guardrails.append(metric)
    if not metrics:
        raise FormError("an experiment needs at least one metric")
    out: dict[str, Any] = {"name": name, "exposure": {"experiment_id": experiment_id}, "variations": variations,
                           "control": control, "metrics": metrics}
    if guardrails:
        out["guardrails"] = guardrails
    min_sample = _number(form, "min_sample", "min sample", whole=True)
    if min_sample is not None and min_sample != 100:
        out["min_sample"] = min_sample
    if _text(form, "cuped_n"):
        out["cuped"] = _duration(form, "cuped", what="CUPED lookback")
    return out


def _number(form: Mapping[str, Any], key: str, what: str, *, whole: bool = False) -> int | float | None:
    text = _text(form, key)
    if not text:
        return None
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        raise FormError(f"{what}: {'a whole number' if whole else 'a number'}") from None
    if value != value or abs(value) == float("inf"):
        raise FormError(f"{what}: a finite number")
    return int(value) if not whole and value == int(value) and "." not in text and "e" not in text.lower() else value


def _alert_from_form(form: Mapping[str, Any], name: str) -> dict[str, Any]:
    kind = _text(form, "series_kind")
    series: dict[str, Any]
    if kind == "events":
        series = {"events": _text(form, "series_event") or "any"}
    elif kind == "invalid_rate":
        series = {"invalid_rate": True}
    elif kind == "funnel":
        series = {"funnel": _text(form, "series_funnel"), "step": _number(form, "series_step", "step", whole=True)}
        if form.get("series_rate"):
            series["rate"] = True
    elif kind == "retention":
        series = {"retention": _text(form, "series_retention"), "n": _number(form, "series_n", "n", whole=True)}
    elif kind == "active":
        series = {"active": _text(form, "series_active") or "dau"}
    elif kind == "segment":
        series = {"segment": _text(form, "series_segment")}
    else:
        raise FormError(f"what the rule watches: one of {', '.join(SERIES_KINDS)}")
    if kind in ("events", "invalid_rate") and _text(form, "series_source"):
        series["source"] = _text(form, "series_source")
    if _text(form, "period"):
        series["period"] = _text(form, "period")
    rule_kind = _text(form, "rule_kind")
    if rule_kind not in RULE_KINDS:
        raise FormError(f"the rule: one of {', '.join(RULE_KINDS)}")
    body: dict[str, Any] = {}
    if rule_kind in ("threshold", "relative"):
        for bound in ("above", "below"):
            value = _number(form, f"rule_{bound}", bound)
            if value is not None:
                body[bound] = value
        if rule_kind == "relative" and _text(form, "rule_vs") not in ("", "previous_period"):
            body["vs"] = _text(form, "rule_vs")
    else:
        for key, whole, default in (("baseline", None, "previous_periods"), ("sensitivity", False, 3.5),
                                    ("direction", None, "both"), ("weeks", True, 4), ("periods", True, 12)):
            value = _text(form, f"rule_{key}") if whole is None else _number(form, f"rule_{key}", key, whole=whole)
            if value not in (None, "", default):
                body[key] = value
    rule: dict[str, Any] = {rule_kind: body}
    min_count = _number(form, "min_count", "min count", whole=True)
    if min_count is not None:
        rule["min_count"] = min_count
    out: dict[str, Any] = {"name": name, "series": series, "rule": rule}
    for key in ("fire_after", "resolve_after"):
        value = _number(form, key, key.replace("_", " "), whole=True)
        if value is not None and value != 1:
            out[key] = value
    webhook = _text(form, "webhook")
    if webhook:
        out["notify"] = [{"webhook": webhook, **({"slack": True} if form.get("slack") else {})}]
    return out


def _split_duration(value: Any) -> tuple[str, str]:
    m = _DURATION.match(str(value).strip())
    if m is None:  # seconds, as a bare number
        seconds = int(value)
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if seconds % size == 0:
                return str(seconds // size), unit
        return str(max(1, seconds // 60)), "m"
    amount, unit = m.groups()
    if unit == "s":
        return str(max(1, int(amount) // 60)), "m"
    return amount, unit


def form_from_spec(kind: str, spec: Mapping[str, Any]) -> dict[str, str]:
    """A stored definition → the form's values (to edit it)."""
    out = {"name": str(spec["name"])}

    def where(prefix: str, w: Mapping[str, Any] | None) -> None:
        for prop, value in (w or {}).items():  # the form has room for one filter per row
            out[f"{prefix}_prop"] = prop
            out[f"{prefix}_value"] = str(value).lower() if isinstance(value, bool) else str(value)
            break

    if kind == "funnels":
        out["window_n"], out["window_unit"] = _split_duration(spec["window"])
        for i, step in enumerate(spec["steps"], start=1):
            out[f"step{i}_event"] = step["event"]
            where(f"step{i}", step.get("where"))
    elif kind == "retention":
        out.update(cohort_event=spec.get("cohort_event", ANY), return_event=spec.get("return_event", ANY),
                   period=spec.get("period", "day"), horizon=str(spec.get("horizon", 7)))
    elif kind == "alerts":
        out.update(_alert_form(spec))
    elif kind == "experiments":
        out.update(_experiment_form(spec))
    elif kind == "segments":
        mode = "all" if "all" in spec else "any"
        out["mode"] = mode
        for i, c in enumerate(spec.get(mode, ()), start=1):
            how = "performed" if "performed" in c else "not_performed" if "not_performed" in c else None
            if how is None:
                continue  # a trait or a nested group: not in this form (metrics import edits it)
            out[f"cond{i}_kind"], out[f"cond{i}_event"] = how, c[how]
            where(f"cond{i}", c.get("where"))
            if "count" in c:
                (op, n), = c["count"].items()
                out[f"cond{i}_op"], out[f"cond{i}_count"] = op, str(n)
            out[f"cond{i}_within_n"], out[f"cond{i}_within_unit"] = _split_duration(c["within"])
    return out


def _alert_form(spec: Mapping[str, Any]) -> dict[str, str]:
    out = {"name": str(spec["name"])}
    series = spec["series"]
    kind = next(k for k in SERIES_KINDS if series.get(k) not in (None, False))
    out["series_kind"] = kind
    for field_, key in (("events", "series_event"), ("funnel", "series_funnel"), ("step", "series_step"),
                        ("retention", "series_retention"), ("n", "series_n"), ("active", "series_active"),
                        ("segment", "series_segment"), ("source", "series_source"), ("period", "period")):
        if series.get(field_) is not None:
            out[key] = str(series[field_])
    if series.get("rate"):
        out["series_rate"] = "1"
    rule = spec["rule"]
    rule_kind = next(k for k in RULE_KINDS if rule.get(k) is not None)
    out["rule_kind"] = rule_kind
    for key, value in rule[rule_kind].items():
        out[f"rule_{key}"] = str(value)
    if rule.get("min_count") is not None:
        out["min_count"] = str(rule["min_count"])
    for key in ("fire_after", "resolve_after"):
        out[key] = str(spec.get(key, 1))
    for n in spec.get("notify") or ():
        out["webhook"] = n["webhook"]
        if n.get("slack"):
            out["slack"] = "1"
    return out


def _experiment_form(spec: Mapping[str, Any]) -> dict[str, str]:
    out = {"name": str(spec["name"]), "experiment_id": str(spec["exposure"]["experiment_id"])}
    for i, (v, share) in enumerate(spec["variations"].items(), start=1):
        out[f"v{i}_name"], out[f"v{i}_share"] = v, str(share)
        if v == spec["control"]:
            out["control"] = str(i)
    for i, m in enumerate(spec["metrics"], start=1):
        kind = next(k for k in METRIC_KINDS if k in m)
        out[f"m{i}_name"], out[f"m{i}_kind"], out[f"m{i}_event"] = m["name"], kind, m[kind]["event"]
        if kind == "sum":
            out[f"m{i}_property"] = m[kind]["property"]
        out[f"m{i}_within_n"], out[f"m{i}_within_unit"] = _split_duration(m[kind]["within"])
        if m["name"] in spec.get("guardrails", ()):
            out[f"m{i}_guardrail"] = "1"
    out["min_sample"] = str(spec.get("min_sample", 100))
    if spec.get("cuped") is not None:
        out["cuped_n"], out["cuped_unit"] = _split_duration(spec["cuped"])
    return out


def editable(kind: str, spec: Mapping[str, Any]) -> bool:
    """Whether the form can show every part of this definition (else: flywheel metrics import)."""
    if kind == "funnels":
        return len(spec["steps"]) <= MAX_STEPS and all(len(s.get("where") or {}) <= 1 for s in spec["steps"])
    if kind == "retention":
        return True
    if kind == "experiments":
        return (set(spec.get("exposure", {})) == {"experiment_id"} and len(spec.get("variations", {})) <= MAX_VARIATIONS
                and len(spec.get("metrics", [])) <= MAX_METRICS
                and all(set(m) == {"name", next((k for k in METRIC_KINDS if k in m), "")}
                        and not m[next(k for k in METRIC_KINDS if k in m)].get("where") for m in spec["metrics"]))
    if kind == "alerts":
        notify = spec.get("notify") or []
        rule = spec.get("rule", {})
        return (len(notify) <= 1 and all(set(n) <= {"webhook", "slack"} for n in notify)
                and not set(spec) - {"name", "series", "rule", "fire_after", "resolve_after", "notify"}
                and "confidence" not in rule and not any(
                    "min_count" in (rule.get(k) or {}) for k in RULE_KINDS))
    if kind == "segments":
        items = spec.get("all", spec.get("any"))
        return (items is not None and len(items) <= MAX_CONDITIONS and "universe" not in spec
                and all(("performed" in c or "not_performed" in c) and len(c.get("where") or {}) <= 1
                        and set(c.get("count") or {"gte": 1}) == {"gte"} for c in items))  # the form says "at least"
    return False


def definition(metrics: Metrics, kind: str, name: str) -> Funnel | Retention | Segment | Alert | Experiment:
    items = {"funnels": metrics.funnels, "retention": metrics.retention, "segments": metrics.segments,
             "alerts": metrics.alerts, "experiments": metrics.experiments}[kind]
    return next(d for d in items if d.name == name)


def experiment_preview(experiment: Experiment) -> tuple[str, Callable[[Sequence], dict[str, Any]]]:
    """(the experiment's oracle statistics over every stored event, the rows → its results as `flywheel
    experiments results` prints them)."""
    def table(rows: Sequence) -> dict[str, Any]:
        stats = [tuple(r[:11]) for r in rows]
        if rows and int(rows[0][11]):
            stats.append(("", "", int(rows[0][11]), 0, 0, 0, 0, 0, 0, 0, 0))
        return {"head": [], "rows": [], "text": results.text(results.from_stats(experiment, stats)),
                "summary": f"{sum(int(r[2]) for r in rows if r[1] == experiment.metrics[0].name)} exposed persons"}
    return oracle.experiment_stats_sql(experiment), table


def alert_preview(alert: Alert, metrics: Metrics, now_ms: int) -> tuple[str, Callable[[Sequence], dict[str, Any]]]:
    """(the series' oracle query over the last PREVIEW_ALERT_DAYS, the rows → the preview table): the rule
    judged period by period with the stream's own code, as `flywheel alerts backtest` does."""
    end = alert.series.period_of(now_ms)  # the periods closed by now
    start = end - PREVIEW_ALERT_DAYS * DAY_MS
    first = alert.series.period_of(start) - alerts.history_needed(alert)

    def table(rows: Sequence) -> dict[str, Any]:
        series = alerts.history_points(alert, rows, first, end)
        periods = alerts.periods_between(alert, start, end)
        out = [[iso_ms(v.period), t or "", v.value, v.baseline, v.reason]
               for v, t in alerts.backtest(alert, series, periods) if t]
        fired = sum(1 for r in out if r[1] == alerts.FIRING)
        return {"head": ["period", "transition", "value", "baseline", "why"], "rows": out,
                "summary": f"fired {fired} times in {len(periods)} {alert.series.period}s"}
    return oracle.alert_series_sql(alert, metrics, first, end), table


def preview_sql(kind: str, d: Funnel | Retention | Segment, metrics: Metrics, now_ms: int) -> str:
    """The oracle query of a draft: what it would have said over the history in ClickHouse."""
    if kind == "funnels":
        return (f"SELECT toString(day), step, persons FROM ({oracle.funnel_sql(d)}) "
                f"WHERE day >= today() - {PREVIEW_DAYS - 1} ORDER BY day, step")
    if kind == "retention":
        return (f"SELECT toString(cohort_day), period, persons, cohort_size FROM ({oracle.retention_sql(d)}) "
                f"WHERE cohort_day >= today() - {PREVIEW_DAYS - 1} ORDER BY cohort_day, period")
    return f"SELECT count() FROM ({oracle.segment_members_sql(d, metrics, now_ms)})"


def preview_table(kind: str, d: Funnel | Retention | Segment, rows: Sequence[Sequence]) -> dict[str, Any]:
    """The preview as a table: a funnel's days × steps, a retention's cohorts × periods, a segment's size."""
    if kind == "funnels":
        steps = len(d.steps)
        by_day: dict[str, list[int]] = {}
        for day, step, persons in rows:
            by_day.setdefault(str(day), [0] * steps)[int(step) - 1] = int(persons)
        return {"head": ["day", *(f"{i}. {s.event}" for i, s in enumerate(d.steps, start=1))],
                "rows": [[day, *counts] for day, counts in sorted(by_day.items(), reverse=True)]}
    if kind == "retention":
        by_cohort: dict[str, list[int]] = {}
        sizes: dict[str, int] = {}
        for cohort, period, persons, size in rows:
            by_cohort.setdefault(str(cohort), [0] * d.horizon)
            sizes[str(cohort)] = int(size)
            if 1 <= int(period) <= d.horizon:
                by_cohort[str(cohort)][int(period) - 1] = int(persons)
        return {"head": ["cohort", "size", *(f"+{n}" for n in range(1, d.horizon + 1))],
                "rows": [[c, sizes[c], *v] for c, v in sorted(by_cohort.items(), reverse=True)]}
    return {"head": ["members now"], "rows": [[int(rows[0][0]) if rows else 0]]}


def redacted(kind: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """A definition as a viewer may see it: an alert's webhook URLs (often credentials: a Slack hook's path
    is its secret) cut to their host."""
    if kind != "alerts":
        return dict(spec)
    out = dict(spec)
    out["notify"] = [{**n, "webhook": re.sub(r"^(\w+://[^/]+).*$", r"\1/…", str(n.get("webhook", "")))}
                     for n in spec.get("notify") or ()]
    return out
