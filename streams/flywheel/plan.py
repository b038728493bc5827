"""The tracking plan: data in `schemas/`, compiled once into fast per-event checkers.

Shape (YAML):

    unknown_events: allow          # allow | reject — track events not listed below
    events:
      Order Completed:
        additional_properties: true  # default; false rejects properties not listed
        properties:
          order_id: {type: string, required: true}
          revenue: {type: number, nullable: true}
          currency: string           # shorthand for {type: string}

Types: string, number, integer, boolean, object, array, any. The plan applies to `track` events by
their `event` name; other message types are checked structurally by the validate stage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class PlanError(ValueError):
    """The tracking plan file is wrong; the message names the file and the place."""


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_integer(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "number": _is_number,
    "integer": _is_integer,
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "any": lambda v: True,
}


@dataclass(frozen=True, slots=True)
class PropertyRule:
    name: str
    type: str
    check: Callable[[Any], bool]
    required: bool
    nullable: bool


@dataclass(frozen=True, slots=True)
class EventRule:
    name: str
    properties: tuple[PropertyRule, ...]
    known: frozenset[str]
    additional_properties: bool

    def violations(self, props: Mapping[str, Any]) -> list[str]:
        reasons: list[str] = []
        for rule in self.properties:
            if rule.name not in props:
                if rule.required:
                    reasons.append(f"property '{rule.name}' is required by the tracking plan for '{self.name}'")
                continue
            value = props[rule.name]
            if value is None:
                if not rule.nullable and rule.required:
                    reasons.append(f"property '{rule.name}' is required and may not be null")
                continue
            if not rule.check(value):
                reasons.append(
                    f"property '{rule.name}' must be {rule.type}, got {_json_type(value)} for '{self.name}'"
                )
        if not self.additional_properties:
            extra = sorted(k for k in props if k not in self.known)
            if extra:
                reasons.append(f"properties not in the tracking plan for '{self.name}': {', '.join(extra)}")
        return reasons


def _json_type(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return "null" if v is None else type(v).__name__


@dataclass(frozen=True, slots=True)
class TrackingPlan:
    events: Mapping[str, EventRule]
    allow_unknown_events: bool

    def check_track(self, event: str, props: Mapping[str, Any]) -> list[str]:
        rule = self.events.get(event)
        if rule is None:
            return [] if self.allow_unknown_events else [f"event '{event}' is not in the tracking plan"]
        return rule.violations(props)


def compile_plan(doc: Any, *, where: str = "tracking plan") -> TrackingPlan:
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise PlanError(f"{where}: expected a mapping with 'events' and 'unknown_events'")
    unknown_top = set(doc) - {"unknown_events", "events", "version", "description"}
    if unknown_top:
        raise PlanError(f"{where}: unknown keys {sorted(unknown_top)}")
    policy = doc.get("unknown_events", "allow")
    if policy not in ("allow", "reject"):
        raise PlanError(f"{where}: unknown_events must be 'allow' or 'reject', got {policy!r}")
    events_doc = doc.get("events") or {}
    if not isinstance(events_doc, dict):
        raise PlanError(f"{where}: 'events' must map event names to definitions")
    events: dict[str, EventRule] = {}
    for name, spec in events_doc.items():
        at = f"{where}: events.{name!r}"
        spec = spec or {}
        if not isinstance(spec, dict):
            raise PlanError(f"{at}: expected a mapping with 'properties'")
        bad = set(spec) - {"properties", "additional_properties", "description"}
        if bad:
            raise PlanError(f"{at}: unknown keys {sorted(bad)}")
        rules = []
        for prop, pspec in (spec.get("properties") or {}).items():
            rules.append(_compile_property(str(prop), pspec, f"{at}.properties.{prop}"))
        extra = spec.get("additional_properties", True)
        if not isinstance(extra, bool):
            raise PlanError(f"{at}.additional_properties: expected true or false")
        events[str(name)] = EventRule(
            name=str(name), properties=tuple(rules), known=frozenset(r.name for r in rules),
            additional_properties=extra,
        )
    return TrackingPlan(events=events, allow_unknown_events=policy == "allow")


def _compile_property(name: str, spec: Any, at: str) -> PropertyRule:
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict):
        raise PlanError(f"{at}: expected a type name or {{type: ..., required: ...}}")
    bad = set(spec) - {"type", "required", "nullable", "description"}
    if bad:
        raise PlanError(f"{at}: unknown keys {sorted(bad)}")
    typ = spec.get("type", "any")
    if typ not in TYPE_CHECKS:
        raise PlanError(f"{at}: unknown type {typ!r} (expected one of {', '.join(TYPE_CHECKS)})")
    return PropertyRule(
        name=name, type=typ, check=TYPE_CHECKS[typ],
        required=bool(spec.get("required", False)), nullable=bool(spec.get("nullable", False)),
    )


def load_plan(path: Path) -> TrackingPlan:
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"tracking plan {path} not found: set FLYWHEEL_TRACKING_PLAN") from None
    except yaml.YAMLError as exc:
        raise PlanError(f"{path}: not valid YAML: {exc}") from None
    return compile_plan(doc, where=str(path))
