"""`fedsight node receive`: a DICOM Storage SCP that files de-identified CT studies.

Who may associate: with `allow` peers, only those calling AE titles from those hosts (others
get A-ASSOCIATE-RJ "calling AE title not recognised"); without, only loopback peers, and the
server binds to 127.0.0.1. Presentation contexts are offered for CT Image Storage and Enhanced
CT Image Storage (every transfer syntax this installation decodes) and Verification (C-ECHO);
any other SOP class is rejected at negotiation ("abstract syntax not supported"), and a data
set that does not match its context's CT class gets C-STORE status 0xA900 (admit.py).
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import threading
from collections.abc import Callable

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from hospital_node.dicom_net import admit
from hospital_node.dicom_net.config import Peer, ReceiveConfig
from hospital_node.dicom_net.intake import Intake, quiet_third_party_logs
from vocab.errors import ConfigError

log = logging.getLogger(__name__)
MAX_ASSOCIATIONS = 16
NETWORK_TIMEOUT_S = 60.0  # an idle peer's association is aborted (its study is then held)


def _resolve(peers: tuple[Peer, ...]) -> dict[str, set[str]]:
    """AE title -> the IP addresses its allowed hosts resolve to (once, at start)."""
    out: dict[str, set[str]] = {}
    for p in peers:
        try:
            ips = {str(ipaddress.ip_address(a[4][0]))
                   for a in socket.getaddrinfo(p.host, None, proto=socket.IPPROTO_TCP)}
        except (OSError, ValueError):
            raise ConfigError(f"--allow {p.ae_title}@{p.host}: host does not resolve") from None
        out.setdefault(p.ae_title, set()).update(ips)
    return out


class _Handlers:
    """pynetdicom event handlers bound to one Intake."""

    def __init__(self, intake: Intake, allowed: dict[str, set[str]]) -> None:
        self.intake = intake
        self.allowed = allowed
        self._released: set[int] = set()
        self._lock = threading.Lock()

    def requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        addr = str(assoc.requestor.address)
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            ip = None
        if self.allowed:
            ok = ip is not None and str(ip) in self.allowed.get(calling, set())
        else:
            ok = ip is not None and ip.is_loopback
        if not ok:
            log.warning("association refused: calling AE %r from %s is not allowed", calling,
                        addr)
            # Rejected permanent, by the service user: calling AE title not recognised.
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            # As pynetdicom does for its own rejections: wait for the DUL to send the
            # A-ASSOCIATE-RJ before the connection is shut down.
            assoc.kill()
            return
        self.intake.store.begin(id(assoc))

    def store(self, event: evt.Event) -> int:
        ctx = event.context
        raw = event.request.DataSet.getvalue()
        status = self.intake.receive(raw, ctx.transfer_syntax, ctx.abstract_syntax,
                                     id(event.assoc))
        return status.value

    def released(self, event: evt.Event) -> None:
        with self._lock:
            self._released.add(id(event.assoc))

    def closed(self, event: evt.Event) -> None:
        key = id(event.assoc)
        with self._lock:
            released = key in self._released
            self._released.discard(key)
        self.intake.store.end(key, released)

    def bindings(self) -> list[tuple[evt.EventType, Callable]]:
        return [(evt.EVT_REQUESTED, self.requested), (evt.EVT_C_STORE, self.store),
                (evt.EVT_RELEASED, self.released), (evt.EVT_CONN_CLOSE, self.closed)]


def make_ae(ae_title: str) -> AE:
    ae = AE(ae_title=ae_title)
    syntaxes = list(admit.decodable_syntaxes())
    for sop in admit.CT_SOP_CLASSES:
        ae.add_supported_context(sop, syntaxes)
    ae.add_supported_context(Verification)
    ae.maximum_associations = MAX_ASSOCIATIONS
    ae.network_timeout = ae.dimse_timeout = NETWORK_TIMEOUT_S
    ae.acse_timeout = 30
    return ae


def serve(config: ReceiveConfig, stop: threading.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or `stop` is set); publish complete studies meanwhile."""
    quiet_third_party_logs()
    allowed = _resolve(config.allow)
    intake = Intake(config.intake)
    handlers = _Handlers(intake, allowed)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    ae = make_ae(config.ae_title)
    address = (config.bind_address, config.port)
    try:
        server = ae.start_server(address, block=False, evt_handlers=handlers.bindings())
    except OSError as e:
        raise ConfigError(f"--port {config.port}: cannot listen on {address[0]} "
                          f"({e.strerror or type(e).__name__})") from None
    who = (", ".join(f"{p.ae_title}@{p.host}" for p in config.allow) if config.allow
           else "loopback peers only")
    log.info("listening on %s:%d as AE %s (allowed: %s; quiet period %.1f s)", address[0],
             config.port, config.ae_title, who, config.intake.quiet_s)
    tick = min(0.5, max(0.05, config.intake.quiet_s / 4))
    try:
        while not stop.wait(tick):
            intake.store.publish_due()
    finally:
        server.shutdown()
        ae.shutdown()
        intake.store.publish_due()
        held = intake.store.held()
        log.info("stopped: %s; %d study(ies) held in staging",
                 dict(sorted(intake.counts.items())), len(held))
        intake.close()
    return 0
