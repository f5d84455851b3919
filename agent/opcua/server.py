"""The OPC UA server (config `opcua`, docs/opcua.md): a result sink a PLC reads, on the FreeOpcUa `asyncua`
library, in its own thread and event loop.

It sees every prediction result and every state change once, whatever ingress the image came by: the
worker hands them over (`observe`, `on_state`) by putting them on a bounded queue, never waiting, so a
slow or stuck OPC UA client never slows the worker or another output (a full queue drops with a WARNING
and counts). The thread is watched like an intake: if it ends, `/health` turns degraded and the systemd
watchdog pings stop (systemd restarts the agent).
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from asyncua import Server, ua
from asyncua.common.callback import CallbackType
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.user_managers import UserManager
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.config import AgentConfig, ConfigError, opcua_cert_paths
from agent.opcua.guard import GuardedServer
from agent.opcua.space import AddressSpace
from agent.process.backoff import Backoff
from core.errors import InputError
from core.storage import RoiStore

log = logging.getLogger(__name__)
QUEUE_MAX = 10_000
POLICY = {"None": ua.SecurityPolicyType.NoSecurity,
          "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
          "Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt}


class Users(UserManager):
    """Anonymous sessions (when allowed) and the one configured user name with its password."""

    def __init__(self, anonymous: bool, username: str | None, password: str | None) -> None:
        self.anonymous, self.username, self.password = anonymous, username, password

    def get_user(self, iserver: object, username: str | None = None, password: str | None = None,
                 certificate: object = None) -> User | None:
        if username is None:
            return User(role=UserRole.User) if self.anonymous else None
        if self.username is None or self.password is None:
            return None
        ok = hmac.compare_digest(username.encode(), self.username.encode()) and hmac.compare_digest(
            (password or "").encode(), self.password.encode())
        if not ok:
            log.warning("opcua: refused user %r (wrong user name or password)", username[:60])
        return User(role=UserRole.User, name=username) if ok else None


class OpcUaSink:
    name = "opcua"

    def __init__(self, cfg: AgentConfig, health: Callable[[], dict], initial_states: Callable[[], list[dict]]) -> None:
        self.cfg = cfg
        self._health = health
        self._initial_states = initial_states
        self._items: queue.Queue[tuple] = queue.Queue(maxsize=QUEUE_MAX)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.dropped = 0
        self.port = cfg.opcua.port
        self.thread = threading.Thread(target=self._run, name="opcua", daemon=True)

    # ------------------------------------------------ the worker's side (never blocks)
    def on_result(self, origin: str, result: dict, key: str | None) -> None:
        """A result sink: every prediction result, ok or refused, of every ingress, once its origin answered."""
        if result.get("action") == "predict":
            self._post(("result", result))

    def on_state(self, role_id: str, roi_id: str, state: dict) -> None:
        self._post(("state", role_id, roi_id, state))

    def _post(self, item: tuple) -> None:
        try:
            self._items.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("opcua: %d items dropped: the OPC UA server does not keep up", self.dropped)
            return
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the loop has closed (shutting down)
                pass

    # ------------------------------------------------ lifecycle (the daemon's side)
    def start(self) -> None:
        logging.getLogger("asyncua").setLevel(max(logging.WARNING, logging.getLogger().level))  # its INFO is noise
        self.thread.start()
        if not self._ready.wait(60) or self._error is not None:
            exc = self._error
            o = self.cfg.opcua
            if isinstance(exc, OSError) and exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                raise ConfigError(f"opcua.port: cannot serve on {o.host}:{o.port} ({exc.strerror})")
            if isinstance(exc, ConfigError):
                raise exc
            raise RuntimeError(f"opcua: could not start on {o.host}:{o.port} ({type(exc).__name__}: {exc})")
        log.info("opcua: serving opc.tcp://%s:%d%s (security %s, anonymous %s, user %s, handshake %s, buffer %d)",
                 self.cfg.opcua.host, self.port, self.cfg.opcua.path, ", ".join(self.cfg.opcua.security),
                 self.cfg.opcua.anonymous_allowed(), self.cfg.opcua.username or "none", self.cfg.opcua.handshake,
                 self.cfg.opcua.result_buffer)

    def stop(self) -> None:
        """Not an intake: results of queued work still reach it until close()."""

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:
                pass
        self.thread.join(timeout)


    # ------------------------------------------------ the server thread
    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._error = exc
            if self._ready.is_set():
                log.exception("opcua: the server stopped: /health is degraded")
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        server, space = await self._server()
        try:
            await server.start()
        except OSError:
            raise
        if self.cfg.opcua.port == 0:
            self.port = _bound_port(server)
        for state in self._initial_states():
            await space.state(state["role_id"], state["roi_id"], state)
        await space.health(self._health())
        self._ready.set()
        try:
            await self._serve(space)
        finally:
            await server.stop()

    async def _serve(self, space: AddressSpace) -> None:
        wake = self._wake
        if wake is None:
            raise RuntimeError("opcua: serving before the loop was set up")
        last_health = time.monotonic()
        backoff = Backoff("opcua health")
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(wake.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
            wake.clear()
            while True:
                try:
                    item = self._items.get_nowait()
                except queue.Empty:
                    break
                try:
                    if item[0] == "result":
                        await space.result(item[1])
                    elif item[0] == "state":
                        await space.state(item[1], item[2], item[3])
                    elif item[0] == "ack":
                        await space.ack(item[1], item[2])
                except Exception:  # one bad item never stops the server
                    log.exception("opcua: could not show %s", item[0])
            if time.monotonic() - last_health >= 1.0:
                last_health = time.monotonic()
                try:  # the health body reads files: out of descriptors (EMFILE) it fails, the server goes on
                    await space.health(self._health())
                    backoff.ok()
                except Exception as exc:  # noqa: BLE001 - never the end of the OPC UA thread
                    backoff.failed(exc)

    async def _server(self) -> tuple[Server, AddressSpace]:
        o = self.cfg.opcua
        password = o.password_file.read_text().strip() if o.password_file else None
        server = GuardedServer(user_manager=Users(o.anonymous_allowed(), o.username, password))
        await server.init()
        server.set_endpoint(f"opc.tcp://{o.host}:{o.port}{o.path}")
        server.set_server_name("anomaly-agent")
        uri = f"urn:anomaly-agent:{socket.gethostname()}"
        await server.set_application_uri(uri)
        server.guard([POLICY[p] for p in o.security], o.username, o.max_connections, o.hello_timeout_s,
                     o.activation_timeout_s)
        tokens: list[type] = [ua.AnonymousIdentityToken] if o.anonymous_allowed() else []
        if o.username:
            tokens.append(ua.UserNameIdentityToken)
        server.set_identity_tokens(tokens)
        cert, key = opcua_cert_paths(self.cfg)
        if not cert.exists():
            cert.parent.mkdir(parents=True, exist_ok=True)
            key.parent.mkdir(parents=True, exist_ok=True)
            await setup_self_signed_certificate(key, cert, uri, socket.gethostname(), [ExtendedKeyUsageOID.SERVER_AUTH],
                                                {"commonName": "anomaly-agent", "organizationName": "anomaly-agent"})
            log.warning("opcua: made a self-signed server certificate %s (trust it in the PLC's OPC UA client)", cert)
        await server.load_certificate(str(cert))
        await server.load_private_key(str(key))
        if o.trusted_clients is not None:
            store = TrustStore([Path(o.trusted_clients)], [])
            await store.load()
            server.set_certificate_validator(CertificateValidator(
                CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT, store))
        space = AddressSpace(server, o.handshake, o.result_buffer, self._roi_exists, self.cfg.limits.max_rois)
        await space.build()
        server.subscribe_server_callback(CallbackType.PostWrite, self._after_write(space))
        return server, space

    def _roi_exists(self, role_id: str, roi_id: str) -> bool:
        """A ROI the agent has (on disk); results of other ids never make nodes (they come from outside)."""
        try:
            return RoiStore(self.cfg.data_root, role_id, roi_id).exists()
        except (InputError, OSError):
            return False

    def _after_write(self, space: AddressSpace) -> Callable:
        async def after_write(event: object, _dispatcher: object) -> None:
            params = getattr(event, "request_params", None)
            results = getattr(event, "response_params", None) or []
            for i, wv in enumerate(getattr(params, "NodesToWrite", []) or []):
                key = space.by_ack.get(wv.NodeId)
                if key is None or (i < len(results) and not results[i].is_good()):
                    continue
                value = wv.Value.Value.Value if wv.Value and wv.Value.Value else None
                if isinstance(value, int):
                    await space.ack(key, int(value))
        return after_write


def _bound_port(server: Server) -> int:
    """The port the server listens on (config port 0: any free one)."""
    bserver = getattr(server, "bserver", None)
    srv = getattr(bserver, "_server", None)
    if srv is not None and srv.sockets:
        return int(srv.sockets[0].getsockname()[1])
    return 0
