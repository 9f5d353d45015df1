"""The ground both sides stand on: error roots, atomic file writes, MQTT client helpers, backoff.

Imports nothing else of ``agent`` (tests/system/test_layering.py checks it), so ``cloud_sync`` and
every device package can build on it.
"""
