"""What asyncua leaves open, closed here (docs/opcua.md, "Security"):

- **Sessions only on a listed channel.** asyncua answers a client that opens a secure channel with
  SecurityPolicy None even when `security` lists only signed policies (discovery, GetEndpoints, needs
  that channel), and then lets it create and activate a session on it. Here CreateSession and
  ActivateSession on a channel whose policy and mode are not in `opcua.security` are answered
  `BadSecurityPolicyRejected`: no value is read, no password crosses in clear.
- **Who may acknowledge.** With `opcua.username` set, only that user may write (ResultAck is the one
  writable node): an anonymous or other session reads, its writes are `BadUserAccessDenied`, so a
  second client cannot consume the PLC's verdicts. Without a user name (anonymous on loopback), every
  session may acknowledge.
- **Bounded connections.** At most `opcua.max_connections` at once (more are closed as they come); a
  connection that sends no HELLO within `opcua.hello_timeout_s`, or has no activated session within
  `opcua.activation_timeout_s`, is closed. Refusals are logged once a minute, with the count.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import USER_TYPES, SimpleRoleRuleset, User
from asyncua.crypto.security_policies import SECURITY_POLICY_TYPE_MAP
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.uaprocessor import UaProcessor

from agent.process.backoff import RateLimitedLog

log = logging.getLogger(__name__)
SESSION_REQUESTS = frozenset(ua.NodeId(i) for i in (ua.ObjectIds.CreateSessionRequest_Encoding_DefaultBinary,
                                                     ua.ObjectIds.ActivateSessionRequest_Encoding_DefaultBinary))
WRITE = ua.NodeId(ua.ObjectIds.WriteRequest_Encoding_DefaultBinary)
READ_TYPES = frozenset(ua.NodeId(i) for i in USER_TYPES) - {WRITE}
REFUSED_CHANNEL = "opcua: session refused on a channel opcua.security does not list"
NO_HELLO = "opcua: connection closed, no HELLO within opcua.hello_timeout_s"
# asyncua's own lines for each refused or idle connection: one a minute, with the count
for _name, _prefixes in (("asyncua.server.binary_server_asyncio", ("Refusing connection", "Closing idle connection")),
                         (__name__, (REFUSED_CHANNEL, NO_HELLO))):
    logging.getLogger(_name).addFilter(RateLimitedLog(_prefixes))


def listed_channels(policies: list[ua.SecurityPolicyType]) -> frozenset[tuple[str, int]]:
    """(policy URI, message security mode) of each configured policy."""
    return frozenset((SECURITY_POLICY_TYPE_MAP[p][0].URI, int(SECURITY_POLICY_TYPE_MAP[p][1])) for p in policies)


class AckWriters(SimpleRoleRuleset):
    """Every session may read, browse and subscribe; only `writer` (None: every session) may write."""

    def __init__(self, writer: str | None) -> None:
        super().__init__()
        self.writer = writer

    def check_validity(self, user: User, action_type_id: ua.NodeId, body: object) -> bool:
        if action_type_id == WRITE:
            ok = self.writer is None or (user is not None and user.name == self.writer)
            if not ok:
                log.warning("opcua: write refused for %s: only user %r may acknowledge results",
                            f"user {user.name!r}" if user is not None and user.name else "an anonymous session",
                            self.writer)
            return ok
        return action_type_id in READ_TYPES


class _Processor(UaProcessor):
    listed: frozenset[tuple[str, int]] = frozenset()

    async def _process_message(self, typeid: Any, requesthdr: Any, seqhdr: Any, body: Any) -> Any:
        if typeid in SESSION_REQUESTS:
            pol = self._connection.security_policy
            if (pol.URI, int(pol.Mode)) not in self.listed:
                log.warning("%s (%s, %s) from %s", REFUSED_CHANNEL, pol.URI.rsplit("#", 1)[-1], pol.Mode.name,
                            self.name)
                raise ServiceError(ua.StatusCodes.BadSecurityPolicyRejected)
        return await super()._process_message(typeid, requesthdr, seqhdr, body)


class _Protocol(OPCUAProtocol):
    listed: frozenset[tuple[str, int]] = frozenset()
    hello_timeout_s = 5.0
    _hello_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if self.processor is None:  # refused by asyncua: over max_connections
            return
        self.processor = _Processor(self.iserver, self.transport, self.limits)
        self.processor.listed = self.listed
        self.processor.set_policies(self.policies)
        self._hello_timer = asyncio.get_running_loop().call_later(self.hello_timeout_s, self._no_hello)

    def _no_hello(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            log.warning("%s (%.0f s): %s", NO_HELLO, self.hello_timeout_s, self.peer_name)
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        super().data_received(data)

    def connection_lost(self, ex: BaseException | None) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        super().connection_lost(ex)


class _BinaryServer(BinaryServer):
    protocol: type[_Protocol] = _Protocol

    def _make_protocol(self) -> OPCUAProtocol:
        return self.protocol(iserver=self.iserver, policies=self._policies, clients=self.clients,
                             closing_tasks=self.closing_tasks, limits=self.limits)


class GuardedServer(Server):
    """asyncua's Server with the guards above (`guard` before `start`)."""

    _protocol: type[_Protocol] = _Protocol

    def guard(self, policies: list[ua.SecurityPolicyType], writer: str | None, max_connections: int,
              hello_timeout_s: float, activation_timeout_s: float) -> None:
        self.set_security_policy(policies, permission_ruleset=AckWriters(writer))
        self.iserver.max_connections = max_connections
        self.iserver.max_pending_activation_seconds = activation_timeout_s
        self._protocol = type("Guarded", (_Protocol,), {"listed": listed_channels(policies),
                                                         "hello_timeout_s": hello_timeout_s})

    async def start(self) -> None:
        """asyncua's Server.start, with this module's protocol on the socket."""
        if self.iserver.certificate is not None:
            from asyncua.crypto import uacrypto

            uacrypto.check_certificate(self.iserver.certificate, self._application_uri, self.name)
        await self._setup_server_nodes()
        await self.iserver.start()
        try:
            host, port = self._get_bind_socket_info()
            bserver = _BinaryServer(self.iserver, host or "127.0.0.1", port or 0, self.limits)
            bserver.protocol = self._protocol
            bserver.set_policies(self._policies)
            self.bserver = bserver
            await bserver.start()
        except Exception:
            await self.iserver.stop()
            raise
