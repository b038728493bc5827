"""Definitions changed while events flow, on real Kafka + embedded ClickHouse (issue 18, docs/design.md §13).

One worker starts on a metrics file (which its first start stores); while journeys stream in, `flywheel
metrics import` adds a funnel, a retention and a segment whose conditions have no history in the person
states (one of them served another role before: a cohort event becomes a funnel step), and changes a funnel's
window (a new version, counted anew; the old version's cells stay readable). The worker takes
them up without a restart and backfills their history; it is killed (-9) in the middle of the backfill and
started again. Afterwards every view equals its oracle under the new definitions, cell by cell — the old
definitions' cells untouched, the new ones' history exact, no event counted twice at the seam — and the
change is in the audit table with who made it and how, and `flywheel metrics export` gives the set back.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import yaml
from flywheel.metrics import verify
from flywheel.metrics.definitions import parse_metrics
from flywheel.producer import Producer
from helpers import WorkerProcess, unique_settings, wait_until
from metrics_gen import METRICS_YAML_ONE_STORE_EACH, NOW, journeys, ms

OLD = yaml.safe_load(METRICS_YAML_ONE_STORE_EACH)
ADDED = {
    "funnels": [{"name": "signup_to_order", "window": "3d",  # Signed Up was a cohort condition only
                 "steps": [{"event": "Signed Up"}, {"event": "Product Added"}, {"event": "Order Completed"}]}],
    "retention": [{"name": "adders_checkout", "cohort_event": "Product Added", "return_event": "Checkout Started",
                   "period": "day", "horizon": 5}],
    "segments": [{"name": "repeat_adders", "all": [{"performed": "Product Added", "count": {"gte": 2},
                                                     "within": "30d"}]}],
}
NEW = {**OLD, **{k: [*OLD.get(k, []), *v] for k, v in ADDED.items()}}
# and one changed: a new version of checkout, counted anew; the old version's cells stay readable
NEW["funnels"] = [{**f, "window": "12h"} if f["name"] == "checkout" else f for f in NEW["funnels"]]


def cli(worker: WorkerProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flywheel.cli", *args], env=worker.env, capture_output=True,
                          text=True, timeout=180)


def test_definitions_added_while_events_flow_equal_the_oracles_after_a_kill_mid_backfill(kafka, tmp_path):
    messages, late = journeys()
    old_file, new_file = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old_file.write_text(yaml.safe_dump(OLD, sort_keys=False))
    new_file.write_text(yaml.safe_dump(NEW, sort_keys=False))
    clock = tmp_path / "clock"
    clock.write_text(str(ms(NOW)))
    # small pages with a pause: the backfill takes seconds, so the kill lands in its middle
    settings = unique_settings(kafka, tmp_path / "w", metrics=old_file, clock_file=clock, segment_sweep_seconds=1,
                               backfill_page_events=40, backfill_pause_seconds=0.3)
    worker = WorkerProcess(settings).start()
    half = len(messages) // 2

    def send(batch) -> None:
        with Producer(settings.kafka_bootstrap, topic=settings.topics.raw, source="test") as p:
            for m in batch:
                p.send(m)

    try:
        send(messages[:half])
        count = "SELECT count() FROM flywheel.events FINAL"
        wait_until(lambda: worker.scalar(count) >= half // 2, timeout=180, what="the first events in ClickHouse")
        sender = threading.Thread(target=send, args=(messages[half:],))
        sender.start()  # events keep coming while the definitions change and the backfill runs
        imported = cli(worker, "metrics", "import", str(new_file), "--author", "ada", "--comment", "growth review")
        assert imported.returncode == 0, imported.stdout + imported.stderr
        assert "add funnels/signup_to_order" in imported.stdout and "add segments/repeat_adders" in imported.stdout
        wait_until(lambda: worker.metric("flywheel_backfill_events_total") > 0, timeout=180, interval=0.2,
                   what="the backfill to start")
        worker.kill()
        first = worker.log_path.read_text(errors="replace")
        assert "backfill of revision" in first and " done: " not in first, "killed in the middle of the backfill"
        sender.join()
        worker.start()
        # the job goes on from its cursor, with the next owner of the leader partition
        wait_until(lambda: " done: " in worker.log_path.read_text(errors="replace").rsplit("===== start", 1)[-1],
                   timeout=300, what="the backfill to finish after the restart")
        wait_until(lambda: worker.scalar(count) == len(messages), timeout=300, what="every event in ClickHouse")
        send(late)
        wait_until(lambda: worker.scalar(count) == len(messages) + len(late), timeout=300, what="the late events")
        new = parse_metrics(NEW)
        try:
            final = wait_until(lambda: (lambda v, o: v if v == o else None)(verify.views(worker.sql),
                                                                             verify.oracles(worker.sql, new, ms(NOW))),
                               timeout=300, interval=2, what="views equal to the oracles of the new definitions")
        except AssertionError:
            v, o = verify.views(worker.sql), verify.oracles(worker.sql, new, ms(NOW))
            diff = {k: (sorted(v[k] - o[k])[:8], sorted(o[k] - v[k])[:8]) for k in v if v[k] != o[k]}
            raise AssertionError(f"views differ from the oracles (view-only, oracle-only): {diff}\n"
                                 f"{worker.log_tail(40)}") from None
        # the new definitions have history from before the change, not just what came after it
        assert {c[0] for c in final["funnel_daily"]} >= {"checkout", "shoes", "signup_to_order"}
        assert any(c[0] == "adders_checkout" and int(c[2]) > 0 for c in final["retention_daily"])
        assert any(seg == "repeat_adders" for seg, _ in final["segment_members"])
        assert worker.scalar("SELECT count() FROM flywheel.definition_backfills") >= 1
        # checkout changed: funnel_daily shows the new version (== its oracle, above); the old one's cells stay
        old_version = parse_metrics(OLD).funnels[0].version
        assert parse_metrics(OLD).funnels[0].name == "checkout" and new.funnels[0].version != old_version
        versions = {r[0] for r in worker.sql("SELECT DISTINCT definition_version FROM flywheel.funnel_daily_versions "
                                             "WHERE funnel = 'checkout'")}
        assert versions == {old_version, new.funnels[0].version}
        # audited: the import's changes, by whom and how; the first start's file before them
        audit = worker.sql("SELECT kind, name, change, author, via, comment FROM flywheel.definition_changes FINAL "
                           "WHERE via = 'cli' ORDER BY revision")
        assert [tuple(r[:3]) for r in audit] == [("funnels", "checkout", "changed"),
                                                  ("funnels", "signup_to_order", "added"),
                                                  ("retention", "adders_checkout", "added"),
                                                  ("segments", "repeat_adders", "added")]
        assert all(r[3:] == ["ada", "cli", "growth review"] for r in audit)
        assert worker.scalar("SELECT countIf(via = 'file') FROM flywheel.definition_changes FINAL") > 0
        exported = cli(worker, "metrics", "export")
        assert exported.returncode == 0 and yaml.safe_load(exported.stdout) == NEW, exported.stderr
        again = cli(worker, "metrics", "import", str(new_file))
        assert again.returncode == 0 and "nothing to change" in again.stdout
    finally:
        worker.stop()
