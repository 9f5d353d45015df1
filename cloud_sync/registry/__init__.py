"""The model registry: a TUF repository, publishing, and serving it over MQTT."""
