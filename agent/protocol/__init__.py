"""The wire contract: topics, message models and their version (one place for both sides)."""

# 1.1: track ids in detections, object events (zones, lines, dwell) in events; zone/line counts,
# frames skipped by rate control, tracks, and stage sample count/sum in telemetry. All added
# fields are optional, so 1.0 messages still validate.
CONTRACT_VERSION = "1.1"
