"""Bounds on every DICOM association the listener accepts, so nobody can lock modalities out.

pynetdicom's acceptor reads a PDU with blocking ``recv`` calls on a socket without a timeout:
a peer that sends a few bytes of an A-ASSOCIATE-RQ and stays silent holds its slot forever, and
a PDU's 32-bit length is trusted. Here, for every connection:

- each socket read times out after ``timeout`` seconds (besides pynetdicom's ACSE, DIMSE and
  network timeouts, set to the same value), so a silent or trickling peer is dropped;
- a PDU longer than the maximum PDU size we advertise is refused before it is read, and the
  bytes of one dataset are counted as they arrive: over ``max_bytes`` the association is cut
  while receiving, before the rest is read (datasets stream to a file, never into memory);
- an association lives at most ``lifetime`` seconds (a peer sending a C-ECHO every few seconds
  no longer holds its slot forever), and one peer address holds at most ``per_peer`` of the
  ``max_associations`` slots: connections over either bound are closed at once, unread.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

log = logging.getLogger("fedbridge.edge.listen")

HEADER = 6  # a PDU's type, reserved byte and 32-bit length
MAX_ASSOCIATE_PDU = 64 << 10  # A-ASSOCIATE-RQ and the rest: far below this in practice


@dataclass(frozen=True)
class Bounds:
    """What one association may take (each a ``fedbridge edge listen`` option)."""

    timeout: float = 10.0  # seconds: ACSE, DIMSE, network idle and each socket read
    lifetime: float = 600.0  # seconds an association may stay open in all
    max_associations: int = 16
    per_peer: int = 4
    max_pdu: int = 1 << 20  # the largest P-DATA PDU we accept (and advertise)
    max_bytes: int = 128 << 20  # received for one dataset, counted while it arrives


class TooLarge(OSError):
    """Received data over a bound: pynetdicom's reader treats it as a closed connection."""


class GuardedSocket(AssociationSocket):
    """An association socket whose reads are bounded in size (see :class:`Bounds`)."""

    bounds: Bounds
    received: int = 0  # since the last complete dataset
    peer: str = "?"

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes != HEADER and nr_bytes > max(self.bounds.max_pdu, MAX_ASSOCIATE_PDU) + 16:
            log.error("cut the association from %s: a PDU of %d bytes, over the %d bytes "
                      "maximum PDU", self.peer, nr_bytes, self.bounds.max_pdu)  # fmt: skip
            raise TooLarge(f"PDU of {nr_bytes} bytes")
        self.received += nr_bytes
        if self.received > self.bounds.max_bytes:
            log.error("cut the association from %s while receiving: the dataset is over "
                      "the %d bytes limit (--max-pixels)", self.peer,
                      self.bounds.max_bytes)  # fmt: skip
            raise TooLarge("dataset over the byte limit")
        return super().recv(nr_bytes)


def guarded(assoc: Any) -> GuardedSocket | None:
    sock = getattr(getattr(assoc, "dul", None), "socket", None)
    return sock if isinstance(sock, GuardedSocket) else None


class _Handler(RequestHandler):
    server: GuardedServer

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        sock: Any = assoc.dul.socket
        sock.__class__ = GuardedSocket  # the same object, with bounded reads
        sock.bounds = self.server.bounds
        sock.peer = str(self.client_address[0])
        self.server.born[assoc] = time.monotonic()
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with per-peer and total slots and a lifetime watchdog."""

    bounds: Bounds

    def __init__(self, *args: Any, bounds: Bounds, **kwargs: Any) -> None:
        self.bounds = bounds
        self.born: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self.stopping = threading.Event()
        kwargs["request_handler"] = _Handler
        super().__init__(*args, **kwargs)
        self.watchdog = threading.Thread(
            target=self._watch, name="fedbridge-dicom-watchdog", daemon=True
        )
        self.watchdog.start()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        active = [a for a in self.active_associations if a.is_alive()]
        mine = sum(1 for a in active if str(a.requestor.address) == host)
        if mine >= self.bounds.per_peer:
            log.warning("refused a connection from %s: %d associations from it are open "
                        "(--max-per-peer)", host, mine)  # fmt: skip
            return False
        if len(active) >= self.bounds.max_associations:
            log.warning("refused a connection from %s: %d associations open "
                        "(--max-associations)", host, len(active))  # fmt: skip
            return False
        request.settimeout(self.bounds.timeout)  # every read; accept() gave a blocking socket
        return True

    def _watch(self) -> None:
        tick = min(1.0, self.bounds.lifetime / 4)
        while not self.stopping.wait(tick):
            now = time.monotonic()
            for assoc, born in list(self.born.items()):
                if assoc.is_alive() and now - born > self.bounds.lifetime:
                    self.born.pop(assoc, None)
                    log.warning("cut the association from %s: open for %.0f s, over the %g s "
                                "lifetime (--max-association-s)", assoc.requestor.address,
                                now - born, self.bounds.lifetime)  # fmt: skip
                    cut(assoc)

    def shutdown(self) -> None:
        self.stopping.set()
        super().shutdown()


def cut(assoc: Any) -> None:
    """End an association from outside its threads: a blocked read returns at once."""
    raw = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if raw is None:
        return
    with contextlib.suppress(OSError):
        raw.shutdown(socket.SHUT_RDWR)


def start(
    ae: Any, address: tuple[str, int], *, bounds: Bounds, handlers: list[Any]
) -> GuardedServer:
    """Start ``ae`` as a guarded acceptor in a background thread, as pynetdicom's
    ``start_server(block=False)`` does."""
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = bounds.timeout
    ae.maximum_associations = bounds.max_associations
    ae.maximum_pdu_size = bounds.max_pdu
    server: GuardedServer = ae.make_server(
        address, evt_handlers=handlers, server_class=GuardedServer, bounds=bounds
    )
    thread = threading.Thread(
        target=server.serve_forever, name="fedbridge-dicom-acceptor", daemon=True
    )
    thread.start()
    ae._servers.append(server)  # so ae.shutdown() stops it too, as start_server's
    return server
