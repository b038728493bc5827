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

Each event's rule has two forms, built from the same plan data: `EventRule.violations`, hand-written checks
that name every reason (the validate stage's reason path), and `EventRule.schema`, the same rule as a
pydantic-core schema (what the validate stage's fast path runs). The schema accepts exactly the properties
in which `violations` finds nothing wrong; tests/unit/test_validate_equivalence.py checks that on random
rules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic_core import PydanticCustomError, core_schema
from pydantic_core.core_schema import CoreSchema

from flywheel.model.envelope import json_type


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


def _integral(value: float) -> float:
    if not value.is_integer():
        raise PydanticCustomError("integral", "not an integer")
    return value


# TYPE_CHECKS as pydantic-core schemas, for the non-null values orjson decodes (null is the rule's business:
# `nullable`, `required`). Strict means exact types, as the isinstance checks above: no "1" taken for a
# number, no bool for a number or a string. Only acceptance is used, never the validated value (a strict
# float takes an int and makes it a float: harmless here).
_INT = core_schema.int_schema(strict=True)
_FLOAT = core_schema.float_schema(strict=True)
TYPE_SCHEMAS: dict[str, CoreSchema] = {
    "string": core_schema.str_schema(strict=True),
    "number": core_schema.union_schema([_INT, _FLOAT], mode="left_to_right"),
    # an int, or a float with no fractional part (2.0): pydantic's float→int coercion (lax mode only) and
    # multiple_of (within a tolerance) are not quite that, so the float case asks is_integer().
    "integer": core_schema.union_schema(
        [_INT, core_schema.no_info_after_validator_function(_integral, _FLOAT)], mode="left_to_right"),
    "boolean": core_schema.bool_schema(strict=True),
    "object": core_schema.is_instance_schema(dict),
    "array": core_schema.is_instance_schema(list),
    "any": core_schema.is_instance_schema((str, int, float, list, dict)),  # any JSON value but null
}
assert TYPE_SCHEMAS.keys() == TYPE_CHECKS.keys()


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
                    f"property '{rule.name}' must be {rule.type}, got {json_type(value)} for '{self.name}'"
                )
        if not self.additional_properties:
            extra = sorted(k for k in props if k not in self.known)
            if extra:
                reasons.append(f"properties not in the tracking plan for '{self.name}': {', '.join(extra)}")
        return reasons

    @property
    def schema(self) -> CoreSchema:
        """`violations` as a pydantic-core schema of the properties object (strict, Python mode): it
        accepts exactly the objects in which `violations` finds nothing."""
        fields = {}
        for rule in self.properties:
            typed = TYPE_SCHEMAS[rule.type]
            if not (rule.required and not rule.nullable):  # null is refused only when required and not nullable
                typed = core_schema.nullable_schema(typed)
            fields[rule.name] = core_schema.typed_dict_field(typed, required=rule.required)
        return core_schema.typed_dict_schema(
            fields, extra_behavior="ignore" if self.additional_properties else "forbid", strict=True)


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
