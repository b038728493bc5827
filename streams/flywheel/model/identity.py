"""Identity resolution (docs/design.md §3): pure functions.

- `person_id` = the user id once known; until then the anonymous id.
- identify (anonymousId A + userId U), alias (previousId A → userId U) and any event carrying both ids
  link A to U. The first link of A wins: a later link of A to another user is a conflict, counted and
  recorded, and A does not move. One user may own many anonymous ids (devices).
- events.raw is keyed by A (an alias by its previousId), so every link of A is decided on A's
  partition, in order: the outcome never depends on how partitions interleave.
- Junk ids ('null', 'undefined', '0', …) never become persons: `junk_id_reason` names them so the
  validate stage can send such events to the DLQ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Values SDKs and broken integrations send when they have no id (compared stripped, case-insensitive).
JUNK_IDS = frozenset({
    "", "null", "undefined", "none", "nil", "nan", "0", "-1", "anonymous", "guest", "unknown", "n/a", "na",
    "true", "false", "[object object]", "object", "id", "user_id", "userid", "anonymous_id", "anonymousid",
    "distinct_id", "distinctid", "not_authenticated", "email", "{}", "[]", '""', "''",
})
ID_FIELDS = ("userId", "anonymousId", "previousId")


def is_junk_id(value: str) -> bool:
    return value.strip().lower() in JUNK_IDS


def junk_id_reason(event: dict[str, Any]) -> str | None:
    """A reason if any id field holds a placeholder instead of a real id, else None."""
    junk = [f"{field} {event[field]!r}" for field in ID_FIELDS if event.get(field) and is_junk_id(event[field])]
    if junk:
        return f"not a real id (placeholder values never become persons): {', '.join(junk)}"
    # The persons table keeps its own bookkeeping under keys that start with NUL (stages/aggregate.py).
    nul = [field for field in ID_FIELDS if "\x00" in (event.get(field) or "")]
    if nul:
        return f"{', '.join(nul)} contains a NUL character"
    return None


@dataclass(frozen=True, slots=True)
class Link:
    """A first link of an anonymous id to a user: the record of identity.changes and a merge."""

    anonymous_id: str
    user_id: str


@dataclass(frozen=True, slots=True)
class Conflict:
    """A later link of an already-linked anonymous id to another user: refused."""

    anonymous_id: str
    linked_to: str
    refused: str


@dataclass(frozen=True, slots=True)
class Resolution:
    person_id: str
    link: Link | None = None
    conflict: Conflict | None = None


def linked_ids(event: dict[str, Any]) -> tuple[str, str] | None:
    """(anonymous id, user id) that this event links, if it carries both."""
    user = event.get("userId") or ""
    if not user:
        return None
    anon = event.get("previousId") if event.get("type") == "alias" else event.get("anonymousId")
    if not anon or anon == user:
        return None
    return anon, user


def resolve(
    event: dict[str, Any], linked_user: str | None, *, linked_by: str | None = None, origin: str | None = None
) -> Resolution:
    """Person of `event` and what it changes, given the user its anonymous id is linked to (if any).

    `linked_user` is the identity table's entry for the event's anonymous id (previousId for alias);
    `linked_by` the origin (raw partition@offset) of the record that made that link, `origin` this
    record's. Delivery is at-least-once and the table can be ahead of what was published (a crash
    after the table write, before the commit): a redelivery of the linking record itself re-emits its
    link, so the link reaches identity.changes and the merge at least once.
    """
    pair = linked_ids(event)
    user = event.get("userId") or ""
    if pair is None:
        if user:
            return Resolution(person_id=user)
        anon = event.get("anonymousId") or event.get("previousId") or ""
        return Resolution(person_id=linked_user or anon)
    anon, user = pair
    if linked_user is None:
        return Resolution(person_id=user, link=Link(anon, user))
    if linked_user != user:
        return Resolution(person_id=user, conflict=Conflict(anon, linked_user, user))
    if origin is not None and linked_by == origin:
        return Resolution(person_id=user, link=Link(anon, user))
    return Resolution(person_id=user)


class IdentityMap:
    """The identity table's semantics over a plain dict: what the ingest stage does with a Faust table.
    Used by the property tests and by anyone replaying identity outside the stream."""

    def __init__(self) -> None:
        self.links: dict[str, str] = {}
        self.conflicts: list[Conflict] = []

    def apply(self, event: dict[str, Any]) -> Resolution:
        pair = linked_ids(event)
        key = pair[0] if pair else (event.get("anonymousId") or event.get("previousId") or "")
        result = resolve(event, self.links.get(key))
        if result.link is not None:
            self.links[result.link.anonymous_id] = result.link.user_id
        if result.conflict is not None:
            self.conflicts.append(result.conflict)
        return result

    def person_of(self, distinct_id: str) -> str:
        return self.links.get(distinct_id, distinct_id)
