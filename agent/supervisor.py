"""Adapter: ``edgefleet-agent run`` as a long-lived service — signals, systemd, reloads.

- ``READY=1`` once the agent has started (every pipeline runs or waits for its model);
  ``WATCHDOG=1`` every half ``WatchdogSec`` only while ``Liveness`` says every pipeline makes
  progress or legitimately waits, so a hung inference gets the agent restarted by systemd.
- SIGTERM/SIGINT: ``STOPPING=1``, then ``Agent.stop`` (pipelines, a last telemetry snapshot,
  the outbox drained while the broker is reachable, the session closed).
- A ``restart_agent`` command (``Agent.request_restart``): the agent stops as on SIGTERM and
  the process exits with ``RESTART_EXIT_CODE`` (75), which the unit restarts.
- SIGHUP: the config file is read again; an invalid one is logged and ignored (the agent keeps
  running as it was, ``STATUS=`` says why); a valid one replaces the running agent
  (``RELOADING=1`` … ``READY=1``). If the new config's agent cannot start, the error ends
  the process and systemd's ``Restart=on-failure`` takes over.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from agent.common.errors import ConfigError
from agent.config import AgentConfig, load_config
from agent.service import Agent
from agent.systemd import RESTART_EXIT_CODE, Liveness, notify, watchdog_interval

log = logging.getLogger(__name__)


class Supervisor:
    """Runs one agent at a time from a config file until told to stop."""

    def __init__(
        self,
        config_path: Path | None,
        cfg: AgentConfig,
        *,
        env: Mapping[str, str] | None = None,
        make_agent: Callable[[AgentConfig], Agent] = Agent,
        status_every_s: float = 2.0,
        exit_when_sources_end: bool = False,
    ) -> None:
        self.config_path = config_path
        self.cfg = cfg
        self.env = os.environ if env is None else env
        self.make_agent = make_agent
        self.status_every_s = status_every_s
        self.exit_when_sources_end = exit_when_sources_end
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._wake = threading.Event()
        self.watchdog_s = watchdog_interval(self.env)
        self.reloads = 0
        self.exit_code = 0  # RESTART_EXIT_CODE after a restart_agent command
        self._status_errno: int | None = None
        self._ended: dict[int, set[str]] = {}  # per agent (by id): pipelines whose source ended
        self._exit_at_end = exit_when_sources_end

    def _on_stop(self, *_: object) -> None:
        self._stop.set()
        self._wake.set()

    def _on_hup(self, *_: object) -> None:
        self._reload.set()
        self._wake.set()

    def _notify(self, msg: str) -> None:
        notify(msg, self.env)

    def run(self, duration_s: float | None = None) -> int:
        """Run until SIGTERM/SIGINT or ``duration_s``. When every source has ended (files
        without ``loop``) the agent says so and keeps serving updates and commands; it exits
        then only with ``exit_when_sources_end``, a ``duration_s``, or nothing left to serve
        (no ``[broker]`` and no ``[api]``)."""
        handlers = {signal.SIGTERM: self._on_stop, signal.SIGINT: self._on_stop,
                    signal.SIGHUP: self._on_hup}  # fmt: skip
        old = {}
        if threading.current_thread() is threading.main_thread():
            old = {sig: signal.signal(sig, fn) for sig, fn in handlers.items()}
        try:
            return self._run(duration_s)
        finally:
            for sig, prev in old.items():
                signal.signal(sig, prev)

    def _run(self, duration_s: float | None) -> int:
        deadline = None if duration_s is None else time.monotonic() + duration_s
        first = self.make_agent(self.cfg)
        first.start()
        self._notify(f"READY=1\nSTATUS=running {len(first.pipelines)} pipeline(s)")
        agent: Agent | None = first
        self._exit_at_end = self.exit_when_sources_end or duration_s is not None
        try:
            while agent is not None:
                agent = self._serve(agent, deadline)
            return self.exit_code
        finally:
            self._notify("STOPPING=1")

    def _serve(self, agent: Agent, deadline: float | None) -> Agent | None:
        """Supervise ``agent``; returns its replacement after a reload, None when done."""
        live = Liveness(stall_s=self.cfg.service.stall_s)
        next_ping = 0.0
        stalled: list[str] = []
        replacement: Agent | None = None
        agent.on_restart_request.append(self._wake.set)
        try:
            while not self._stop.is_set():
                self._write_status(agent)
                if agent.restart_requested.is_set():  # restart_agent: the unit restarts us
                    log.info("restart requested by command: exiting with %d", RESTART_EXIT_CODE)
                    self.exit_code = RESTART_EXIT_CODE
                    return None
                if self._sources_ended(agent):
                    return None
                now = time.monotonic()
                statuses = [{**p.status(now, reader="watchdog"), "finished": p.finished.is_set()}
                            for p in agent.pipelines]  # fmt: skip
                now_stalled = live.check(statuses, now)
                if now_stalled != stalled:
                    for why in now_stalled:
                        log.error("watchdog: pipeline stalled, not pinging systemd: %s", why)
                    self._notify("STATUS=" + ("; ".join(now_stalled) or "running"))
                    stalled = now_stalled
                if self.watchdog_s and not stalled and now >= next_ping:
                    self._notify("WATCHDOG=1")
                    next_ping = now + self.watchdog_s
                if self._reload.is_set():
                    self._reload.clear()
                    replacement = self._reloaded(agent)
                    if replacement is not None:
                        return replacement
                wait = self.status_every_s
                if self.watchdog_s:
                    wait = min(wait, max(0.05, next_ping - now))
                if deadline is not None:
                    wait = min(wait, deadline - now)
                    if wait <= 0:
                        return None
                self._wake.wait(wait)
                self._wake.clear()
            return None
        finally:
            if replacement is None:  # done (or failing): the old agent stops here
                self._write_status(agent)
                agent.stop()

    def _sources_ended(self, agent: Agent) -> bool:
        """Note sources that ended (log, reported state); True when the agent should exit."""
        ended = {p.name for p in agent.pipelines if p.finished.is_set()}
        if ended == self._ended.get(id(agent), set()):
            return False
        for name in sorted(ended - self._ended.get(id(agent), set())):
            log.info("device=%s pipeline=%s source ended", agent.cfg.device_id, name)
        self._ended[id(agent)] = ended
        if agent.updates is not None:
            agent.updates.report()  # source_ended in the reported state
        if not agent.pipelines or len(ended) < len(agent.pipelines):
            return False
        serving = agent.cfg.broker is not None or agent.cfg.api is not None
        if self._exit_at_end or not serving:
            log.info("device=%s every source has ended; exiting", agent.cfg.device_id)
            return True
        log.info(
            "device=%s every source has ended; still serving updates and commands "
            "(edgefleet-agent run --exit-when-sources-end exits instead)",
            agent.cfg.device_id,
        )
        self._notify("STATUS=every source has ended; serving updates and commands")
        return False

    def _write_status(self, agent: Agent) -> None:
        """status.json for ``edgefleet-agent status``; a full or read-only disk must not end
        the agent (the pipelines keep running), so the error is logged once per kind."""
        try:
            agent.write_status()
        except OSError as e:
            if e.errno != self._status_errno:
                log.error("status.json not written (the agent keeps running): %s", e)
                self._status_errno = e.errno
        else:
            self._status_errno = None

    def _reloaded(self, agent: Agent) -> Agent | None:
        """The agent for the re-read config, or None to keep ``agent`` (bad or no config)."""
        if self.config_path is None:
            log.warning("SIGHUP: no config file to reload (started without --config)")
            return None
        try:
            cfg = load_config(self.config_path, env=self.env)
        except ConfigError as e:
            log.error("SIGHUP: config not reloaded, the agent keeps running as it was: %s", e)
            self._notify(f"STATUS=reload failed: {str(e)[:200]}")
            return None
        self._notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        log.info("SIGHUP: reloading %s", self.config_path)
        self._write_status(agent)
        agent.stop()
        self.cfg = cfg
        new = self.make_agent(cfg)
        new.start()
        self.reloads += 1
        self._notify(f"READY=1\nSTATUS=reloaded, running {len(new.pipelines)} pipeline(s)")
        return new
