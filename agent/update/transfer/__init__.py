"""Files from the registry in byte windows over MQTT, resumable, and ngclient's fetcher.

- ``client``: ``ChunkClient``, the device's fetch topics (``fetch/req``, ``fetch/resp``) and
  the public API (``fetch_range``, ``iter_file``, ``fetch_file``).
- ``transfer``: one windowed download's state machine, behind the small ``Link`` interface
  it needs from its client.
- ``flow``: the flow-control arithmetic (RTT estimate, adaptive timeout, AIMD window,
  backoff, waits after ``busy``), pure.
- ``partial``: partial downloads on disk and their sidecars (resume).
- ``tuf_fetcher``: ``MqttFetcher``, python-tuf's ``FetcherInterface`` on a ``ChunkClient``.
- ``errors``: what a transfer raises.
"""
