"""Agent configuration: one YAML file validated by pydantic, env and command-line overrides.

Precedence (last wins): the YAML file, environment variables `ANOMALY_AGENT_<SECTION>__<KEY>`
(e.g. ANOMALY_AGENT_MQTT__HOST, ANOMALY_AGENT_DATA_ROOT), command-line options.
Relative paths in the file are resolved against the file's directory.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from agent.opcua.config import OpcUaConfig
from core.backbones import BACKBONES, max_block
from core.ids import ID_PATTERN
from core.roi.model import ModelSettings

ENV_PREFIX = "ANOMALY_AGENT_"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "config" / "agent.yaml"


class ConfigError(Exception):
    """Invalid configuration: the message names each key (full path) and what is allowed."""


BackboneName = Literal[BACKBONES]  # type: ignore[valid-type]  # generated from the registry


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackboneConfig(Strict):
    name: BackboneName = "auto"  # the backbone registry's names (core/backbones/registry.py)
    weights: Path | None = None
    resolution: int | None = Field(None, ge=56, le=1344)
    keep_aspect: bool = True
    allow_download: bool = False
    layers: list[int] | None = None  # EfficientNet-Lite blocks to tap (Lite0 0-15, Lite1/2 0-20); null: the default

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int] | None) -> list[int] | None:
        return _check_layers(v)

    @model_validator(mode="after")
    def _layers_exist(self) -> BackboneConfig:
        top = max_block(self.name)
        if self.layers and max(self.layers) > top:
            raise ValueError(f"layers: {self.name} has blocks 0-{top}, got {max(self.layers)}")
        return self


def _check_layers(v: list[int] | None) -> list[int] | None:
    if v is not None and (not v or any(i < 0 or i > 20 for i in v) or len(set(v)) != len(v)):
        raise ValueError("must be distinct EfficientNet-Lite block numbers (Lite0 0-15, Lite1/2 0-20), e.g. [4, 10]")
    return sorted(v) if v else v


def _roi_fields() -> dict[str, Any]:
    """Every ModelSettings field that the config may set, optional (None: inherit), with its limits."""
    hints = get_type_hints(ModelSettings)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(ModelSettings):
        meta = dict(f.metadata)
        if meta.pop("config", True) is False:
            continue
        doc, choices = meta.pop("doc", None), meta.pop("choices", None)
        kind = Literal[choices] if choices else hints[f.name]  # type: ignore[valid-type]
        if choices and "off" in choices:  # YAML 1.1 reads a bare `off` (also in an env value) as false
            kind = Annotated[kind, BeforeValidator(_yaml_off)]
        fields[f.name] = (kind | None, Field(None, description=doc, **meta))
    return fields


def _yaml_off(v: Any) -> Any:
    return "off" if v is False else v


class _RoiExtras(Strict):
    """Per-ROI settings of the agent, not of the model."""

    heatmap: bool | None = None
    # the scale of this ROI's images when a request carries no mm_per_px (defect areas in mm²)
    mm_per_px: float | None = Field(None, gt=0, le=1000)
    # the ROI's own features (same network, its weights loaded once): e.g. texture ROIs [10, 14] at 256
    layers: list[int] | None = None
    resolution: int | None = Field(None, ge=56, le=1344)

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int] | None) -> list[int] | None:
        return _check_layers(v)


# every field optional so `rois` entries override only what they name; generated from ModelSettings
RoiSettings = create_model("RoiSettings", __base__=_RoiExtras, **_roi_fields())


class FolderConfig(Strict):
    enabled: bool = True
    root: Path | None = None  # default <data_root>/inbox
    rescan_s: float = Field(10.0, gt=0)
    stable_s: float = Field(1.0, ge=0)
    done_retention_days: float | None = Field(30.0, ge=0)
    rejected_retention_days: float | None = Field(90.0, ge=0)  # refused inputs and their .error.json


class TlsConfig(Strict):
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


class MqttConfig(Strict):
    enabled: bool = False
    host: str = "localhost"
    port: int = Field(1883, ge=1, le=65535)
    base_topic: str = "anomaly"
    client_id: str = "anomaly-agent"
    qos: Literal[0, 1, 2] = 1
    keepalive: int = Field(30, ge=5, le=3600)
    protocol: Literal["5", "3.1.1"] = "5"
    session_expiry_s: int = Field(86400, ge=0)
    username: str | None = None
    password_file: Path | None = None
    tls: TlsConfig | None = None
    shared_group: str | None = None
    max_payload_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    # the last N answers kept so that a repeated request (same request_id, same payload) gets its result again
    replay_results: int = Field(1000, ge=0)

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, v: object) -> object:
        return str(v) if isinstance(v, (int, float)) else v  # `protocol: 5` in YAML is a number

    @field_validator("base_topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        if not v or any(c in v for c in "+#") or v.startswith("/") or v.endswith("/"):
            raise ValueError("must be a non-empty topic without wildcards or leading/trailing '/'")
        return v

    @model_validator(mode="after")
    def _tls_pair(self) -> MqttConfig:
        if self.tls and bool(self.tls.cert) != bool(self.tls.key):
            raise ValueError("tls.cert and tls.key must be given together")
        return self


class HttpConfig(Strict):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)  # 0: any free port (logged at start)
    token_file: Path | None = None  # a bearer token; with it, every endpoint but /health needs it
    tls: TlsConfig | None = None  # {cert, key}: serve HTTPS (so the token does not cross the network in clear)
    max_request_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    request_timeout_s: float = Field(300.0, gt=0)
    recent_results: int = Field(20, ge=0, le=200)  # results (with heatmaps, ~0.35 MB each) for the operator page
    page_refresh_s: float = Field(5.0, ge=0)  # 0: the operator page does not reload itself
    # names a browser may reach the agent by, besides IP literals, localhost, `host` and the machine's
    # host name ("*": any; agent/http/origin.py): a DNS-rebinding page's own name is on no list
    allowed_hosts: list[str] = Field(default_factory=list, max_length=100)
    max_connections: int = Field(64, ge=1, le=10_000)  # open connections; more are closed at once
    header_timeout_s: float = Field(10.0, gt=0, le=300)  # a request's headers complete within this (slow clients)

    @model_validator(mode="after")
    def _tls(self) -> HttpConfig:
        if self.tls and not (self.tls.cert and self.tls.key):
            raise ValueError("http.tls needs cert and key (PEM files)")
        return self

    def read_token(self) -> str | None:
        """The token from token_file; a missing or empty file is a configuration error."""
        if self.token_file is None:
            return None
        try:
            token = self.token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"http.token_file: cannot read {self.token_file}: {exc.strerror}") from None
        if not token:
            raise ConfigError(f"http.token_file: {self.token_file} is empty")
        return token


class WorkerConfig(Strict):
    queue_size: int = Field(64, ge=1)
    # the share of the queue one ingress (folder, mqtt, http) may hold: a flood on one leaves the rest to
    # the others (1.0: first come, first served)
    ingress_share: float = Field(0.5, gt=0, le=1)
    # auto: 8 on CUDA, 1 on CPU, where a batched forward is slower than single ones (docs/benchmarks.md)
    max_batch: int | Literal["auto"] = "auto"
    max_wait_ms: float = Field(5.0, ge=0)
    # fit_ok / send_ng of one ROI that arrive together are one fit, one version, at most one tuning: all that
    # wait in the queue, and for folder drops also those arriving within this long of the last, up to burst_max
    burst_settle_ms: float = Field(2000.0, ge=0, le=10_000)
    burst_max: int = Field(64, ge=1, le=1024)
    # /health turns "degraded" when an accepted input has waited this long for its answer
    stuck_after_s: float = Field(600.0, gt=0)


class LimitsConfig(Strict):
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_decode_pixels: int = Field(100_000_000, ge=1)
    max_pixels: int = Field(12_000_000, ge=1)
    max_decoded_bytes: int = Field(400_000_000, ge=1024)
    max_rois: int = Field(1000, ge=1)
    max_loaded_rois: int = Field(64, ge=1)
    idle_unload_s: float = Field(3600.0, ge=0)
    import_max_mb: float = Field(1024.0, gt=0)  # an archive's unpacked size (core/roi/importer.py)
    import_max_files: int = Field(20_000, ge=10)  # and its files (two per sample)


class LifecycleConfig(Strict):
    versions_kept: int = Field(10, ge=1, le=1000)  # manifest + bank + threshold of the last N versions per ROI
    suspect_policy: Literal["accept", "flag", "refuse"] = "flag"
    suspect_z: float = Field(3.5, gt=0)
    suspect_min_samples: int = Field(8, ge=3)
    trash_keep: int = Field(500, ge=0)  # trashed samples per ROI and kind that no kept version needs
    trash_max_age_days: float | None = Field(90.0, ge=0)
    max_ng_samples: int = Field(200, ge=1, le=100_000)  # stored NG samples per ROI; more: too_many_samples


class DriftConfig(Strict):
    window: int = Field(200, ge=5, le=100_000)
    min_predictions: int = Field(30, ge=1)
    warning: float = Field(0.5, gt=0)
    alarm: float = Field(0.8, gt=0)
    ng_rate_warning: float = Field(0.10, gt=0, le=1)
    ng_rate_alarm: float = Field(0.25, gt=0, le=1)

    @model_validator(mode="after")
    def _order(self) -> DriftConfig:
        if self.alarm < self.warning or self.ng_rate_alarm < self.ng_rate_warning:
            raise ValueError("each alarm level must be at least its warning level")
        if self.min_predictions > self.window:
            raise ValueError("min_predictions must not exceed window")
        return self


class AgentConfig(Strict):
    data_root: Path = Path("data")
    device: str = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    debug: bool = False
    backbone: BackboneConfig = BackboneConfig()
    defaults: RoiSettings = RoiSettings()
    rois: dict[str, RoiSettings] = {}
    folder: FolderConfig = FolderConfig()
    mqtt: MqttConfig = MqttConfig()
    http: HttpConfig = HttpConfig()
    worker: WorkerConfig = WorkerConfig()
    limits: LimitsConfig = LimitsConfig()
    lifecycle: LifecycleConfig = LifecycleConfig()
    drift: DriftConfig = DriftConfig()
    opcua: OpcUaConfig = OpcUaConfig()

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda", "mps") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return v

    @field_validator("rois")
    @classmethod
    def _roi_keys(cls, v: dict[str, RoiSettings]) -> dict[str, RoiSettings]:
        for key in v:
            parts = key.split("/")
            if len(parts) != 2 or not all(ID_PATTERN.match(p) for p in parts):
                raise ValueError(f"key {key!r} must be '<role_id>/<roi_id>' with ids of [A-Za-z0-9_.-]{{1,64}}")
        return v

    @field_validator("worker")
    @classmethod
    def _batch(cls, v: WorkerConfig) -> WorkerConfig:
        if isinstance(v.max_batch, int) and not 1 <= v.max_batch <= 256:
            raise ValueError("max_batch must be 'auto' or 1-256")
        return v

    @model_validator(mode="after")
    def _cross(self) -> AgentConfig:
        """Rules between fields, on the defaults and on every ROI as merged with them."""
        scopes = [("defaults", self.defaults.model_dump(exclude_none=True))]
        for key, roi in self.rois.items():
            scopes.append((f"rois.{key}", {**self.defaults.model_dump(exclude_none=True),
                                           **roi.model_dump(exclude_none=True)}))
        top = max_block(self.backbone.name)
        for where, merged in scopes:
            if merged.get("threshold_policy") == "manual" and merged.get("threshold_value") is None:
                raise ValueError(f"{where}.threshold_policy 'manual' needs a threshold_value")
            mn = merged.get("coreset_min", ModelSettings.coreset_min)
            mx = merged.get("coreset_max", ModelSettings.coreset_max)
            if mn > mx:
                raise ValueError(f"{where}.coreset_min ({mn}) must not exceed coreset_max ({mx})")
            if merged.get("layers") and max(merged["layers"]) > top:
                raise ValueError(f"{where}.layers: {self.backbone.name} has blocks 0-{top}")
        if self.limits.max_pixels > self.limits.max_decode_pixels:
            raise ValueError("limits.max_pixels must not exceed limits.max_decode_pixels")
        return self

    def roi_settings(self, role_id: str, roi_id: str) -> tuple[ModelSettings, bool]:
        """(ModelSettings, heatmap default) for one ROI: defaults, then its `rois` override."""
        merged = self.defaults.model_dump(exclude_none=True)
        merged.update(self.rois.get(f"{role_id}/{roi_id}", RoiSettings()).model_dump(exclude_none=True))
        heatmap = bool(merged.pop("heatmap", False))
        merged.pop("mm_per_px", None)
        merged.pop("layers", None)
        merged.pop("resolution", None)
        return ModelSettings(**merged), heatmap

    def roi_mm_per_px(self, role_id: str, roi_id: str) -> float | None:
        """The ROI's default mm_per_px (its `rois` entry, then `defaults`): for requests that carry none."""
        roi = self.rois.get(f"{role_id}/{roi_id}")
        if roi is not None and roi.mm_per_px is not None:
            return roi.mm_per_px
        return self.defaults.mm_per_px

    def roi_features(self, role_id: str, roi_id: str) -> tuple[tuple[int, ...] | None, int | None]:
        """(layers, resolution) of one ROI's features: its `rois` entry, then `defaults`, then `backbone`."""
        merged = {k: v for k, v in (("layers", self.backbone.layers), ("resolution", self.backbone.resolution))
                  if v is not None}
        merged.update({k: v for k, v in self.defaults.model_dump(include={"layers", "resolution"}).items()
                       if v is not None})
        roi = self.rois.get(f"{role_id}/{roi_id}")
        if roi is not None:
            merged.update({k: v for k, v in roi.model_dump(include={"layers", "resolution"}).items() if v is not None})
        layers = merged.get("layers")
        return (tuple(layers) if layers else None), merged.get("resolution")

    @property
    def inbox(self) -> Path:
        return self.folder.root or self.data_root / "inbox"


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(path)}: cannot override inside a non-mapping value")
    node[path[-1]] = value


