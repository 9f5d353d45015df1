"""Device to cloud session: MQTT connection, desired and reported state."""
