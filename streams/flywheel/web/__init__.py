"""HTTP edges: the admin listener (/health, /metrics, /sql, later the UI) and how listeners are served.

The public collector (/v1/*) is in collector/; it listens on its own port (docs/design.md §7).
"""
