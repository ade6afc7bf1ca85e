"""The systemd units (one relay, and the per-node template): `systemd-analyze verify` clean, hardening in
place, consistent with the config."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import load

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "relay.service"
TEMPLATE = ROOT / "systemd" / "relay@.service"
# each unit as systemd would load it: the template as an instance (node 2)
UNITS = pytest.mark.parametrize("unit,name", [(UNIT, "relay.service"), (TEMPLATE, "relay@2.service")])


def rendered(tmp_path: Path, unit: Path = UNIT, name: str = "relay.service") -> Path:
    """The unit with /opt/relay pointing at this checkout, so that verify can check the executable."""
    text = unit.read_text()
    text = text.replace("/opt/relay/.venv/bin/python", sys.executable).replace("/opt/relay", str(ROOT))
    path = tmp_path / name
    path.write_text(text)
    return path


def directives(unit: Path = UNIT) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


@UNITS
def test_systemd_analyze_verify_is_clean(tmp_path: Path, unit: Path, name: str) -> None:
    out = subprocess.run(
        ["systemd-analyze", "verify", str(rendered(tmp_path, unit, name))], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "" and out.stderr.strip() == "", out.stdout + out.stderr


@UNITS
def test_verify_would_catch_a_broken_unit(tmp_path: Path, unit: Path, name: str) -> None:
    path = rendered(tmp_path, unit, name)
    path.write_text(path.read_text().replace(sys.executable, "/nonexistent/python"))
    out = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    assert out.returncode != 0


@UNITS
def test_hardening_and_exposure(tmp_path: Path, unit: Path, name: str) -> None:
    d = directives(unit)
    assert d["User"] == ["relay"] and d["Group"] == ["relay"]
    for key, value in {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes", "ProtectHome": "yes",
        "Restart": "on-failure", "KillSignal": "SIGTERM", "RestartPreventExitStatus": "2",
    }.items():  # fmt: skip
        assert d[key] == [value], key
    assert int(d["LimitNOFILE"][0]) >= 65536
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(rendered(tmp_path, unit, name))],
        capture_output=True, text=True,
    )  # fmt: skip
    m = re.search(rf"Overall exposure level for {re.escape(name)}: ([0-9.]+)", out.stdout)
    assert m, out.stdout[-500:] + out.stderr
    assert float(m.group(1)) <= 2.0  # "OK" in systemd's scale (0 = most locked down, 10 = unprotected)


def test_example_config_fits_the_unit() -> None:
    config = load(ROOT / "systemd" / "config.example.toml", env={})
    d = directives()
    (rw,) = d["ReadWritePaths"]
    assert str(config.data_dir).startswith(rw + "/")
    assert d["StateDirectory"] == [Path(rw).name]
    assert config.server_shutdown_grace_seconds + 5 <= int(d["TimeoutStopSec"][0])
    assert "--config /etc/relay/config.toml" in d["ExecStart"][0]
    sysusers = (ROOT / "systemd" / "relay.sysusers.conf").read_text()
    assert re.search(r"^u relay - .* /var/lib/relay$", sysusers, re.M)
    configparser.ConfigParser(strict=False, interpolation=None).read_string(UNIT.read_text())


def test_template_differs_from_the_single_unit_only_in_what_makes_a_node() -> None:
    """Same hardening and install: node id, port and data directory come from the instance name."""
    one, many = directives(UNIT), directives(TEMPLATE)
    assert {k for k in one if one[k] != many.get(k)} == {"Description", "ExecStart", "StateDirectory"}
    assert many["ExecStart"][0] == one["ExecStart"][0] + " --node-id %i --port 808%i --data-dir /var/lib/relay/node%i"
    assert many["StateDirectory"] == ["relay/node%i"]
