#!/usr/bin/env python3
"""Self-test of scripts/lightbits-sim.py: starts the simulator and exercises its REST API, control
API, fault injection and loop-device attach emulation. Run as root (losetup):

    python3 scripts/lightbits-sim-test.py [-k SUBSTRING] [-v]

Prints one line per test and exits non-zero if any fails. Python 3.11 standard library only.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable

SIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lightbits-sim.py")
TOKEN = "test-jwt-token.abc.def"
HOST_NQN = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000feed"
DELAY = 0.2
MiB = 1 << 20

VERBOSE = False


class Sim:
    """One simulator process plus HTTP helpers."""

    def __init__(self, root: str, *extra: str, tls: tuple[str, str] | None = None) -> None:
        self.root = root
        self.state_dir = os.path.join(root, "state")
        self.discovery_dir = os.path.join(root, "discovery.d")
        self.by_id_dir = os.path.join(root, "by-id")
        self.nvme_class_dir = os.path.join(root, "class-nvme")
        os.makedirs(self.discovery_dir, exist_ok=True)
        token_file = os.path.join(root, "token")
        with open(token_file, "w") as f:
            f.write(TOKEN + "\n")
        port_file = os.path.join(root, "port")
        args = [sys.executable, SIM, "--port", "0", "--port-file", port_file,
                "--token-file", token_file, "--state-dir", self.state_dir,
                "--discovery-dir", self.discovery_dir, "--by-id-dir", self.by_id_dir,
                "--create-delay", str(DELAY), "--delete-delay", str(DELAY), *extra]
        self.tls = tls
        if tls:
            args += ["--tls-cert", tls[0], "--tls-key", tls[1]]
        self.stderr = open(os.path.join(root, "sim.log"), "w")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        line = self.proc.stdout.readline().strip()  # "listening on http(s)://127.0.0.1:PORT"
        scheme = "https" if tls else "http"
        if not line.startswith(f"listening on {scheme}://127.0.0.1:"):
            raise AssertionError(f"unexpected first line {line!r}; log: {self.log()}")
        self.port = int(line.rsplit(":", 1)[1])
        with open(port_file) as f:
            assert int(f.read()) == self.port, "port file disagrees with the listening line"
        self.subsystem_nqn = self.api("GET", "/api/v2/clusterinfo")[1]["subsystemNQN"]

    def log(self) -> str:
        if not self.stderr.closed:
            self.stderr.flush()
        with open(self.stderr.name) as f:
            return f.read()

    def connection(self, port: int | None = None,
                   timeout: float = 10) -> http.client.HTTPConnection:
        port = port or self.port
        if self.tls:
            context = ssl.create_default_context(cafile=self.tls[0])
            return http.client.HTTPSConnection("127.0.0.1", port, context=context,
                                               timeout=timeout)
        return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None, port: int | None = None,
                timeout: float = 10) -> tuple[int, Any, dict[str, str]]:
        conn = self.connection(port, timeout)
        data = None if body is None else json.dumps(body).encode()
        hdrs = {"Accept": "application/json", **(headers or {})}
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        payload = json.loads(raw) if raw else None
        if VERBOSE:
            print(f"    {method} {path} -> {resp.status}", file=sys.stderr)
        return resp.status, payload, dict(resp.getheaders())

    def api(self, method: str, path: str, body: Any = None, token: str | None = TOKEN,
            headers: dict[str, str] | None = None, port: int | None = None,
            timeout: float = 10) -> tuple[int, Any, dict[str, str]]:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        return self.request(method, path, body, hdrs, port, timeout)

    def sim(self, method: str, path: str, body: Any = None) -> Any:
        status, payload, _ = self.request(method, path, body)
        assert status == 200, f"{method} {path} -> {status} {payload}"
        return payload

    def state(self) -> dict[str, Any]:
        return self.sim("GET", "/sim/state")

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        return self.proc.returncode


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

VOLS = "/api/v2/projects/default/volumes"
SNAPS = "/api/v2/projects/default/snapshots"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def expect(status: int, got: tuple[int, Any, dict[str, str]], what: str) -> Any:
    assert got[0] == status, f"{what}: expected {status}, got {got[0]} {got[1]}"
    return got[1]


def create_volume_body(name: str, size: str = "1 gib", **extra: Any) -> dict[str, Any]:
    """The body Cinder's LightOS driver sends (reference B.2)."""
    return {"name": name, "size": size, "replicaCount": "3", "compression": "False",
            "acl": {"values": ["ALLOW_NONE"]}, "IPAcl": {"values": ["ALLOW_NONE"]},
            "sourceSnapshotUUID": None, "sourceSnapshotName": None, **extra}


def wait_volume(sim: Sim, vol_uuid: str, state: str) -> dict[str, Any]:
    def check() -> Any:
        status, body, _ = sim.api("GET", f"{VOLS}/{vol_uuid}")
        return body if status == 200 and body["state"] == state else None
    return wait_for(f"volume {vol_uuid} {state}", check)


def wait_snapshot(sim: Sim, snap_uuid: str, state: str) -> dict[str, Any]:
    def check() -> Any:
        status, body, _ = sim.api("GET", f"{SNAPS}/{snap_uuid}")
        return body if status == 200 and body["state"] == state else None
    return wait_for(f"snapshot {snap_uuid} {state}", check)


