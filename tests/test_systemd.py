"""contrib/xlb.service: systemd accepts it, and it runs xlb as the README says."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "xlb.service"


def service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(UNIT)
    return parser["Service"]


def test_the_unit_serves_the_config_restarts_on_failure_and_reloads_by_apply():
    s = service()
    assert s["ExecStart"] == "/usr/local/bin/xlb up --config /etc/xlb/xlb.toml"
    assert s["ExecReload"].startswith("/usr/local/bin/xlb apply")
    assert s["Restart"] == "on-failure"
    assert "ExecStop" not in s          # the clean stop is systemd's SIGTERM
    assert s["RestartPreventExitStatus"] == "2"


def test_the_unit_restarts_an_instance_that_a_hangup_killed():
    """SIGHUP kills `xlb up` as a crash does (its data path runs on, without
    health checks), but systemd takes it for a clean exit, which on-failure
    does not restart: `kill -HUP`, as for another daemon's reload, left the
    data path without its control process until someone noticed."""
    assert "SIGHUP" in service()["RestartForceExitStatus"].split()


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a private /usr/local/bin: needs root")
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_accepts_the_unit():
    """verify also checks that ExecStart's program exists: it runs in a mount
    namespace of its own where /usr/local/bin holds this checkout's xlb."""
    xlb = ROOT / ".venv" / "bin" / "xlb"
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
         'mount -t tmpfs tmpfs /usr/local/bin; cp "$1" /usr/local/bin/xlb; '
         'systemd-analyze verify "$2"', "sh", str(xlb), str(UNIT)],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
