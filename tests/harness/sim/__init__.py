"""Fleet simulator: N devices running the agent's real sync, update and telemetry code, with
the camera and the inference simulated (``engine``), many MQTT clients per thread
(``netloop``), one device (``device``) and the fleet (``fleet``)."""

from __future__ import annotations

from tests.harness.sim.device import SimDevice
from tests.harness.sim.engine import (
    ProfileFn,
    SimPipeline,
    SimProfile,
    default_profile,
    make_profile_fn,
    open_sim_model,
)
from tests.harness.sim.fleet import SimFleet
from tests.harness.sim.netloop import MqttLoop

__all__ = [
    "MqttLoop",
    "ProfileFn",
    "SimDevice",
    "SimFleet",
    "SimPipeline",
    "SimProfile",
    "default_profile",
    "make_profile_fn",
    "open_sim_model",
]
