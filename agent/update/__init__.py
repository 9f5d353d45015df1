"""Device side of model delivery: TUF client over MQTT, model store, update state machine."""
