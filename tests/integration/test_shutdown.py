"""SIGTERM ends a worker cleanly — exit 0 — also after a kill -9 and a restart, and nothing is lost or counted
twice (3 cycles here; bench/shutdown.py runs the long loop). Workers used to crash at exit one SIGTERM in
three (SIGSEGV, exit 139, in embedded ClickHouse's teardown)."""

from __future__ import annotations

import pytest
from shutdown_cycles import run_cycles

pytestmark = pytest.mark.integration


def test_sigterm_exits_0_after_kills_and_restarts_and_nothing_is_lost(pipeline_settings):
    cycles = run_cycles(pipeline_settings, cycles=3, events_per_cycle=400)
    assert [c.terminated for c in cycles] == [0, 0, 0], cycles
    assert [c.killed for c in cycles] == [-9, None, -9]
    assert cycles[-1].rows == cycles[-1].sent == 1200