def wait_gone(sim: Sim, path: str) -> None:
    wait_for(f"{path} 404", lambda: sim.api("GET", path)[0] == 404)


def sim_volume(sim: Sim, name: str, size: int, content: bytes | None = None) -> dict[str, Any]:
    """An Available volume created through the control API, optionally from a file's bytes."""
    body: dict[str, Any] = {"name": name, "size": size}
    if content is not None:
        path = os.path.join(sim.root, f"{name}.src")
        with open(path, "wb") as f:
            f.write(content)
        body["from_file"] = path
    return sim.sim("POST", "/sim/volumes", body)


def read_all(sim: Sim, kind: str, res_uuid: str) -> bytes:
    return base64.b64decode(sim.sim("GET", f"/sim/{kind}/{res_uuid}/read")["data_b64"])


def set_acl(sim: Sim, vol_uuid: str, values: list[str]) -> None:
    """GET for the ETag, then PUT with If-Match (the driver's flow, reference B.5)."""
    vol = expect(200, sim.api("GET", f"{VOLS}/{vol_uuid}"), "get volume")
    expect(200, sim.api("PUT", f"{VOLS}/{vol_uuid}",
                        {"acl": {"values": values}, "IPAcl": {"values": ["ALLOW_ANY"]}},
                        headers={"If-Match": vol["ETag"]}), "update acl")


def loops_backed_by(directory: str) -> list[str]:
    """Loop devices whose backing file lies under `directory`."""
    root = os.path.realpath(directory) + os.sep
    found = []
    for entry in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{entry}/loop/backing_file") as f:
                backing = f.read().strip().removesuffix(" (deleted)")
        except OSError:
            continue
        if os.path.realpath(backing).startswith(root):
            found.append(f"/dev/{entry}")
    return found


def loop_attached(loop: str) -> bool:
    return os.path.exists(f"/sys/block/{os.path.basename(loop)}/loop/backing_file")


def write_dsc(sim: Sim, vol_uuid: str, host_nqn: str = HOST_NQN) -> str:
    """The discovery-client file os-brick writes (reference B.6), one line per node."""
    nodes = sim.api("GET", "/api/v2/nodes")[1]["nodes"]
    lines = [f"# os_brick connector dsc file for LightOS volume: {vol_uuid}"]
    for node in nodes:
        ip = node["nvmeEndpoint"].rsplit(":", 1)[0].strip("[]")
        lines.append(f"-t tcp -a {ip} -s 8009 -q {host_nqn} -n {sim.subsystem_nqn}")
    path = os.path.join(sim.discovery_dir, f"{vol_uuid}.conf")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    return path


# ------------------------------------------------------------------------------------------------
# Tests (each gets a running simulator; the simulator is reset between tests)
# ------------------------------------------------------------------------------------------------

def test_auth(sim: Sim) -> None:
    expect(401, sim.api("GET", VOLS, token=None), "no token")
    body = expect(401, sim.api("GET", VOLS, token="wrong"), "wrong token")
    assert body["code"] == 16 and body["message"], body
    expect(401, sim.api("GET", "/api/v2/nodes", headers={"Authorization": TOKEN}, token=None),
           "token without Bearer")
    expect(200, sim.api("GET", VOLS), "right token")
    assert TOKEN not in sim.log(), "the token leaked into the log"


def test_cluster_and_nodes(sim: Sim) -> None:
    info = expect(200, sim.api("GET", "/api/v2/clusterinfo"), "clusterinfo")
    assert info["UUID"] and info["subsystemNQN"].startswith("nqn."), info
    cluster = expect(200, sim.api("GET", "/api/v2/cluster"), "cluster")
    assert "estimatedFreeLogicalStorage" in cluster["statistics"], cluster
    nodes = expect(200, sim.api("GET", "/api/v2/nodes"), "nodes")["nodes"]
    assert len(nodes) == 3 and all(n["nvmeEndpoint"].endswith(":4420") for n in nodes), nodes
    node = expect(200, sim.api("GET", f"/api/v2/nodes/{nodes[1]['UUID']}"), "node")
    assert node == nodes[1]
    expect(404, sim.api("GET", "/api/v2/nodes/nope"), "unknown node")


