"""flywheel/registry.py and runtime/definitions.py without Kafka (read/write replaced): which set is in force,
what a first start stores, what a process does with a stored revision it cannot compile (docs/design.md §13).
On a real broker: tests/integration/test_definitions_stream.py."""

from __future__ import annotations

import asyncio
import math

import pytest
from flywheel import registry
from flywheel.config import Settings
from flywheel.metrics.definitions import MetricsError
from flywheel.metrics.store import Change, Stored, diff
from flywheel.runtime.definitions import DefinitionsWatch

FUNNEL = {"name": "f", "window": "1d", "steps": [{"event": "A"}, {"event": "B"}]}
ALERT = {"name": "a", "series": {"events": "A"}, "rule": {"threshold": {"below": 1}},
         "notify": [{"webhook": "https://hooks.example.com/x"}]}


def change(kind: str, spec: dict | None, name: str | None = None) -> Change:
    return Change(kind=kind, name=name or spec["name"], spec=spec, author="t", via="cli", at=0)


@pytest.fixture()
def settings(tmp_path, monkeypatch):
    metrics = tmp_path / "metrics.yaml"
    metrics.write_text("funnels:\n  - {name: f, window: 1d, steps: [{event: A}, {event: B}]}\n")
    monkeypatch.setenv("FLYWHEEL_ALERT_WEBHOOKS", "")  # no webhook allowed here
    return Settings(data_dir=tmp_path, metrics=metrics)


def test_a_first_start_stores_the_file_and_a_lost_store_is_refused(settings, monkeypatch):
    store = Stored()
    written: list[Change] = []
    monkeypatch.setattr(registry, "read", lambda s: store)

    def write(s, changes):
        written.extend(changes)
        store.fold_all(enumerate(changes, start=store.revision + 1))
        return store.revision
    monkeypatch.setattr(registry, "write", write)
    with pytest.raises(MetricsError, match="were lost"):  # the audit trail says there was a store
        registry.seed(settings, audited=3)
    assert not written
    state = registry.seed(settings)
    assert [c.key for c in written] == ["funnels/f"] and written[0].via == "file"
    assert state.source == "stored" and [f.name for f in state.metrics.funnels] == ["f"]
    settings.metrics.write_text("funnels: []\n")  # the file changes: the store stays in force, and says so
    state = registry.seed(settings)
    assert state.file_differs == ["funnels/f"] and [f.name for f in state.metrics.funnels] == ["f"]


def test_a_revision_that_does_not_compile_here_keeps_the_last_that_does(settings):
    stored = Stored().fold_all([(0, change("funnels", FUNNEL)), (1, change("alerts", ALERT))])
    metrics, usable, broken = registry.newest_valid(settings, stored)
    assert [f.name for f in metrics.funnels] == ["f"] and not metrics.alerts
    assert usable.revision == 0 and "not allowed by FLYWHEEL_ALERT_WEBHOOKS" in broken
    state = registry.in_force(settings, stored=stored)
    assert "NOT the newest" in state.describe()


def test_a_value_json_cannot_carry_is_refused_before_it_is_stored(settings):
    nan = {**FUNNEL, "steps": [{"event": "A", "where": {"price": math.nan}}, {"event": "B"}]}
    with pytest.raises(MetricsError):
        registry.changes_for(settings, {"funnels": [nan]}, author="t", via="cli", stored=Stored())


def test_the_watch_follows_every_record_and_hands_on_only_sets_that_compile(settings):
    got: list[tuple] = []

    async def on_change(metrics, stored) -> None:
        got.append((stored.revision, [f.name for f in metrics.funnels], [a.name for a in metrics.alerts]))

    async def go():
        watch = DefinitionsWatch(settings, Stored(), on_change)
        await watch.take([(0, change("funnels", FUNNEL))])
        await watch.take([(1, change("alerts", ALERT)), (2, change("funnels", {**FUNNEL, "name": "g"}))])
        assert watch.revision == 2  # followed, though not handed on
        await watch.take([(3, change("alerts", None, name="a"))])  # the bad rule goes: the set compiles again
    asyncio.run(go())
    assert got == [(0, ["f"], []), (3, ["f", "g"], [])]


def test_import_deletes_what_the_file_leaves_out_unless_told_to_keep_it(settings):
    stored = Stored().fold_all(enumerate(diff({}, {"funnels": [FUNNEL, {**FUNNEL, "name": "g"}]}, author="t",
                                              via="ui", at=0)))
    _, changes = registry.changes_for(settings, {"funnels": [FUNNEL]}, author="t", via="cli", stored=stored)
    assert [(c.key, c.spec is None) for c in changes] == [("funnels/g", True)]
    _, kept = registry.changes_for(settings, {"funnels": [FUNNEL]}, author="t", via="cli", stored=stored,
                                   keep_others=True)
    assert kept == []
