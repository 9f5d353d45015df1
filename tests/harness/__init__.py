"""The harness of the tests, the benchmarks and the fault suites (never shipped to devices:
``pyproject.toml`` packages ``agent``, ``cloud_sync`` and ``device_profiles`` only).

``util`` (``wait_for``, ``free_port``, ``terminate``, …), ``broker`` (a Mosquitto on
loopback), ``models`` (the test models and videos), ``fleet`` (a registry, chunk server and
in-process agent around a broker), ``agent_process`` (``edgefleet-agent run`` as a child),
``tls`` (a TLS Mosquitto with the fleet CA), ``partition`` (a black-hole TCP proxy and its
scenarios), ``outage`` (the ingest database-outage scenario), ``postgres``, ``fake_tensorrt``,
``trt_bindings``, ``format_models`` and ``sim`` (the fleet simulator). Scripts import it as
``tests.harness``; they run as modules from the repository root (``python -m scripts.NAME``).
"""