def _env_overrides(env: dict[str, str]) -> list[tuple[list[str], Any]]:
    out = []
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        if not path:
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        out.append((path, value))
    return out


def _format_errors(exc: ValidationError, source: str, from_env: dict[str, str] | None = None) -> str:
    """Every problem by its key path; a value that came from an environment variable names the variable."""
    lines = [f"invalid configuration in {source}:"]
    from_env = from_env or {}
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p not in ("function-after",)) or "(top level)"
        var = next((name for key, name in from_env.items() if loc == key or loc.startswith(key + ".")), None)
        if var:
            loc = f"{loc} (from the environment variable {var})"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/configuration.md)"
        elif err["type"] == "literal_error" and err.get("ctx", {}).get("expected"):
            msg = f"{msg}; got {err.get('input')!r}"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _origin(from_env: dict[str, str], key: str) -> str:
    return f" (from the environment variable {from_env[key]})" if key in from_env else ""


def _readable(key: str, path: Path, what: str) -> None:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {what} {path}: {exc.strerror or exc}") from None


def check_service_files(cfg: AgentConfig) -> None:
    """What `run` needs beyond a valid config, checked before anything starts (exit 2 with the key and the
    path, not a traceback or an agent running without its broker): the MQTT password file, every TLS
    file of an enabled transport, and a writable data root."""
    if cfg.mqtt.enabled and cfg.mqtt.password_file is not None:
        _readable("mqtt.password_file", cfg.mqtt.password_file, "the MQTT password file")
        if not cfg.mqtt.password_file.read_text(errors="replace").strip():
            raise ConfigError(f"mqtt.password_file: {cfg.mqtt.password_file} is empty")
    for section, tls in (("mqtt", cfg.mqtt.tls if cfg.mqtt.enabled else None),
                         ("http", cfg.http.tls if cfg.http.enabled else None)):
        for key in ("ca", "cert", "key"):
            value = getattr(tls, key, None) if tls is not None else None
            if value is not None:
                _readable(f"{section}.tls.{key}", value, "the TLS file")
    check_opcua_files(cfg)
    root = cfg.data_root
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"data_root: {root} is not writable by this user ({exc.strerror or exc}); samples, "
                          "models and results live there") from None


