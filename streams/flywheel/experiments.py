"""Deterministic assignment of users to variations, for backend services (`flywheel.experiments.assign`).

GrowthBook's documented scheme, so that its SDKs in other languages assign the same user the same way:
the unit `n = (fnv1a32(str(fnv1a32(seed + user))) % 10000) / 10000` (hash version 2; FNV-1a 32 over
UTF-16 code units, as JavaScript's `charCodeAt`), and the variation whose bucket range — cumulative
weights, scaled by the coverage — holds n (none if n falls in the uncovered part). Tested against
GrowthBook's conformance vectors (tests/data/growthbook/).

Nothing is emitted: the caller logs the exposure (Segment's `Experiment Viewed`, with `experiment_id` and
`variation_id`), which the stream's experiment results count from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

FNV_OFFSET, FNV_PRIME = 0x811C9DC5, 0x01000193


def fnv1a32(text: str) -> int:
    """FNV-1a, 32 bits, over the UTF-16 code units of `text`."""
    h = FNV_OFFSET
    data = text.encode("utf-16-le", "surrogatepass")
    for i in range(0, len(data), 2):
        h = ((h ^ (data[i] | data[i + 1] << 8)) * FNV_PRIME) & 0xFFFFFFFF
    return h


def unit(seed: str, value: str, version: int = 2) -> float | None:
    """The user's point in [0, 1) for `seed` (GrowthBook's `hash`): version 2 (current) or 1 (legacy)."""
    if version == 2:
        return fnv1a32(str(fnv1a32(seed + value))) % 10000 / 10000
    if version == 1:
        return fnv1a32(value + seed) % 1000 / 1000
    return None


def equal_weights(n: int) -> list[float]:
    return [1 / n] * n if n > 0 else []


def bucket_ranges(n: int, coverage: float = 1.0, weights: Sequence[float] | None = None) -> list[tuple[float, float]]:
    """Each variation's [start, end) in the unit interval: weights cumulated, each range cut to `coverage`
    of its width. Weights that are not n non-negative numbers summing to 1 (±0.01) become equal weights."""
    coverage = min(1.0, max(0.0, coverage))
    if (weights is None or len(weights) != n
            or not all(isinstance(w, int | float) and math.isfinite(w) and w >= 0 for w in weights)
            or not 0.99 <= sum(weights) <= 1.01):
        weights = equal_weights(n)
    out, start = [], 0.0
    for w in weights:
        out.append((start, start + coverage * w))
        start += w
    return out


def choose(n: float, ranges: Sequence[tuple[float, float]]) -> int:
    """The index of the range holding n, or -1."""
    for i, (start, end) in enumerate(ranges):
        if start <= n < end:
            return i
    return -1


def assign(experiment: str, user_id: str, variations: Mapping[str, float], *, seed: str | None = None,
           coverage: float = 1.0) -> str | None:
    """The variation `user_id` gets in `experiment`: `variations` maps names to weights (their order is the
    bucket order — the same as the metrics file's `variations:`, and as a GrowthBook experiment's). None
    when the user falls outside the coverage. `seed` defaults to the experiment's name (GrowthBook: the
    experiment key)."""
    n = unit(seed if seed is not None else experiment, user_id)
    names = list(variations)
    i = choose(n, bucket_ranges(len(names), coverage, [float(w) for w in variations.values()]))
    return names[i] if i >= 0 else None


def answer(body: object, experiments: Mapping[str, Mapping[str, float]]) -> tuple[int, dict]:
    """POST /v1/assign (the collector): `{"experiment": name, "userId": id}` (or `anonymousId`) → (HTTP status,
    `{"experiment", "userId" | "anonymousId", "variation", "hashVersion": 2}`), with the variations and weights
    of the metrics file's experiment; an error says what to send."""
    if not isinstance(body, dict):
        return 400, {"error": 'send a JSON object: {"experiment": "<name>", "userId": "<id>"}'}
    name = body.get("experiment")
    variations = experiments.get(name) if isinstance(name, str) else None
    if variations is None:
        return 404, {"error": f"no experiment {name!r} in the metrics file; there are: {sorted(experiments)}"}
    id_field = "userId" if body.get("userId") not in (None, "") else "anonymousId"
    unit_id = body.get(id_field)
    if not isinstance(unit_id, str | int) or isinstance(unit_id, bool) or unit_id == "":
        return 400, {"error": "give the unit to assign as userId (or anonymousId): a non-empty string"}
    return 200, {"experiment": name, id_field: str(unit_id), "variation": assign(name, str(unit_id), variations),
                 "hashVersion": 2}
