"""Config validation: unknown keys, wrong types, cross-field rules, env and CLI overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import DEFAULT_CONFIG, ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.yaml"
    p.write_text(text)
    return p


def test_shipped_config_is_valid_and_folder_mode_without_mqtt() -> None:
    cfg = load_config(DEFAULT_CONFIG, env={})
    assert cfg.folder.enabled and not cfg.mqtt.enabled and cfg.mqtt.base_topic == "anomaly"
    assert cfg.data_root == DEFAULT_CONFIG.parent.parent / "data"


@pytest.mark.parametrize(
    "text,needle",
    [
        ("mqtt:\n  hots: x\n", "mqtt.hots: unknown key"),
        ("mqtt:\n  port: notanumber\n", "mqtt.port:"),
        ("mqtt:\n  port: 70000\n", "mqtt.port:"),
        ("backbone:\n  name: resnet\n", "backbone.name:"),
        ("defaults:\n  score_stat: median\n", "defaults.score_stat:"),
        ("defaults:\n  threshold_policy: manual\n", "threshold_value"),
        ("defaults:\n  coreset_min: 5000\n  coreset_max: 1000\n", "coreset_min"),
        ("rois:\n  st/roi:\n    threshold_policy: manual\n", "rois.st/roi.threshold_policy 'manual' needs"),
        ("rois:\n  st/roi:\n    coreset_min: 9000\n", "rois.st/roi.coreset_min (9000) must not exceed"),
        ("rois:\n  st/roi:\n    layers: [4, 19]\n", "rois.st/roi.layers: auto has blocks 0-15"),
        ("backbone:\n  name: efficientnet_lite0\n  layers: [4, 18]\n", "blocks 0-15"),
        ("rois:\n  bad key: {}\n", "rois"),
        ("rois:\n  st/roi:\n    coreset_ratio: 2\n", "rois.st/roi.coreset_ratio:"),
        ("device: gpu\n", "device:"),
        ("mqtt:\n  base_topic: 'a/#'\n", "mqtt.base_topic:"),
        ("- just\n- a list\n", "mapping"),
        ("http:\n  port: 99999\n", "http.port:"),
        ("http:\n  tls: {cert: c.pem}\n", "http.tls needs cert and key"),
        ("http:\n  enabled: true\n  token_file: missing.token\n", "http.token_file: cannot read"),
        ("http:\n  recent_results: 5000\n", "http.recent_results:"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text), env={})
    assert needle in str(exc.value), str(exc.value)


def test_env_and_cli_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "data_root: d\nmqtt:\n  host: filehost\n")
    cfg = load_config(path, env={"ANOMALY_AGENT_MQTT__HOST": "envhost", "ANOMALY_AGENT_MQTT__PORT": "1999",
                                 "ANOMALY_AGENT_DEFAULTS__HEATMAP": "true", "OTHER": "x"})
    assert cfg.mqtt.host == "envhost" and cfg.mqtt.port == 1999 and cfg.defaults.heatmap is True
    assert cfg.data_root == tmp_path / "d"
    cfg = load_config(path, env={"ANOMALY_AGENT_MQTT__HOST": "envhost"}, overrides={"mqtt.host": "clihost"})
    assert cfg.mqtt.host == "clihost"
    with pytest.raises(ConfigError, match="mqtt.nope"):
        load_config(path, env={"ANOMALY_AGENT_MQTT__NOPE": "1"})


def test_a_bare_off_means_off_in_yaml_and_in_the_environment(tmp_path: Path) -> None:
    """YAML 1.1 reads `off` as false: `ng_rank: off` is what an integrator writes, and it must work."""
    cfg = load_config(write(tmp_path, "defaults:\n  ng_rank: off\n"), env={})
    assert cfg.roi_settings("st1", "a")[0].ng_rank == "off"
    cfg = load_config(write(tmp_path, "data_root: d\n"), env={"ANOMALY_AGENT_DEFAULTS__NG_RANK": "off"})
    assert cfg.roi_settings("st1", "a")[0].ng_rank == "off"
    with pytest.raises(ConfigError, match="ng_rank"):
        load_config(write(tmp_path, "defaults:\n  ng_rank: true\n"), env={})  # not a value it has


def test_roi_override_merges_over_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "defaults:\n  coreset_ratio: 0.2\n  heatmap: true\n"
                                      "rois:\n  st1/roi_a:\n    score_stat: top1_mean\n"), env={})
    s, heat = cfg.roi_settings("st1", "roi_a")
    assert s.coreset_ratio == 0.2 and s.score_stat == "top1_mean" and heat
    s2, _ = cfg.roi_settings("st1", "other")
    assert s2.score_stat == "max"


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "token").write_text("abc\n")
    cfg = load_config(write(tmp_path, "http:\n  enabled: true\n  token_file: secrets/token\n"
                                      "  tls: {cert: tls/c.pem, key: tls/k.pem}\nmqtt:\n  tls: {ca: tls/ca.pem}\n"),
                      env={})
    assert cfg.http.token_file == tmp_path / "secrets" / "token" and cfg.http.read_token() == "abc"
    assert cfg.http.tls.cert == tmp_path / "tls" / "c.pem" and cfg.http.tls.key == tmp_path / "tls" / "k.pem"
    assert cfg.mqtt.tls.ca == tmp_path / "tls" / "ca.pem"


def test_per_roi_feature_settings_share_one_network(tmp_path: Path) -> None:
    """A texture ROI gets its own blocks and input size, on the network the other ROIs use."""
    from agent.runtime import Runtime

    cfg = load_config(write(tmp_path, "data_root: data\nbackbone:\n  name: efficientnet_lite0\n  resolution: 128\n"
                                      "rois:\n  st/tile:\n    layers: [10, 14]\n    resolution: 160\n"), env={})
    assert cfg.roi_features("st", "tile") == ((10, 14), 160) and cfg.roi_features("st", "other") == (None, 128)
    rt = Runtime(cfg)
    tile, other = rt.extractor_for("st", "tile"), rt.extractor_for("st", "other")
    assert other is rt.extractor and tile.model is other.model
    assert tile.identity.name == "efficientnet_lite0@10-14" and tile.identity.resolution == 160
    assert rt.model("st", "tile").state()["backbone"]["name"] == "efficientnet_lite0@10-14"


@pytest.mark.parametrize("case", ["password_file", "tls_ca", "http_tls_key", "data_root", "weights", "env_value"])
def test_startup_errors_exit_2_naming_the_key_and_the_path(tmp_path: Path, case: str) -> None:
    """`anomaly-agent run` with something it cannot start with: exit 2 and one line that names the key (or
    the environment variable) and the path; never a traceback, never an agent running without it."""
    import os
    import subprocess
    import sys

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cert = tmp_path / "cert.pem"
    cert.write_text("not checked here")
    env = {**os.environ, "ANOMALY_AGENT_DATA_ROOT": str(tmp_path / "data"),
           "ANOMALY_AGENT_BACKBONE__NAME": "efficientnet_lite0"}
    missing = str(tmp_path / "missing" / "file")
    env.update({
        "password_file": {"ANOMALY_AGENT_MQTT__ENABLED": "true", "ANOMALY_AGENT_MQTT__PASSWORD_FILE": missing},
        "tls_ca": {"ANOMALY_AGENT_MQTT__ENABLED": "true", "ANOMALY_AGENT_MQTT__TLS": f"{{ca: {missing}}}"},
        "http_tls_key": {"ANOMALY_AGENT_HTTP__ENABLED": "true",
                         "ANOMALY_AGENT_HTTP__TLS": f"{{cert: {cert}, key: {missing}}}"},
        "data_root": {"ANOMALY_AGENT_DATA_ROOT": str(blocker / "data")},
        "weights": {"ANOMALY_AGENT_BACKBONE__NAME": "auto", "ANOMALY_AGENT_BACKBONE__WEIGHTS": missing},
        "env_value": {"ANOMALY_AGENT_HTTP__PORT": "eighty"},
    }[case])
    key, path = {"password_file": ("mqtt.password_file", missing), "tls_ca": ("mqtt.tls.ca", missing),
                 "http_tls_key": ("http.tls.key", missing), "data_root": ("data_root", str(blocker / "data")),
                 "weights": ("ANOMALY_AGENT_BACKBONE__WEIGHTS", missing),
                 "env_value": ("ANOMALY_AGENT_HTTP__PORT", "http.port")}[case]
    r = subprocess.run([sys.executable, "-m", "agent.cli", "run"], env=env, capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert key in r.stderr and path in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "ready" not in r.stderr