def check_opcua_files(cfg: AgentConfig) -> None:
    """The OPC UA server's files: the password file, a certificate and key that exist together (or neither:
    made on first start), and the folder of trusted client certificates."""
    o = cfg.opcua
    if not o.enabled:
        return
    if o.password_file is not None:
        _readable("opcua.password_file", o.password_file, "the OPC UA password file")
        if not o.password_file.read_text(errors="replace").strip():
            raise ConfigError(f"opcua.password_file: {o.password_file} is empty")
    cert, key = opcua_cert_paths(cfg)
    if cert.exists() != key.exists():
        missing, there = ("opcua.private_key", key) if cert.exists() else ("opcua.certificate", cert)
        raise ConfigError(f"{missing}: {there} does not exist while its pair does (give both, or neither to have "
                          "the agent make them)")
    for k, path in (("opcua.certificate", cert), ("opcua.private_key", key)):
        if path.exists():
            _readable(k, path, "the OPC UA file")
    if o.trusted_clients is not None and not o.trusted_clients.is_dir():
        raise ConfigError(f"opcua.trusted_clients: {o.trusted_clients} is not a folder of client certificates")


def opcua_cert_paths(cfg: AgentConfig) -> tuple[Path, Path]:
    o = cfg.opcua
    return (o.certificate or cfg.data_root / "opcua" / "server_cert.der",
            o.private_key or cfg.data_root / "opcua" / "server_key.pem")


