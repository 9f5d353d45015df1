"""The wire contract: topics, message models and their version (one place for both sides)."""

# 1.1: track ids in detections, object events (zones, lines, dwell) in events; zone/line counts,
# frames skipped by rate control, tracks, and stage sample count/sum in telemetry. All added
# fields are optional, so 1.0 messages still validate.
# 1.2: the id of the event clip in events (optional 'clip'), and the clip fetch topics
# clips/req (cloud→dev, fetch requests for clips/ID.mp4) and clips/resp (dev→cloud).
# 1.3: remote configuration (desired 'config', reported 'config'), what a pipeline's update
# waits for ('waiting') and whether its source ended ('source_ended'); signed commands on
# cmd (cloud→dev) and their results on cmd/result (dev→cloud).
CONTRACT_VERSION = "1.3"
