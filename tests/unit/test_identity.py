"""Identity resolution: first link wins, conflicts refused, junk never maps, interleaving-independent."""

import random
import zlib

import pytest
from flywheel.model.envelope import kafka_key
from flywheel.model.identity import JUNK_IDS, Conflict, IdentityMap, Link, is_junk_id, junk_id_reason, resolve
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.mark.parametrize(("event", "linked", "person", "link", "conflict"), [
    ({"type": "track", "anonymousId": "a"}, None, "a", None, None),
    ({"type": "track", "anonymousId": "a"}, "u", "u", None, None),
    ({"type": "track", "userId": "u"}, None, "u", None, None),
    ({"type": "identify", "anonymousId": "a", "userId": "u"}, None, "u", Link("a", "u"), None),
    ({"type": "track", "anonymousId": "a", "userId": "u"}, None, "u", Link("a", "u"), None),
    ({"type": "identify", "anonymousId": "a", "userId": "u"}, "u", "u", None, None),
    ({"type": "identify", "anonymousId": "a", "userId": "v"}, "u", "v", None, Conflict("a", "u", "v")),
    ({"type": "alias", "previousId": "a", "userId": "u"}, None, "u", Link("a", "u"), None),
    ({"type": "alias", "anonymousId": "x", "previousId": "a", "userId": "u"}, None, "u", Link("a", "u"), None),
    ({"type": "identify", "anonymousId": "u", "userId": "u"}, None, "u", None, None),
])
def test_resolve(event, linked, person, link, conflict):
    r = resolve(event, linked)
    assert (r.person_id, r.link, r.conflict) == (person, link, conflict)


@pytest.mark.parametrize("junk", ["null", "undefined", " Undefined ", "0", "", "   ", "anonymous", "[object Object]",
                                  "None", "NaN", "guest"])
def test_junk_ids_are_named(junk):
    assert is_junk_id(junk)
    reason = junk_id_reason({"type": "track", "anonymousId": "a1", "userId": junk or " "})
    assert reason is not None and "userId" in reason


def test_an_id_with_a_nul_character_is_refused():
    """The persons table keeps its bookkeeping under keys starting with NUL: no person may have such an id."""
    reason = junk_id_reason({"type": "track", "anonymousId": "\x00partition\x003"})
    assert reason is not None and "anonymousId contains a NUL character" in reason


def test_real_ids_are_not_junk():
    assert junk_id_reason({"anonymousId": "3f2a-11", "userId": "user@example.com", "previousId": "00"}) is None


def test_a_later_conflicting_link_does_not_move_the_anonymous_id():
    ids = IdentityMap()
    ids.apply({"type": "identify", "anonymousId": "a", "userId": "u"})
    ids.apply({"type": "identify", "anonymousId": "a", "userId": "v"})
    ids.apply({"type": "alias", "previousId": "a", "userId": "w"})
    assert ids.person_of("a") == "u"
    assert ids.conflicts == [Conflict("a", "u", "v"), Conflict("a", "u", "w")]
    assert ids.apply({"type": "track", "anonymousId": "a"}).person_id == "u"


ANON = [f"a{i}" for i in range(6)]
USERS = [f"u{i}" for i in range(4)]
JUNK = sorted(JUNK_IDS - {""})


def event_strategy(with_junk: bool):
    anon = st.sampled_from(ANON + (JUNK if with_junk else []))
    user = st.sampled_from(USERS + (JUNK if with_junk else []))
    return st.one_of(
        st.builds(lambda a: {"type": "track", "event": "E", "anonymousId": a}, anon),
        st.builds(lambda u: {"type": "track", "event": "E", "userId": u}, user),
        st.builds(lambda a, u: {"type": "track", "event": "E", "anonymousId": a, "userId": u}, anon, user),
        st.builds(lambda a, u: {"type": "identify", "anonymousId": a, "userId": u}, anon, user),
        st.builds(lambda a, u: {"type": "alias", "previousId": a, "userId": u}, anon, user),
    )


def identity_key(e):
    return e.get("previousId") if e["type"] == "alias" else e.get("anonymousId")


def partitions(events, n=3):
    parts = [[] for _ in range(n)]
    for e in events:
        parts[zlib.crc32(kafka_key(e).encode()) % n].append(e)
    return parts


def interleave(parts, rng):
    """One possible consumption order: each partition in order, partitions mixed at random."""
    queues = [list(p) for p in parts]
    out = []
    while any(queues):
        q = rng.choice([q for q in queues if q])
        out.append(q.pop(0))
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(event_strategy(with_junk=False), max_size=60), st.integers(0, 2**32 - 1))
def test_final_mapping_does_not_depend_on_partition_interleaving(events, seed):
    parts = partitions(events)
    rng = random.Random(seed)
    outcomes = []
    for _ in range(3):
        ids = IdentityMap()
        for e in interleave(parts, rng):
            ids.apply(e)
        outcomes.append((ids.links, sorted(map(repr, ids.conflicts))))
    assert outcomes[0] == outcomes[1] == outcomes[2]
    # First link wins: each anonymous id maps to the first user its own partition linked it to.
    for anon, user in outcomes[0][0].items():
        first = next(e["userId"] for e in events
                     if e.get("userId") and identity_key(e) == anon)
        assert user == first


@settings(max_examples=300, deadline=None)
@given(st.lists(event_strategy(with_junk=True), max_size=60))
def test_junk_ids_never_map(events):
    ids = IdentityMap()
    for e in events:
        if junk_id_reason(e) is None:  # what the validate stage lets through
            ids.apply(e)
    assert not any(is_junk_id(k) or is_junk_id(v) for k, v in ids.links.items())


def test_a_redelivered_linking_record_re_emits_its_link_and_nothing_else_does():
    identify = {"type": "identify", "anonymousId": "a", "userId": "u"}
    # The table already holds the link this very record made (crash after the table write).
    again = resolve(identify, "u", linked_by="events.raw/0@5", origin="events.raw/0@5")
    assert again.link == Link("a", "u") and again.conflict is None
    # Another record confirming the same link changes nothing.
    other = resolve(identify, "u", linked_by="events.raw/0@5", origin="events.raw/0@9")
    assert other.link is None and other.conflict is None