def load_config(path: Path | None = None, env: dict[str, str] | None = None,
                overrides: dict[str, Any] | None = None) -> AgentConfig:
    """Read, merge and validate. Raises ConfigError with every problem, each by its full key path."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text()) if path.exists() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not path.exists() and path != DEFAULT_CONFIG:
        raise ConfigError(f"config file {path} does not exist")
    tree: dict = raw or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = path.resolve().parent
    for key in ("data_root",):
        if isinstance(tree.get(key), str) and not Path(tree[key]).is_absolute():
            tree[key] = os.path.normpath(base / tree[key])
    for section, key in (("backbone", "weights"), ("folder", "root"), ("http", "token_file"),
                         ("mqtt", "password_file"), ("http", "tls"), ("mqtt", "tls")):
        node = tree.get(section)
        parent, keys = (node, [key]) if isinstance(node, dict) else (None, [])
        if key == "tls" and parent is not None:
            parent, keys = (parent.get("tls"), ["ca", "cert", "key"]) if isinstance(parent.get("tls"), dict) else (
                None, [])
        for k in keys:
            v = parent.get(k) if parent is not None else None
            if isinstance(v, str) and not Path(v).expanduser().is_absolute():
                parent[k] = os.path.normpath(base / v)
    from_env: dict[str, str] = {}
    for p, value in _env_overrides(dict(os.environ) if env is None else env):
        _set_path(tree, p, value)
        from_env[".".join(p)] = ENV_PREFIX + "__".join(x.upper() for x in p)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_path(tree, dotted.split("."), value)
    try:
        cfg = AgentConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, str(path), from_env)) from None
    if cfg.http.enabled:
        cfg.http.read_token()  # a token file that cannot be used stops the start here, not at the first request
    if cfg.backbone.weights is not None and not cfg.backbone.weights.is_file():
        raise ConfigError(f"backbone.weights{_origin(from_env, 'backbone.weights')}: {cfg.backbone.weights} does not "
                          "exist or is not a file (the official DINOv2 .pth / Hugging Face model.safetensors, or an "
                          "EfficientNet-Lite weights file)")
    return cfg
