"""Cloud ingest: device state, telemetry and events from MQTT into SQLite or PostgreSQL."""
