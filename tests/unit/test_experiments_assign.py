"""flywheel.experiments.assign: GrowthBook's published conformance vectors (tests/data/growthbook/), and the
split it gives."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from flywheel import experiments
from helpers import REPO

CASES = json.loads((REPO / "tests" / "data" / "growthbook" / "cases.json").read_text())


@pytest.mark.parametrize(("seed", "value", "version", "expected"), CASES["hash"])
def test_hash_vectors(seed, value, version, expected):
    assert experiments.unit(seed, value, version) == expected


@pytest.mark.parametrize(("name", "args", "expected"), CASES["getBucketRange"])
def test_bucket_range_vectors(name, args, expected):
    n, coverage, weights = args
    got = experiments.bucket_ranges(n, coverage, weights)
    assert [pytest.approx(list(r), abs=1e-9) for r in got] == expected, name


@pytest.mark.parametrize(("name", "n", "ranges", "expected"), CASES["chooseVariation"])
def test_choose_vectors(name, n, ranges, expected):
    assert experiments.choose(n, [tuple(r) for r in ranges]) == expected, name


@pytest.mark.parametrize(("n", "expected"), CASES["getEqualWeights"])
def test_equal_weight_vectors(n, expected):
    assert experiments.equal_weights(n) == pytest.approx(expected)


def test_assign_is_stable_and_splits_by_weight():
    variations = {"control": 0.5, "green": 0.3, "blue": 0.2}
    users = [f"user-{i}" for i in range(20_000)]
    got = [experiments.assign("checkout_button", u, variations) for u in users]
    assert got == [experiments.assign("checkout_button", u, variations) for u in users]  # deterministic
    share = Counter(got)
    for name, weight in variations.items():
        assert abs(share[name] / len(users) - weight) < 0.015
    # another experiment reshuffles the same users
    other = [experiments.assign("search_ranking", u, variations) for u in users[:2000]]
    assert sum(a != b for a, b in zip(got[:2000], other, strict=True)) > 1000
    # reduced coverage leaves users out; a user inside keeps their variation
    half = [experiments.assign("checkout_button", u, variations, coverage=0.5) for u in users]
    assert 0.45 < sum(v is None for v in half) / len(users) < 0.55
    assert all(h == g for h, g in zip(half, got, strict=True) if h is not None)
    assert experiments.assign("x", "héllo wörld 👋", {"a": 0.5, "b": 0.5}) in ("a", "b")
