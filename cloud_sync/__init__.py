"""edgefleet cloud side: model registry, rollout controller, telemetry ingest, operator CLI."""

__version__ = "0.1.0"
