"""Pure: the test hooks — one object that stretches or breaks parts of the agent on purpose.

Fault tests need to kill the agent while an engine builds or while a built model is on trial,
and to see a build's child process die. The hooks live in one frozen ``TestHooks`` passed to
the ``Agent``, the ``UpdateManager`` and the engine builder; the default (``NO_HOOKS``) does
nothing, and production code never sets one. Child processes in tests get theirs from the
environment, read once by the CLI entry (``agent.cli``) through ``TestHooks.from_env``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

BUILD_SLEEP_ENV = "EDGEFLEET_TEST_BUILD_SLEEP_S"
TRIAL_SLEEP_ENV = "EDGEFLEET_TEST_TRIAL_SLEEP_S"


@dataclass(frozen=True)
class TestHooks:
    """Test-only behaviour; every field's default means "as in production".

    Attributes:
        build_sleep_s: each engine build's child process sleeps this long first, so a test
            can kill the agent while it builds.
        build_crash: each engine build's child writes a partial file, then exits with this
            code, or kills itself with ``"SIGKILL"`` (as the OOM killer would).
        trial_sleep_s: the update manager waits this long before a trial, so a test can kill
            the agent while a built model is on trial.
    """

    __test__ = False  # not a pytest test class, whatever its name

    build_sleep_s: float = 0.0
    build_crash: int | str | None = None
    trial_sleep_s: float = 0.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TestHooks:
        """The hooks named by ``EDGEFLEET_TEST_BUILD_SLEEP_S`` and
        ``EDGEFLEET_TEST_TRIAL_SLEEP_S`` (unset or empty: none)."""
        return cls(
            build_sleep_s=float(env.get(BUILD_SLEEP_ENV) or 0.0),
            trial_sleep_s=float(env.get(TRIAL_SLEEP_ENV) or 0.0),
        )


NO_HOOKS = TestHooks()
