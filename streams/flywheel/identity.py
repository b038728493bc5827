"""Identity resolution (DESIGN §3).

`person_id` = the user id once known, until then the anonymous id. This first version resolves from
the event's own ids; linking anonymous ids seen earlier to a user (the identity table, merges) builds
on it.
"""

from __future__ import annotations

from typing import Any


def person_id(event: dict[str, Any]) -> str:
    return event["userId"] or event["anonymousId"]
