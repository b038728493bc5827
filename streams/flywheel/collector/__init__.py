"""The collector: Segment's HTTP Tracking API (/v1/batch, /v1/track, …) in front of events.raw.

    server.py     aiohttp handlers (worker web server or `flywheel collector`), metrics
    intake.py     the pure decision for one request: Accepted(records) | Rejected(status, reason)
      body.py     Content-Encoding (gzip, deflate), bounded
      auth.py     write keys (Basic username or body `writeKey`) → non-secret source label
      batch.py    items of a request, shared fields merged in, encoded with their Kafka key
    committer.py  group commit: concurrent requests in one Kafka transaction, answered after commit
"""
