"""The control process's answers to requests (daemon._answer), on a real data path."""

import asyncio
import json
import socket

import pytest

from xlb import config as configfile, daemon
from xlb.datapath import DatapathError

pytestmark = pytest.mark.kernel


def answer(balancer, request: dict, sync_targets) -> dict:
    """The control process's answer to `request`, sent over a socket pair."""
    async def exchange():
        ours, theirs = socket.socketpair()
        with theirs:
            reader, writer = await asyncio.open_unix_connection(sock=ours)
            theirs.sendall(json.dumps(request).encode() + b"\n")
            try:
                return await daemon._answer(balancer, lambda: None, asyncio.Lock(),
                                            sync_targets, reader, writer)
            finally:
                writer.close()
    return asyncio.run(exchange())


def test_an_apply_whose_health_sync_fails_is_counted_an_error(balancer, tmp_path):
    """After the config, the health checker takes its targets and their states
    go to the data path: the operator hears of a failure there, and
    xlb_config_applies_total counts the apply as he heard it."""
    async def fails():
        raise DatapathError("the health sync failed")

    async def syncs():
        pass

    request = {"cmd": "apply", "text": configfile.dump(balancer.config),
               "path": str(tmp_path / "xlb.toml")}
    assert answer(balancer, request, fails) == \
        {"ok": False, "error": "the health sync failed", "bad_input": False}
    assert balancer.applies == {"ok": 0, "error": 1}
    assert answer(balancer, request, syncs)["ok"]
    assert balancer.applies == {"ok": 1, "error": 1}


def test_an_apply_that_loses_a_drain_says_so(balancer, tmp_path):
    """Drain and maint belong to a server of a pool: a config that renames the
    pool loses them, and the apply names each one it forgot."""
    balancer.set_admin("drain", "default", "backend1")
    text = configfile.dump(balancer.config).replace('"default"', '"web"').replace(
        "[pools.default]", "[pools.web]")

    async def syncs():
        pass

    reply = answer(balancer, {"cmd": "apply", "text": text, "path": str(tmp_path / "x.toml")},
                   syncs)
    assert reply["ok"], reply
    assert reply["result"]["admin_forgotten"] == ["drain of backend1 in pool default"]
    assert balancer.admin == {} and balancer.states[("web", "backend1")] == "up"
    reply = answer(balancer, {"cmd": "apply", "text": text, "path": str(tmp_path / "x.toml")},
                   syncs)
    assert reply["result"]["admin_forgotten"] == []
