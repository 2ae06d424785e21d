"""Configuration: TOML < env < flags, one clear line per bad value, and the example file is complete."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sidecar.config import ConfigError, Settings, load, summary

ROOT = Path(__file__).resolve().parent.parent


def test_defaults():
    s = load(None, {}, {})
    assert s.server.port == 8080 and s.upstream.first_byte_timeout == 600 and s.upstream.total_timeout == 0


def test_precedence(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[server]\nport = 9000\nhost = "0.0.0.0"\n[upstream]\nconnect_timeout = 2.5\n')
    s = load(
        str(f),
        {"SIDECAR_SERVER_PORT": "9100", "SIDECAR_UPSTREAM_EXTRA_PATHS": "/v1/rerank,/v1/score"},
        {"server.port": 9200},
    )
    assert s.server.port == 9200 and s.server.host == "0.0.0.0" and s.upstream.connect_timeout == 2.5
    assert s.upstream.extra_paths == ("/v1/rerank", "/v1/score")
    assert load(str(f), {"SIDECAR_SERVER_PORT": "9100"}, {}).server.port == 9100


def test_kubernetes_service_link_variables_are_ignored():
    s = load(
        None,
        {
            "SIDECAR_PORT": "tcp://10.0.0.1:8080",
            "SIDECAR_SERVICE_HOST": "10.0.0.1",
            "SIDECAR_PORT_8080_TCP_ADDR": "10.0.0.1",
        },
        {},
    )
    assert s.server.port == 8080


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"SIDECAR_SERVER_PORT": "abc"}, "server.port: expected an integer"),
        ({"SIDECAR_SERVER_PORT": "70000"}, "server.port: must be 1-65535"),
        ({"SIDECAR_UPSTREAM_CONNECT_TIMEOUT": "-1"}, "upstream.connect_timeout: must not be negative"),
        ({"SIDECAR_UPSTREAM_CONNECT_TIMEOUT": "0"}, "upstream.connect_timeout: must be greater than 0"),
        ({"SIDECAR_UPSTREAM_CONNECT_TIMEOUT": "nan"}, "upstream.connect_timeout: expected a finite number"),
        ({"SIDECAR_SERVER_ACCESS_LOG": "maybe"}, "server.access_log: expected true or false"),
        ({"SIDECAR_SERVER_LOG_LEVEL": "loud"}, "server.log_level: must be one of"),
        ({"SIDECAR_UPSTREAM_URL": "ftp://x"}, "upstream.url: must start with http"),
        ({"SIDECAR_UPSTREAM_BOGUS": "1"}, "upstream.bogus: unknown option"),
        ({"SIDECAR_STORE_URL": "mysql://x"}, "store.url: must be"),
        ({"SIDECAR_UPSTREAM_EXTRA_PATHS": "/v1/../admin"}, "upstream.extra_paths"),
    ],
)
def test_bad_values_name_the_option(env, needle):
    with pytest.raises(ConfigError) as info:
        load(None, env, {})
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_bad_toml(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[server]\nport = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load(str(f), {}, {})
    f.write_text("[nosuch]\nx = 1\n")
    with pytest.raises(ConfigError, match="nosuch: unknown section"):
        load(str(f), {}, {})
    f.write_text('[server]\nport = "80"\nmax_body_bytes = 1.5\n')
    with pytest.raises(ConfigError, match="server.max_body_bytes: expected an integer"):
        load(str(f), {}, {})


def test_example_file_documents_every_option_with_its_default():
    doc = tomllib.loads((ROOT / "config" / "sidecar.toml").read_text())
    defaults = Settings()
    for section in dataclasses.fields(Settings):
        cfg = getattr(defaults, section.name)
        for f in dataclasses.fields(cfg):
            assert f.name in doc[section.name], f"{section.name}.{f.name} missing from config/sidecar.toml"
            value = doc[section.name][f.name]
            expected = getattr(cfg, f.name)
            assert (tuple(value) if isinstance(value, list) else value) == expected, f"{section.name}.{f.name}"
    assert load(str(ROOT / "config" / "sidecar.toml"), {}, {}) == load(None, {}, {})


def test_summary_masks_secrets():
    s = load(None, {"SIDECAR_UPSTREAM_API_KEY": "sekrit-1", "SIDECAR_STORE_URL": "postgresql://u:pw-2@h/db"}, {})
    text = repr(summary(s))
    assert "sekrit-1" not in text and "pw-2" not in text


def test_cli_reports_bad_config_in_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--port", "99999"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["sidecar: configuration error: server.port: must be 1-65535, got 99999"]