def test_volume_lifecycle(sim: Sim) -> None:
    created = expect(200, sim.api("POST", VOLS, create_volume_body("volume-1")), "create")
    assert created["state"] == "Creating", created
    assert created["size"] == str(1 << 30) and created["acl"] == {"values": ["ALLOW_NONE"]}
    vol_uuid = created["UUID"]
    status, body, headers = sim.api("GET", f"{VOLS}/{vol_uuid}")
    assert status == 200 and body["state"] == "Creating", body
    assert headers.get("ETag") == body["ETag"], (headers, body)
    vol = wait_volume(sim, vol_uuid, "Available")
    assert os.path.getsize(os.path.join(sim.state_dir, "volumes", f"{vol_uuid}.img")) == 1 << 30
    by_name = expect(200, sim.api("GET", f"{VOLS}/?name=volume-1"), "get by name")
    assert by_name["UUID"] == vol_uuid, by_name
    listing = expect(200, sim.api("GET", VOLS), "list")
    assert [v["UUID"] for v in listing["volumes"]] == [vol_uuid], listing
    expect(404, sim.api("GET", f"{VOLS}/?name=nope"), "unknown name")
    expect(404, sim.api("GET", f"{VOLS}/00000000-0000-0000-0000-000000000000"), "unknown uuid")
    # Non-project path form (pve-lightbits) sees the same volume.
    alt = expect(200, sim.api("GET", f"/api/v2/volumes/{vol_uuid}?projectName=default"), "alt get")
    assert alt["UUID"] == vol_uuid and alt["ETag"] == vol["ETag"]
    # Another project does not.
    expect(404, sim.api("GET", f"/api/v2/projects/other/volumes/{vol_uuid}"), "other project")


def test_duplicate_name_409(sim: Sim) -> None:
    expect(200, sim.api("POST", VOLS, create_volume_body("dup")), "first")
    body = expect(409, sim.api("POST", VOLS, create_volume_body("dup")), "duplicate")
    assert body["code"] == 6, body
    expect(200, sim.api("POST", "/api/v2/projects/p2/volumes", create_volume_body("dup")),
           "same name, other project")


def test_if_match_412(sim: Sim) -> None:
    vol = sim_volume(sim, "etag", MiB)
    vol_uuid, etag = vol["UUID"], vol["ETag"]
    expect(412, sim.api("PUT", f"{VOLS}/{vol_uuid}", {"acl": {"values": [HOST_NQN]}},
                        headers={"If-Match": "stale-etag"}), "stale etag")
    updated = expect(200, sim.api("PUT", f"{VOLS}/{vol_uuid}", {"acl": {"values": [HOST_NQN]}},
                                  headers={"If-Match": etag}), "fresh etag")
    assert updated["acl"]["values"] == [HOST_NQN] and updated["ETag"] != etag, updated
    expect(412, sim.api("PUT", f"{VOLS}/{vol_uuid}", {"acl": {"values": []}},
                        headers={"If-Match": etag}), "reused etag")
    quoted = f'"{updated["ETag"]}"'
    grown = expect(200, sim.api("PUT", f"{VOLS}/{vol_uuid}", {"UUID": vol_uuid, "size": "2 mib"},
                                headers={"If-Match": quoted}), "extend, quoted etag")
    assert grown["size"] == str(2 * MiB), grown


