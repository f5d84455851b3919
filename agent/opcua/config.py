"""Config section `opcua`: the optional OPC UA server a PLC reads results from (agent/opcua/server.py).

Security as PLC-side clients expect it: anonymous sessions only on a loopback endpoint unless allowed
explicitly; a user name with a password read from a file; the Basic256Sha256 Sign and SignAndEncrypt
policies with a certificate the agent creates on first start; client certificates trusted from a folder.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

POLICIES = ("None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt")
LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OpcUaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(4840, ge=0, le=65535)  # 0: any free port (logged at start)
    path: str = Field("/anomaly-agent", pattern=r"^/[A-Za-z0-9_./-]{0,100}$")
    handshake: bool = True  # a result replaces the current one only after the PLC wrote its ResultAck
    result_buffer: int = Field(8, ge=1, le=10_000)  # results waiting for an ack, per ROI; past it the oldest waiting
    anonymous: Literal["auto", "allow", "deny"] = "auto"  # auto: only on a loopback endpoint
    username: str | None = Field(None, min_length=1, max_length=100)
    password_file: Path | None = None
    security: list[Literal["None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"]] = Field(
        default_factory=lambda: list(POLICIES), min_length=1)
    certificate: Path | None = None  # DER; default <data_root>/opcua/server_cert.der, made on first start
    private_key: Path | None = None  # PEM; default <data_root>/opcua/server_key.pem
    trusted_clients: Path | None = None  # a folder of client certificates (DER/PEM): only those may connect
    allow_writes: bool = False  # reserved: nothing but ResultAck is writable from OPC UA
    max_connections: int = Field(32, ge=1, le=10_000)  # open connections; more are closed at once
    hello_timeout_s: float = Field(5.0, gt=0, le=120)  # a connection that sends no HELLO by then is closed
    activation_timeout_s: float = Field(15.0, gt=0, le=600)  # ... and one without an activated session by then

    @model_validator(mode="after")
    def _auth(self) -> OpcUaConfig:
        if bool(self.username) != bool(self.password_file):
            raise ValueError("opcua.username and opcua.password_file are given together")
        if not self.enabled:
            return self
        if self.anonymous == "deny" and not self.username:
            raise ValueError("opcua.anonymous deny needs opcua.username and opcua.password_file")
        if self.anonymous == "auto" and not is_loopback(self.host) and not self.username:
            raise ValueError(f"opcua.host {self.host} is not a loopback address: anonymous clients are only allowed "
                             "on loopback; set opcua.username and opcua.password_file (or opcua.anonymous: allow)")
        return self

    def anonymous_allowed(self) -> bool:
        return self.anonymous == "allow" or (self.anonymous == "auto" and is_loopback(self.host))
