"""metrics/store.py: the definitions topic's records folded into the set in force (docs/design.md §13).

Laws (hypothesis): the changes `diff(a, b)` turn a into b — applied to the mapping, and folded as records
onto a store holding a; a store's mapping round-trips through YAML (export, then import) with no change;
the records carry what the audit trail needs (before and after, who, how)."""

from __future__ import annotations

import yaml
from flywheel.metrics.definitions import parse_metrics
from flywheel.metrics.store import Change, Stored, applied, diff, spec_version, split
from hypothesis import given, settings
from hypothesis import strategies as st

EVENTS = ["Page Viewed", "Buy", "Signed Up"]


@st.composite
def mappings(draw):
    out: dict = {}
    if draw(st.booleans()):
        out["lateness"] = draw(st.sampled_from(["7d", "3d"]))
    funnels = draw(st.lists(st.sampled_from(["a", "b", "c"]), unique=True, max_size=3))
    if funnels:
        out["funnels"] = [{"name": n, "window": draw(st.sampled_from(["1d", "6h"])),
                           "steps": [{"event": e} for e in draw(st.lists(st.sampled_from(EVENTS), min_size=1,
                                                                         max_size=3))]} for n in funnels]
    retention = draw(st.lists(st.sampled_from(["r", "s"]), unique=True, max_size=2))
    if retention:
        out["retention"] = [{"name": n, "cohort_event": draw(st.sampled_from(["any", *EVENTS])),
                             "return_event": "any", "period": "day", "horizon": draw(st.integers(1, 5))}
                            for n in retention]
    return out


def folded(mapping: dict) -> Stored:
    changes = diff({}, mapping, author="seed", via="file", at=0)
    return Stored().fold_all(enumerate(changes))


def normal(mapping: dict) -> dict:
    return {k: spec for k, (_, _, spec) in split(mapping).items()}


@settings(max_examples=200, deadline=None)
@given(mappings(), mappings())
def test_the_diff_of_two_sets_turns_one_into_the_other(a, b):
    changes = diff(a, b, author="ada", via="ui", at=1)
    assert normal(applied(a, changes)) == normal(b)
    store = folded(a)
    start = store.revision
    store.fold_all(enumerate(changes, start=start + 1))
    assert normal(store.mapping()) == normal(b)
    assert store.revision == start + len(changes)
    assert diff(b, b, author="ada", via="ui", at=1) == []
    for c in changes:  # what the audit trail shows
        assert c.author == "ada" and c.via == "ui"
        assert c.before == normal(a).get(c.key) and c.spec == normal(b).get(c.key)
        assert c.version == spec_version(c.spec)
        assert Change.from_bytes(c.to_bytes()) == c


@settings(max_examples=100, deadline=None)
@given(mappings())
def test_an_exported_set_imports_back_unchanged_and_compiles_the_same(a):
    store = folded(a)
    exported = yaml.safe_load(yaml.safe_dump(store.mapping(), sort_keys=False))
    assert diff(store.mapping(), exported, author="x", via="cli", at=0) == []
    assert ({f.name: f.version for f in parse_metrics(exported).funnels}
            == {f.name: f.version for f in parse_metrics(a).funnels})


def test_a_changed_definition_keeps_its_place_and_a_deleted_one_goes():
    a = {"funnels": [{"name": "a", "window": "1d", "steps": [{"event": "Buy"}]},
                     {"name": "b", "window": "1d", "steps": [{"event": "Buy"}]}]}
    store = folded(a)
    edited = {"funnels": [{"name": "a", "window": "2d", "steps": [{"event": "Buy"}]}]}
    changes = diff(store.mapping(), edited, author="vera", via="ui", at=5, comment="longer window")
    assert [(c.key, c.spec is None) for c in changes] == [("funnels/a", False), ("funnels/b", True)]
    store.fold_all(enumerate(changes, start=store.revision + 1))
    assert store.mapping() == edited and store.last.key == "funnels/b" and store.last.spec is None
    assert changes[0].before == a["funnels"][0] and changes[0].comment == "longer window"
    assert not Stored().mapping() and Stored().empty and not store.empty