def test_snapshot_point_in_time(sim: Sim) -> None:
    """Snapshot during concurrent /sim writes = the initial bytes + exactly the first K writes."""
    size, block = 256 * 4096, 4096
    vol = sim_volume(sim, "busy", size)
    writes: list[tuple[int, bytes]] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set() or i < 40:
            data = i.to_bytes(4, "little") * (block // 4)
            offset = (i * 37 % 256) * block
            seq = sim.sim("POST", f"/sim/volumes/{vol['UUID']}/write",
                          {"offset": offset, "data_b64": base64.b64encode(data).decode()})["seq"]
            assert seq == i + 1, (seq, i)
            writes.append((offset, data))
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    wait_for("some writes", lambda: len(writes) >= 20)
    snap = expect(200, sim.api("POST", SNAPS, {"name": "snapshot-1", "sourceVolumeUUID": None,
                                               "sourceVolumeName": "busy"}), "snapshot")
    stop.set()
    thread.join()
    wait_snapshot(sim, snap["UUID"], "Available")
    by_name = expect(200, sim.api("GET", f"{SNAPS}/?Name=snapshot-1"), "snapshot by Name")
    assert by_name["UUID"] == snap["UUID"] and by_name["sourceVolumeUUID"] == vol["UUID"]
    snap_state = next(s for s in sim.state()["snapshots"] if s["UUID"] == snap["UUID"])
    seq = snap_state["sim"]["sourceWriteSeq"]
    assert 20 <= seq < len(writes), (seq, len(writes))
    expected = bytearray(size)
    for offset, data in writes[:seq]:
        expected[offset:offset + len(data)] = data
    assert read_all(sim, "snapshots", snap["UUID"]) == bytes(expected), "snapshot is not a prefix"
    final = bytearray(size)
    for offset, data in writes:
        final[offset:offset + len(data)] = data
    assert read_all(sim, "volumes", vol["UUID"]) == bytes(final)
    listing = expect(200, sim.api("GET", SNAPS), "list snapshots")["snapshots"]
    assert [s["UUID"] for s in listing] == [snap["UUID"]]


def test_clone_from_snapshot(sim: Sim) -> None:
    content = os.urandom(MiB)
    vol = sim_volume(sim, "src", MiB, content)
    snap = expect(200, sim.api("POST", SNAPS, {"name": "for_clone_x",
                                               "sourceVolumeUUID": vol["UUID"]}), "snapshot")
    wait_snapshot(sim, snap["UUID"], "Available")
    sim.sim("POST", f"/sim/volumes/{vol['UUID']}/write",
            {"offset": 0, "data_b64": base64.b64encode(b"changed after").decode()})
    clone = expect(200, sim.api("POST", VOLS, create_volume_body(
        "clone", size=None, sourceSnapshotName="for_clone_x")), "clone")
    assert clone["state"] == "Creating" and clone["sourceSnapshotUUID"] == snap["UUID"], clone
    wait_volume(sim, clone["UUID"], "Available")
    assert read_all(sim, "volumes", clone["UUID"]) == content, "clone differs from the snapshot"
    # The snapshot may be deleted while the clone lives (reference B.2, pve-lightbits).
    expect(200, sim.api("DELETE", f"{SNAPS}/{snap['UUID']}?"), "delete snapshot")
    wait_gone(sim, f"{SNAPS}/{snap['UUID']}")
    assert read_all(sim, "volumes", clone["UUID"]) == content
    expect(404, sim.api("POST", VOLS, create_volume_body("c2", sourceSnapshotUUID=snap["UUID"])),
           "clone of a deleted snapshot")


def test_delete(sim: Sim) -> None:
    vol = sim_volume(sim, "doomed", MiB)
    path = f"{VOLS}/{vol['UUID']}"
    expect(200, sim.api("DELETE", path + "?"), "delete")
    assert sim.api("GET", path)[1]["state"] == "Deleting"
    expect(409, sim.api("POST", VOLS, create_volume_body("doomed")), "name taken while Deleting")
    expect(200, sim.api("DELETE", path + "?"), "delete again while Deleting")
    wait_gone(sim, path)
    expect(404, sim.api("DELETE", path + "?"), "delete after gone")
    assert not os.path.exists(os.path.join(sim.state_dir, "volumes", f"{vol['UUID']}.img"))
    assert any(d["UUID"] == vol["UUID"] for d in sim.state()["deleted"])
    expect(200, sim.api("POST", VOLS, create_volume_body("doomed")), "name free again")


def test_injected_503_then_success(sim: Sim) -> None:
    sim.sim("POST", "/sim/faults",
            {"method": "POST", "path": "/volumes/?$", "status": 503, "count": 2})
    for _ in range(2):
        body = expect(503, sim.api("POST", VOLS, create_volume_body("retry")), "injected")
        assert body["code"] == 14, body
    created = expect(200, sim.api("POST", VOLS, create_volume_body("retry")), "after the fault")
    wait_volume(sim, created["UUID"], "Available")
    faults = sim.sim("GET", "/sim/faults")["faults"]
    assert faults[0]["count"] == 0 and faults[0]["hits"] == 2, faults
    requests = sim.sim("GET", "/sim/requests")["requests"]
    assert [r["status"] for r in requests if r["method"] == "POST"] == [503, 503, 200], requests


def test_error_after(sim: Sim) -> None:
    """The operation happens but the answer is lost: a retry must find the volume by name."""
    sim.sim("POST", "/sim/faults", {"kind": "error_after", "method": "POST", "path": "/volumes",
                                    "status": 500})
    expect(500, sim.api("POST", VOLS, create_volume_body("lost-reply")), "lost reply")
    expect(409, sim.api("POST", VOLS, create_volume_body("lost-reply")), "it exists")
    expect(200, sim.api("GET", f"{VOLS}/?name=lost-reply"), "found by name")


def test_stuck_clone(sim: Sim) -> None:
    vol = sim_volume(sim, "src", MiB)
    snap = expect(200, sim.api("POST", SNAPS, {"name": "s", "sourceVolumeUUID": vol["UUID"]}),
                  "snapshot")
    wait_snapshot(sim, snap["UUID"], "Available")
    sim.sim("POST", "/sim/faults", {"kind": "stuck", "method": "POST", "path": "/volumes",
                                    "clone": True})
    plain = expect(200, sim.api("POST", VOLS, create_volume_body("plain")), "plain create")
    clone = expect(200, sim.api("POST", VOLS, create_volume_body(
        "stuck", sourceSnapshotUUID=snap["UUID"])), "clone")
    wait_volume(sim, plain["UUID"], "Available")  # not a clone: fault not consumed
    time.sleep(DELAY * 4)
    assert sim.api("GET", f"{VOLS}/{clone['UUID']}")[1]["state"] == "Creating"
    state = next(v for v in sim.state()["volumes"] if v["UUID"] == clone["UUID"])
    assert state["sim"]["stuck"], state
    expect(200, sim.api("DELETE", f"{VOLS}/{clone['UUID']}?"), "delete the stuck clone")
    wait_gone(sim, f"{VOLS}/{clone['UUID']}")


def test_delete_fails_once(sim: Sim) -> None:
    vol = sim_volume(sim, "stubborn", MiB)
    sim.sim("POST", "/sim/faults", {"method": "DELETE", "path": "/volumes/", "status": 500})
    expect(500, sim.api("DELETE", f"{VOLS}/{vol['UUID']}?"), "first delete")
    assert sim.api("GET", f"{VOLS}/{vol['UUID']}")[1]["state"] == "Available"
    expect(200, sim.api("DELETE", f"{VOLS}/{vol['UUID']}?"), "second delete")
    wait_gone(sim, f"{VOLS}/{vol['UUID']}")


def test_create_fails(sim: Sim) -> None:
    sim.sim("POST", "/sim/faults", {"kind": "fail", "method": "POST", "path": "/snapshots"})
    vol = sim_volume(sim, "v", MiB)
    snap = expect(200, sim.api("POST", SNAPS, {"name": "s", "sourceVolumeUUID": vol["UUID"]}),
                  "snapshot")
    wait_snapshot(sim, snap["UUID"], "Failed")
    expect(200, sim.api("DELETE", f"{SNAPS}/{snap['UUID']}?"), "delete failed snapshot")
    wait_gone(sim, f"{SNAPS}/{snap['UUID']}")


def test_project_scope_403(sim: Sim) -> None:
    """Run on a simulator started with --token-projects default."""
    expect(200, sim.api("GET", VOLS), "own project")
    body = expect(403, sim.api("GET", "/api/v2/projects/other/volumes"), "foreign project")
    assert body["code"] == 7, body
    expect(403, sim.api("GET", "/api/v2/volumes?projectName=other"), "foreign project, alt form")
    expect(401, sim.api("GET", "/api/v2/projects/other/volumes", token="bad"), "401 before 403")


def test_attach_detach(sim: Sim) -> None:
    content = os.urandom(2 * MiB)
    vol = sim_volume(sim, "attached", 2 * MiB, content)
    vol_uuid = vol["UUID"]
    link = os.path.join(sim.by_id_dir, f"nvme-uuid.{vol_uuid}")
    dsc = write_dsc(sim, vol_uuid)
    time.sleep(0.4)
    assert not os.path.lexists(link), "attached although the ACL is ALLOW_NONE"
    assert sim.state()["discovery"]["hostNQNs"] == [HOST_NQN]

    set_acl(sim, vol_uuid, [HOST_NQN])
    wait_for("by-id link", lambda: os.path.lexists(link))
    loop = os.path.realpath(link)
    assert loop.startswith("/dev/loop") and loop_attached(loop), loop
    with open(link, "rb") as f:
        assert f.read() == content, "device bytes differ from the volume's"
    vol_state = next(v for v in sim.state()["volumes"] if v["UUID"] == vol_uuid)
    assert vol_state["sim"]["loop"] == loop, vol_state

    set_acl(sim, vol_uuid, ["ALLOW_NONE"])  # ACL removed → detached
    wait_for("link removed", lambda: not os.path.lexists(link))
    wait_for("loop detached", lambda: not loop_attached(loop))

    set_acl(sim, vol_uuid, [HOST_NQN])
    wait_for("link again", lambda: os.path.lexists(link))
    loop = os.path.realpath(link)
    os.unlink(dsc)  # discovery file removed → detached
    wait_for("link removed (file)", lambda: not os.path.lexists(link))
    wait_for("loop detached (file)", lambda: not loop_attached(loop))

    write_dsc(sim, vol_uuid, host_nqn="nqn.other-host")  # another host: not us
    time.sleep(0.4)
    assert not os.path.lexists(link)

    write_dsc(sim, vol_uuid)
    wait_for("link (re-added file)", lambda: os.path.lexists(link))
    loop = os.path.realpath(link)
    expect(200, sim.api("DELETE", f"{VOLS}/{vol_uuid}?"), "delete while attached")
    wait_for("link removed (delete)", lambda: not os.path.lexists(link))
    wait_gone(sim, f"{VOLS}/{vol_uuid}")
    assert not loop_attached(loop)
    assert loops_backed_by(sim.state_dir) == []


def test_discovery_lines_checked(sim: Sim) -> None:
    """Lines with the wrong port, address or subsystem are ignored, and /sim/state says why."""
    vol = sim_volume(sim, "v", MiB)
    set_acl(sim, vol["UUID"], [HOST_NQN])
    path = os.path.join(sim.discovery_dir, f"{vol['UUID']}.conf")
    with open(path, "w") as f:
        f.write(f"-t tcp -a 127.0.0.1 -s 4420 -q {HOST_NQN} -n {sim.subsystem_nqn}\n"
                f"-t tcp -a 10.9.9.9 -s 8009 -q {HOST_NQN} -n {sim.subsystem_nqn}\n"
                f"-t tcp -a 127.0.0.1 -s 8009 -q {HOST_NQN} -n nqn.not-ours\n")
    wait_for("report", lambda: f"{vol['UUID']}.conf" in sim.state()["discovery"]["files"])
    report = sim.state()["discovery"]["files"][f"{vol['UUID']}.conf"]
    assert report["hostNQNs"] == [] and len(report["ignoredLines"]) == 3, report
    time.sleep(0.3)
    assert not os.path.lexists(os.path.join(sim.by_id_dir, f"nvme-uuid.{vol['UUID']}"))
    os.unlink(path)


def test_reset(sim: Sim) -> None:
    vol = sim_volume(sim, "v", MiB)
    set_acl(sim, vol["UUID"], [HOST_NQN])
    write_dsc(sim, vol["UUID"])
    wait_for("attached", lambda: loops_backed_by(sim.state_dir))
    sim.sim("POST", "/sim/faults", {"path": "never-matches"})
    sim.sim("POST", "/sim/reset")
    state = sim.state()
    assert state["volumes"] == [] and state["faults"] == [] and state["attachments"] == [], state
    assert loops_backed_by(sim.state_dir) == []
    os.unlink(os.path.join(sim.discovery_dir, f"{vol['UUID']}.conf"))


def test_api_nodes(sim: Sim) -> None:
    """Every API node serves the same cluster; one taken down drops its connections unanswered,
    one that hangs holds them, and a "down" fault loses the reply of an operation it did."""
    nodes = sim.state()["apiNodes"]
    assert [n["state"] for n in nodes] == ["up", "up"] and nodes[0]["port"] == sim.port, nodes
    other = nodes[1]["port"]
    vol = sim_volume(sim, "v", MiB)
    expect(200, sim.api("GET", f"{VOLS}/{vol['UUID']}", port=other), "node 1 serves the cluster")

    def unanswered(timeout: float = 10) -> bool:
        try:
            sim.api("GET", f"{VOLS}/{vol['UUID']}", port=other, timeout=timeout)
        except (ConnectionError, http.client.HTTPException, TimeoutError, OSError):
            return True
        return False

    sim.sim("POST", "/sim/api-nodes/1", {"state": "down"})
    assert unanswered(), "a down node answered"
    expect(200, sim.api("GET", f"{VOLS}/{vol['UUID']}"), "node 0 still answers")
    assert sim.request("GET", "/sim/state", port=other)[0] == 200, "control API always answers"
    sim.sim("POST", "/sim/api-nodes/1", {"state": "hang"})
    started = time.monotonic()
    assert unanswered(timeout=0.5), "a hung node answered"
    assert time.monotonic() - started >= 0.45, "a hung node answered at once"
    sim.sim("POST", "/sim/api-nodes/1", {"state": "up"})
    hung = wait_for("the hung request logged", lambda: [
        r for r in sim.sim("GET", "/sim/requests")["requests"] if r["status"] == 0])
    assert hung[-1]["node"] == 1, hung
    expect(200, sim.api("GET", f"{VOLS}/{vol['UUID']}", port=other), "node 1 back up")

    sim.sim("POST", "/sim/faults", {"kind": "down", "method": "PUT", "path": "/volumes/"})
    before = expect(200, sim.api("GET", f"{VOLS}/{vol['UUID']}"), "get")
    try:
        sim.api("PUT", f"{VOLS}/{vol['UUID']}", {"acl": {"values": [HOST_NQN]}}, port=other)
        raise AssertionError("the PUT that took node 1 down was answered")
    except (ConnectionError, http.client.HTTPException, OSError):
        pass
    after = expect(200, sim.api("GET", f"{VOLS}/{vol['UUID']}"), "get after")
    assert after["acl"]["values"] == [HOST_NQN] and after["ETag"] != before["ETag"], after
    assert [n["state"] for n in sim.state()["apiNodes"]] == ["up", "down"]
    requests = sim.sim("GET", "/sim/requests")["requests"]
    assert requests[-2]["node"] == 1 and requests[-2]["status"] == 0, requests[-2:]
    assert requests[-1]["node"] == 0 and requests[-1]["status"] == 200, requests[-1:]
    sim.sim("POST", "/sim/reset")
    assert [n["state"] for n in sim.state()["apiNodes"]] == ["up", "up"], "reset brings nodes up"


def test_nvme_controllers(sim: Sim) -> None:
    """--nvme-class-dir: one controller per connected host, one namespace per attached volume
    that host may see; both go when the ACL or the discovery file goes."""
    mine = sim_volume(sim, "mine", MiB)
    theirs = sim_volume(sim, "theirs", MiB)
    set_acl(sim, mine["UUID"], [HOST_NQN])
    set_acl(sim, theirs["UUID"], ["nqn.other-host"])
    controller = os.path.join(sim.nvme_class_dir, "nvme0")
    dsc = write_dsc(sim, mine["UUID"])
    namespace = os.path.join(controller, f"nvme0n{mine['nsid']}")
    wait_for("namespace", lambda: os.path.isdir(namespace))

    def read(path: str) -> str:
        with open(path) as f:
            return f.read().strip()

    assert read(os.path.join(controller, "subsysnqn")) == sim.subsystem_nqn
    assert read(os.path.join(controller, "hostnqn")) == HOST_NQN
    assert read(os.path.join(namespace, "wwid")) == f"uuid.{mine['UUID']}"
    assert read(os.path.join(namespace, "nsid")) == str(mine["nsid"])
    assert sorted(os.listdir(controller)).count(f"nvme0n{theirs['nsid']}") == 0
    set_acl(sim, theirs["UUID"], ["nqn.other-host", HOST_NQN])
    wait_for("second namespace",
             lambda: os.path.isdir(os.path.join(controller, f"nvme0n{theirs['nsid']}")))
    set_acl(sim, mine["UUID"], ["ALLOW_NONE"])
    wait_for("namespace gone", lambda: not os.path.exists(namespace))
    assert os.path.isdir(os.path.join(controller, f"nvme0n{theirs['nsid']}"))
    os.unlink(dsc)
    wait_for("controller gone", lambda: not os.path.exists(controller))


def test_https(root: str) -> None:
    os.makedirs(root, exist_ok=True)
    cert, key = os.path.join(root, "cert.pem"), os.path.join(root, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    sim = Sim(root, tls=(cert, key))
    try:
        expect(401, sim.api("GET", VOLS, token=None), "https without token")
        expect(200, sim.api("POST", VOLS, create_volume_body("tls")), "https create")
    finally:
        assert sim.stop() == 0


def test_shutdown_detaches(root: str) -> None:
    """SIGTERM detaches every loop device it created, and no other."""
    os.makedirs(root, exist_ok=True)
    foreign_file = os.path.join(root, "foreign.img")
    with open(foreign_file, "wb") as f:
        f.truncate(MiB)
    foreign = subprocess.run(["losetup", "--find", "--show", foreign_file], check=True,
                             capture_output=True, text=True).stdout.strip()
    try:
        sim = Sim(root)
        vols = [sim_volume(sim, f"v{i}", MiB) for i in range(3)]
        for vol in vols:
            set_acl(sim, vol["UUID"], [HOST_NQN])
            write_dsc(sim, vol["UUID"])
        wait_for("three loops", lambda: len(loops_backed_by(sim.state_dir)) == 3)
        assert sim.stop() == 0
        assert loops_backed_by(sim.state_dir) == [], loops_backed_by(sim.state_dir)
        assert not [n for n in os.listdir(sim.by_id_dir) if n.startswith("nvme-uuid.")]
        assert loop_attached(foreign), "the simulator touched a loop device it did not create"
    finally:
        subprocess.run(["losetup", "-d", foreign], check=False)


def test_restart_after_kill(root: str) -> None:
    """After a kill -9, a new simulator on the same --state-dir detaches the orphaned loops."""
    sim = Sim(root)
    vol = sim_volume(sim, "v", MiB)
    set_acl(sim, vol["UUID"], [HOST_NQN])
    write_dsc(sim, vol["UUID"])
    wait_for("attached", lambda: loops_backed_by(sim.state_dir))
    sim.proc.kill()
    sim.proc.wait()
    assert loops_backed_by(sim.state_dir), "kill -9 should leave the loop device behind"
    os.unlink(os.path.join(sim.discovery_dir, f"{vol['UUID']}.conf"))
    again = Sim(root)
    try:
        assert loops_backed_by(again.state_dir) == [], loops_backed_by(again.state_dir)
        assert not os.path.lexists(os.path.join(again.by_id_dir, f"nvme-uuid.{vol['UUID']}"))
    finally:
        assert again.stop() == 0


# ------------------------------------------------------------------------------------------------
# Runner
# ------------------------------------------------------------------------------------------------

def test_snapshot_diff(sim: Sim) -> None:
    """Changed blocks (B.8): the LBAs written between two snapshots, paged at the configured
    size with nextOffsetLBA, both number encodings, the documented 400/404, an unsupported mode."""
    size = 1024 * 4096
    vol = sim_volume(sim, "diffed", size)

    def snapshot(name: str) -> str:
        snap = expect(200, sim.api("POST", SNAPS, {"name": name, "sourceVolumeUUID": vol["UUID"]}),
                      name)
        wait_snapshot(sim, snap["UUID"], "Available")
        return snap["UUID"]

    def write(offset: int, length: int) -> None:
        sim.sim("POST", f"/sim/volumes/{vol['UUID']}/write",
                {"offset": offset, "data_b64": base64.b64encode(b"x" * length).decode()})

    base = snapshot("base")
    writes = [(0, 512), (100 * 512, 1), (4096 * 100, 8192), (size - 512, 512)]
    for i in range(20):
        writes.append((4096 * (300 + 7 * i), 4096))
    for offset, length in writes:
        write(offset, length)
    target = snapshot("target")
    write(4096 * 900, 4096)  # after the target: not in the diff
    expected: set[int] = set()
    for offset, length in writes:
        expected.update(range(offset // 512, (offset + length - 1) // 512 + 1))

    def all_pages(int64: str) -> tuple[set[int], int]:
        sim.sim("POST", "/sim/diff", {"pageSize": 3, "int64": int64})
        lbas: set[int] = set()
        offset, pages = 0, 0
        while True:
            page = expect(200, sim.api(
                "GET", f"{SNAPS}/diff/{target}?baseSnapshotUUID={base}&offsetLBA={offset}"), "diff")
            pages += 1
            for r in page["lbaRanges"]:
                if int64 == "string":
                    assert isinstance(r["lbaStart"], str), r
                start, end = int(r["lbaStart"]), int(r["lbaEnd"])
                bits = base64.b64decode(r["dataBitMap"])
                assert len(bits) == (end - start + 1 + 7) // 8, r
                assert bits[0] & 1 and bits[(end - start) // 8] >> ((end - start) % 8) & 1, r
                lbas.update(start + i for i in range(end - start + 1)
                            if bits[i // 8] >> (i % 8) & 1)
            nxt = int(page["nextOffsetLBA"])
            if nxt == 0:
                return lbas, pages
            assert nxt > offset and nxt % 64 == 0, (nxt, offset)
            offset = nxt

    for int64 in ("string", "number", "mixed"):
        lbas, pages = all_pages(int64)
        assert lbas == expected, sorted(lbas ^ expected)[:20]
        assert pages > 3, pages
    expect(400, sim.api("GET", f"{SNAPS}/diff/{target}?baseSnapshotUUID={target}"), "identical")
    expect(400, sim.api("GET", f"{SNAPS}/diff/{base}?baseSnapshotUUID={target}"), "base newer")
    expect(400, sim.api("GET", f"{SNAPS}/diff/{target}?baseSnapshotUUID={base}"
                               f"&offsetLBA={size // 512 + 64}"), "offset beyond the size")
    expect(404, sim.api("GET", f"{SNAPS}/diff/nope?baseSnapshotUUID={base}"), "unknown target")
    expect(404, sim.api("GET", f"{SNAPS}/diff/{target}?baseSnapshotUUID=nope"), "unknown base")
    other = sim_volume(sim, "other", size)
    other_snap = expect(200, sim.api("POST", SNAPS, {"name": "o",
                                                     "sourceVolumeUUID": other["UUID"]}), "o")
    wait_snapshot(sim, other_snap["UUID"], "Available")
    expect(400, sim.api("GET", f"{SNAPS}/diff/{target}?baseSnapshotUUID={other_snap['UUID']}"),
           "another volume")
    sim.sim("POST", "/sim/diff", {"pageSize": 10000, "hide": [[0, 0]]})
    lied = expect(200, sim.api("GET", f"{SNAPS}/diff/{target}?baseSnapshotUUID={base}"), "hide")
    assert all(int(r["lbaStart"]) > 0 for r in lied["lbaRanges"]), lied
    for status in (404, 501):
        sim.sim("POST", "/sim/diff", {"unsupported": status})
        expect(status, sim.api("GET", f"{SNAPS}/diff/{target}?baseSnapshotUUID={base}"), "off")
    sim.sim("POST", "/sim/reset")
    assert sim.sim("GET", "/sim/diff")["unsupported"] is None


SHARED_TESTS: list[Callable[[Sim], None]] = [
    test_auth, test_cluster_and_nodes, test_volume_lifecycle, test_duplicate_name_409,
    test_if_match_412, test_snapshot_point_in_time, test_clone_from_snapshot, test_delete,
    test_injected_503_then_success, test_error_after, test_stuck_clone, test_delete_fails_once,
    test_create_fails, test_attach_detach, test_discovery_lines_checked, test_reset,
    test_api_nodes, test_nvme_controllers, test_snapshot_diff,
]


def run(name: str, body: Callable[[], None], results: list[tuple[str, bool]]) -> None:
    started = time.monotonic()
    try:
        body()
        ok = True
    except Exception:
        ok = False
        traceback.print_exc()
    print(f"{'PASS' if ok else 'FAIL'} {name} ({time.monotonic() - started:.2f} s)", flush=True)
    results.append((name, ok))


def main() -> int:
    global VERBOSE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="run only tests whose name contains this")
    parser.add_argument("-v", action="store_true", help="print every request")
    args = parser.parse_args()
    VERBOSE = args.v
    if os.geteuid() != 0:
        print("lightbits-sim-test: must run as root (losetup)", file=sys.stderr)
        return 2
    results: list[tuple[str, bool]] = []
    root = tempfile.mkdtemp(prefix="lightbits-sim-test-")
    try:
        selected = [t for t in SHARED_TESTS if args.k in t.__name__]
        if selected:
            main_root = os.path.join(root, "main")
            sim = Sim(main_root, "--api-nodes", "2",
                      "--nvme-class-dir", os.path.join(main_root, "class-nvme"))
            try:
                for test in selected:
                    for name in os.listdir(sim.discovery_dir):  # the host starts disconnected
                        os.unlink(os.path.join(sim.discovery_dir, name))
                    sim.sim("POST", "/sim/reset")
                    run(test.__name__, lambda: test(sim), results)
            finally:
                code = sim.stop()
                results.append(("main simulator exits 0", code == 0))
                if any(not ok for _, ok in results):
                    print(f"--- simulator log ---\n{sim.log()[-6000:]}", file=sys.stderr)
        if args.k in "test_project_scope_403":
            scoped_root = os.path.join(root, "scoped")

            def scoped() -> None:
                sim = Sim(scoped_root, "--token-projects", "default")
                try:
                    test_project_scope_403(sim)
                finally:
                    assert sim.stop() == 0
            run("test_project_scope_403", scoped, results)
        if args.k in "test_https":
            run("test_https", lambda: test_https(os.path.join(root, "tls")), results)
        if args.k in "test_shutdown_detaches":
            run("test_shutdown_detaches",
                lambda: test_shutdown_detaches(os.path.join(root, "shutdown")), results)
        if args.k in "test_restart_after_kill":
            run("test_restart_after_kill",
                lambda: test_restart_after_kill(os.path.join(root, "restart")), results)
    finally:
        leftovers = loops_backed_by(root)
        for loop in leftovers:
            subprocess.run(["losetup", "-d", loop], check=False)
        if leftovers:
            results.append((f"no loop devices left behind (found {leftovers})", False))
        shutil.rmtree(root, ignore_errors=True)
    failed = [name for name, ok in results if not ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed"
          + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
