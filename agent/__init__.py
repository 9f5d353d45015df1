"""edgefleet device agent: the daemon that runs inference pipelines on an edge device."""

__version__ = "0.1.0"
