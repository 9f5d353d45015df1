"""Device telemetry: stats, aggregation, the outbox."""
