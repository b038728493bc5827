from pathlib import Path

import pytest
from flywheel import paths
from flywheel.model.plan import EventRule, PlanError, compile_plan, load_plan
from pydantic_core import SchemaValidator, ValidationError

PLAN = compile_plan({
    "unknown_events": "reject",
    "events": {
        "Order Completed": {
            "properties": {
                "order_id": {"type": "string", "required": True},
                "revenue": {"type": "number", "nullable": True},
                "items": "integer",
                "gift": "boolean",
            },
        },
        "Strict": {"additional_properties": False, "properties": {"a": "string"}},
    },
})


@pytest.mark.parametrize(("props", "reasons"), [
    ({"order_id": "o1", "revenue": 9.5, "items": 2, "gift": False}, []),
    ({"order_id": "o1", "revenue": None}, []),
    ({"order_id": "o1", "items": 2.0}, []),
    ({}, ["property 'order_id' is required by the tracking plan for 'Order Completed'"]),
    ({"order_id": 7}, ["property 'order_id' must be string, got integer for 'Order Completed'"]),
    ({"order_id": "o", "revenue": "9.5"}, ["property 'revenue' must be number, got string for 'Order Completed'"]),
    ({"order_id": "o", "revenue": True}, ["property 'revenue' must be number, got boolean for 'Order Completed'"]),
    ({"order_id": "o", "items": 1.5}, ["property 'items' must be integer, got number for 'Order Completed'"]),
    ({"order_id": "o", "unlisted": 1}, []),
    ({"order_id": "o", "revenue": 9}, []),
    ({"order_id": None}, ["property 'order_id' is required and may not be null"]),
    ({"order_id": "o", "items": "2"}, ["property 'items' must be integer, got string for 'Order Completed'"]),
    ({"order_id": "o", "items": True}, ["property 'items' must be integer, got boolean for 'Order Completed'"]),
    ({"order_id": "o", "gift": 1}, ["property 'gift' must be boolean, got integer for 'Order Completed'"]),
    ({"order_id": "o", "items": None, "gift": None}, []),
])
def test_track_properties_are_checked_against_the_plan(props, reasons):
    assert PLAN.check_track("Order Completed", props) == reasons
    assert accepts(PLAN.events["Order Completed"], props) == (reasons == [])


def accepts(rule: EventRule, props: dict) -> bool:
    """The rule in its pydantic-core form (what validate's fast path runs) takes these properties."""
    try:
        SchemaValidator(rule.schema).validate_python(props, strict=True)
    except ValidationError:
        return False
    return True


def test_unknown_events_follow_the_policy():
    assert PLAN.check_track("Nope", {}) == ["event 'Nope' is not in the tracking plan"]
    assert compile_plan({"unknown_events": "allow"}).check_track("Nope", {}) == []


def test_additional_properties_false_rejects_unlisted_ones():
    assert PLAN.check_track("Strict", {"a": "x", "b": 1, "c": 2}) == [
        "properties not in the tracking plan for 'Strict': b, c"
    ]
    assert not accepts(PLAN.events["Strict"], {"a": "x", "b": 1}) and accepts(PLAN.events["Strict"], {"a": "x"})


@pytest.mark.parametrize(("doc", "message"), [
    ({"unknown_events": "maybe"}, "unknown_events must be 'allow' or 'reject'"),
    ({"events": {"E": {"properties": {"p": "num"}}}}, "events.'E'.properties.p: unknown type 'num'"),
    ({"events": {"E": {"props": {}}}}, "events.'E': unknown keys ['props']"),
    ({"events": {"E": {"properties": {"p": {"type": "string", "requird": True}}}}}, "unknown keys ['requird']"),
    ({"evnts": {}}, "unknown keys ['evnts']"),
    ([1, 2], "expected a mapping"),
])
def test_plan_errors_say_what_and_where(doc, message):
    with pytest.raises(PlanError, match=None) as err:
        compile_plan(doc, where="plan.yaml")
    assert message in str(err.value)
    assert str(err.value).startswith("plan.yaml")


def test_the_shipped_plan_compiles():
    plan = load_plan(paths.schemas_dir() / "tracking_plan.yaml")
    assert "Order Completed" in plan.events


def test_a_missing_plan_file_names_the_setting(tmp_path: Path):
    with pytest.raises(PlanError, match="FLYWHEEL_TRACKING_PLAN"):
        load_plan(tmp_path / "nope.yaml")
