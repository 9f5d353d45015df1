"""The wire contract: topics, message models and their version (one place for both sides)."""

CONTRACT_VERSION = "1.0"
