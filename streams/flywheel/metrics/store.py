"""Stored definitions: the records of the definitions topic, folded into a metrics-file mapping (docs/design.md §13).

Pure. The definitions topic (one partition, compacted) holds one record per definition — key
`<kind>/<name>` (funnels, retention, segments, alerts, experiments) or `settings/` for the file's
top-level settings (lateness, close_after, activity, churn_risk, lifecycle, rfm) — whose value is a
`Change`: the definition as the metrics file writes it (`spec`; None once deleted), the one before it
(`before`), who made the change, when and through what. The latest record per key is the definition in
force; the topic's offsets order every change, so the offset of the last one is the *revision* of the
whole set. Every record also goes to ClickHouse (flywheel.definition_changes): the audit trail, which
compaction does not thin out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

KINDS = ("funnels", "retention", "segments", "alerts", "experiments")  # lists of named definitions
SETTINGS = "settings"  # the file's top-level settings: one document
SETTING_FIELDS = ("lateness", "close_after", "activity", "churn_risk", "lifecycle", "rfm")
VIAS = ("ui", "cli", "file")  # how a change was made: the UI, `flywheel metrics import`, a first start's file


class Change(BaseModel):
    """One record of the definitions topic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    name: str = ""
    spec: dict[str, Any] | None  # None: deleted
    before: dict[str, Any] | None = None
    version: str = ""  # digest of `spec` as stored ("" when deleted)
    author: str = Field(min_length=1)
    via: str
    at: int  # ms since the epoch
    comment: str = ""

    @property
    def key(self) -> str:
        return key_of(self.kind, self.name)

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump())

    @classmethod
    def from_bytes(cls, raw: bytes) -> Change:
        return cls.model_validate(orjson.loads(raw))


def key_of(kind: str, name: str) -> str:
    return f"{kind}/{name}"


def spec_version(spec: Mapping[str, Any] | None) -> str:
    """A digest of a definition as stored (canonical JSON): equal texts, equal versions."""
    if spec is None:
        return ""
    return hashlib.sha256(orjson.dumps(spec, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]


def split(mapping: Mapping[str, Any]) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """A metrics-file mapping → key → (kind, name, spec), in the file's order."""
    out: dict[str, tuple[str, str, dict[str, Any]]] = {}
    settings = {f: mapping[f] for f in SETTING_FIELDS if mapping.get(f) is not None}
    if settings:
        out[key_of(SETTINGS, "")] = (SETTINGS, "", settings)
    for kind in KINDS:
        for item in mapping.get(kind) or ():
            name = str(item.get("name", "")) if isinstance(item, Mapping) else ""
            out[key_of(kind, name)] = (kind, name, dict(item))
    return out


class Stored:
    """The definitions in force, folded from the topic's records in offset order."""

    def __init__(self) -> None:
        self.current: dict[str, Change] = {}  # key → latest change that is not a deletion, in first-put order
        self.revision = -1  # offset of the last record folded in (-1: none)
        self.last: Change | None = None
        self.records: list[tuple[int, Change]] = []  # every record folded in (a set is small)

    def fold(self, offset: int, change: Change) -> None:
        if change.spec is None:
            self.current.pop(change.key, None)
        else:
            self.current[change.key] = change
        self.revision, self.last = offset, change
        self.records.append((offset, change))

    def upto(self, revision: int) -> Stored:
        """The set as it was at `revision`."""
        return Stored().fold_all((o, c) for o, c in self.records if o <= revision)

    def fold_all(self, records: Iterable[tuple[int, Change]]) -> Stored:
        for offset, change in records:
            self.fold(offset, change)
        return self

    def copy(self) -> Stored:
        out = Stored()
        out.current, out.revision, out.last = dict(self.current), self.revision, self.last
        out.records = list(self.records)
        return out

    @property
    def empty(self) -> bool:
        return self.revision < 0

    def mapping(self) -> dict[str, Any]:
        """The stored set as a metrics-file mapping (what `flywheel metrics export` writes)."""
        return joined(self.current.values())


def joined(changes: Iterable[Change]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in changes:
        if c.spec is None:
            continue
        if c.kind == SETTINGS:
            out.update(c.spec)
        else:
            out.setdefault(c.kind, []).append(c.spec)
    return out


def diff(old: Mapping[str, Any], new: Mapping[str, Any], *, author: str, via: str, at: int,
         comment: str = "") -> list[Change]:
    """The changes that turn metrics-file mapping `old` into `new`: a put per added or edited definition,
    a deletion per one that is gone (settings count as one document)."""
    before, after = split(old), split(new)
    out = []
    for key, (kind, name, spec) in after.items():
        previous = before.get(key)
        if previous is None or spec_version(previous[2]) != spec_version(spec):
            out.append(Change(kind=kind, name=name, spec=spec, before=previous[2] if previous else None,
                              version=spec_version(spec), author=author, via=via, at=at, comment=comment))
    for key, (kind, name, spec) in before.items():
        if key not in after:
            out.append(Change(kind=kind, name=name, spec=None, before=spec, author=author, via=via, at=at,
                              comment=comment))
    return out


def applied(mapping: Mapping[str, Any], changes: Iterable[Change]) -> dict[str, Any]:
    """`mapping` with `changes` made to it (what a set of changes would put in force: validate it first)."""
    parts = {k: Change(kind=kind, name=name, spec=spec, author="-", via="file", at=0)
             for k, (kind, name, spec) in split(mapping).items()}
    for c in changes:
        if c.spec is None:
            parts.pop(c.key, None)
        else:
            parts[c.key] = c
    return joined(parts.values())
