"""Adapter: the chunk server's outgoing queue, bounded in bytes per device and for all.

paho queues every QoS 1 answer until the broker acknowledges it (PUBACK), across reconnects
too; its own bound counts messages, which lets a flood of 256 KiB answers reach 512 MiB. Here
each answer is charged its payload + ``ANSWER_OVERHEAD`` against its device and the fleet
(``DeviceAccounts.reserve``) before it is handed to paho, and the charge comes back when paho
reports the PUBACK (``acknowledged``, from ``on_publish``). An answer that does not fit is
not queued at all (``SHED``): the device asks again, as after a lost message.
"""

from __future__ import annotations

import enum
import logging
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from cloud_sync.registry.admission import ANSWER_OVERHEAD, DeviceAccounts

__all__ = ["AnswerQueue", "Outcome"]

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """What became of one answer."""

    QUEUED = "queued"  # handed to paho (sent, or kept until the connection is back)
    SHED = "shed"  # a byte bound was reached: not queued
    FAILED = "failed"  # paho refused it


class AnswerQueue:
    """QoS 1 answers through paho, within ``accounts``' byte bounds.

    Args:
        client: the paho client (its ``on_publish`` must call ``acknowledged``).
        accounts: the per-device and fleet-wide byte ledger.
        lock: guards ``accounts`` (the caller's lock, shared). It is never held while paho
            is called: paho calls ``on_publish`` holding its own message lock, so holding ours
            around ``publish`` could deadlock the two threads.
    """

    def __init__(self, client: mqtt.Client, accounts: DeviceAccounts, lock: threading.Lock) -> None:
        self.client = client
        self.accounts = accounts
        self.lock = lock
        self._queued: dict[int, tuple[str, int]] = {}  # mid -> (device, bytes charged)
        self._acked_early: set[int] = set()  # PUBACKs seen before publish() returned the mid

    def reserve(self, device_id: str, nbytes: int) -> bool:
        """Hold ``nbytes`` for an answer still to be read (given to ``send`` as ``reserved``)."""
        with self.lock:
            return self.accounts.reserve(device_id, nbytes)

    def release(self, device_id: str, nbytes: int) -> None:
        """Give back a reservation that will not be sent."""
        with self.lock:
            self.accounts.release(device_id, nbytes)

    def send(
        self, device_id: str, topic: str, payload: bytes, *, reserved: int = 0
    ) -> tuple[Outcome, MQTTErrorCode]:
        """Queue ``payload`` for ``device_id`` if it fits; never raises.

        ``reserved`` (taken by ``reserve``) is exchanged for the answer's real charge.
        """
        charge = len(payload) + ANSWER_OVERHEAD
        with self.lock:
            self.accounts.release(device_id, reserved)
            if not self.accounts.reserve(device_id, charge):
                return Outcome.SHED, MQTTErrorCode.MQTT_ERR_SUCCESS
        try:
            info = self.client.publish(topic, payload, qos=1)
        except Exception as e:  # paho refusing a message must not end the caller's thread
            log.error("answer on %s not queued: %s", topic, e)
            with self.lock:
                self.accounts.release(device_id, charge)
            return Outcome.FAILED, MQTTErrorCode.MQTT_ERR_UNKNOWN
        # NO_CONN: paho keeps the QoS 1 message and sends it after reconnecting.
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            with self.lock:
                self.accounts.release(device_id, charge)
            return Outcome.FAILED, info.rc
        with self.lock:
            if info.mid in self._acked_early:
                self._acked_early.discard(info.mid)
                self.accounts.release(device_id, charge)
            else:
                self._queued[info.mid] = (device_id, charge)
        return Outcome.QUEUED, info.rc

    def acknowledged(self, mid: int) -> None:
        """paho's ``on_publish``: the broker has the answer ``mid``; its bytes leave."""
        with self.lock:
            queued = self._queued.pop(mid, None)
            if queued is None:
                self._acked_early.add(mid)  # publish() has not returned its mid yet
                return
            self.accounts.release(*queued)
