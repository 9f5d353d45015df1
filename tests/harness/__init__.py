"""The harness of the tests, the benchmarks and the fault suites (never shipped to devices:
``pyproject.toml`` packages ``agent``, ``cloud_sync`` and ``device_profiles`` only).

``util`` (``wait_for``, ``free_port``, ``terminate``, …), ``broker`` (a Mosquitto on
loopback), ``models`` (the test models and videos), ``fleet`` (a registry, chunk server and
in-process agent around a broker), ``agent_process`` (``edgefleet-agent run`` as a child),
``fetch`` (raw fetch-protocol clients and a served folder), ``registry`` (ngclient reading a
registry's folder), ``rollout`` (devices as ingest rows, a desired-state watcher),
``ingest_messages``, ``pipeline`` (local models, an event collector), ``jetson_sysfs``,
``text_image``, ``tls`` (a TLS Mosquitto with the fleet CA), ``shared_groups`` (a device in
every ``$share`` group, a storing ingest worker), ``partition`` (a black-hole TCP proxy and
its scenarios), ``outage`` (the ingest database-outage scenario), ``postgres``,
``fake_tensorrt``, ``trt_bindings``, ``format_models`` and ``sim`` (the fleet simulator; its
``shards`` run it in child processes). Test files import helpers from here, never from each
other. Scripts import it as ``tests.harness``; they run as modules from the repository root
(``python -m scripts.NAME``).
"""
