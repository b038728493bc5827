"""Flywheel: real-time product analytics. Segment-shaped events → Kafka/Faust → ClickHouse."""

__version__ = "0.1.0"
