#!/usr/bin/env python3
"""Lightbits (LightOS) cluster simulator for ferry's integration tests.

Serves the LightOS REST API v2 subset that Cinder's LightOS driver and Lightbits' Proxmox plugin
use (see ../shared/reference/cinder-and-lightbits.md, PART B): project-scoped volumes and
snapshots, clones from snapshots, nodes, cluster info; JWT bearer auth, ETags/If-Match, asynchronous
states (Creating -> Available, Deleting -> 404) with configurable delays, and injectable faults.

Volumes and snapshots are sparse files under --state-dir. The NVMe/TCP attach, which the kernel here
cannot do, is emulated: the simulator plays discovery-client + kernel, watching --discovery-dir for
discovery-client `*.conf` files and exposing every Available volume whose ACL admits a host NQN
named there as a loop device, linked as <--by-id-dir>/nvme-uuid.<volume uuid>.

An unauthenticated control API under /sim/ lets tests inspect and steer the simulator; see
scripts/lightbits-sim.md. Python 3.11 standard library only. Run as root (losetup).
"""
from __future__ import annotations

import argparse
import base64
import collections
import datetime
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

# ------------------------------------------------------------------------------------------------
# Constants and small helpers
# ------------------------------------------------------------------------------------------------

API = "/api/v2"
BLOCK = 4096  # LightOS volume sizes are 4096-aligned (pve-lightbits)
TICK_SECONDS = 0.05  # reconciler period: state transitions and discovery-dir polling
MAX_HISTORY = 2000  # bounded logs in /sim/state and /sim/requests

# States of the simulator's API nodes (its listening ports), set by POST /sim/api-nodes/{i}.
API_NODE_STATES = {"up", "down", "hang"}

# Volume / snapshot states (reference B.3).
CREATING, AVAILABLE, DELETING, FAILED = "Creating", "Available", "Deleting", "Failed"
VOLUME_STATES = {"Unknown", CREATING, AVAILABLE, DELETING, "Deleted", FAILED, "Updating",
                 "Migrating", "Rollback"}
SNAPSHOT_STATES = {"Unknown", CREATING, AVAILABLE, DELETING, "Deleted", FAILED, "Updating"}

# gRPC status codes carried in error bodies (LightOS' REST API is a gRPC gateway).
GRPC_CODE = {400: 3, 401: 16, 403: 7, 404: 5, 405: 12, 409: 6, 412: 9, 500: 13, 501: 12, 503: 14}

SIZE_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
              "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}


def log(message: str) -> None:
    """One line to stderr, timestamped."""
    stamp = datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3]
    print(f"{stamp} lightbits-sim: {message}", file=sys.stderr, flush=True)


def utc_now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class DropConnection(Exception):
    """Close the client's connection without an answer (an API node lost mid-request)."""


class ApiError(Exception):
    """An HTTP error answered with the gRPC-gateway error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_body(status: int, message: str) -> dict[str, Any]:
    """gRPC-gateway error shape: {"code": <grpc code>, "error": m, "message": m, "details": []}."""
    return {"code": GRPC_CODE.get(status, 2), "error": message, "message": message, "details": []}


def parse_size(value: Any) -> int:
    """"<N> gib" (Cinder), "<bytes>" (pve-lightbits) or a JSON number → bytes, 4096-aligned."""
    if isinstance(value, bool) or value is None:
        raise ApiError(400, f"invalid size {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).lower() not in SIZE_UNITS:
            raise ApiError(400, f"invalid size {value!r}")
        size = int(match.group(1)) * SIZE_UNITS[match.group(2).lower()]
    if size <= 0 or size % BLOCK:
        raise ApiError(400, f"size {size} must be a positive multiple of {BLOCK} bytes")
    return size


def parse_replicas(value: Any) -> int:
    """replicaCount: Cinder sends a string ("3"), pve-lightbits a number; 1..3, default 3."""
    try:
        replicas = 3 if value is None else int(value)
    except (TypeError, ValueError) as e:
        raise ApiError(400, f"invalid replicaCount {value!r}") from e
    if not 1 <= replicas <= 3:
        raise ApiError(400, f"replicaCount {replicas} is not in 1..3")
    return replicas


def acl_values(body: dict[str, Any], key: str) -> list[str] | None:
    """Read `{"values": [...]}` under `key`; None when absent or null."""
    raw = body.get(key)
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("values"), list) \
            or not all(isinstance(v, str) for v in raw["values"]):
        raise ApiError(400, f"{key} must be {{\"values\": [strings]}}")
    return list(raw["values"])


def acl_admits(acl: list[str], host_nqns: set[str]) -> bool:
    """Whether a volume ACL lets any of `host_nqns` see the namespace."""
    if "ALLOW_ANY" in acl:
        return bool(host_nqns)
    return any(nqn in host_nqns for nqn in acl)


def strip_etag(value: str) -> str:
    """Normalise an If-Match/ETag value: drop a weak prefix and quotes."""
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"')


def copy_sparse(src: str, dst: str) -> None:
    """Copy-on-write copy when the filesystem can (reflink), else a sparse full copy."""
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", src, dst], check=True,
                   capture_output=True)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# Resources
# ------------------------------------------------------------------------------------------------

_etag_counter = itertools.count(1)


@dataclass
class Resource:
    """State-machine fields shared by volumes and snapshots."""

    uuid: str
    project: str
    name: str
    size: int
    path: str  # backing file
    state: str = CREATING
    etag: str = ""
    creation_time: str = field(default_factory=utc_now_iso)
    # Pending transition: `next_state` at monotonic time `due` (None = never, i.e. stuck).
    next_state: str | None = None
    due: float | None = None
    gone: bool = False  # Deleting finished: the reconciler removes the record and the file

    @property
    def stuck(self) -> bool:
        """A transition is pending but will never happen (an injected "stuck" fault)."""
        return self.next_state is not None and self.due is None

    def bump(self) -> None:
        """A new ETag after every change (globally unique, so a recreated name never reuses one)."""
        self.etag = str(next(_etag_counter))

    def schedule(self, state: str, next_state: str | None, delay: float | None) -> None:
        """Enter `state`; move to `next_state` after `delay` s (None delay = stuck forever)."""
        self.state = state
        self.next_state = next_state
        self.due = None if delay is None or next_state is None else time.monotonic() + delay
        self.bump()


@dataclass
class Volume(Resource):
    nsid: int = 0
    acl: list[str] = field(default_factory=lambda: ["ALLOW_NONE"])
    ip_acl: list[str] = field(default_factory=lambda: ["ALLOW_ANY"])
    replica_count: int = 3
    compression: str = "False"
    qos_policy_uuid: str | None = None
    labels: list[dict[str, str]] = field(default_factory=list)
    source_snapshot_uuid: str | None = None
    source_snapshot_name: str | None = None
    write_seq: int = 0  # number of /sim writes applied so far
    # (seq, offset, length) of every change to the data since creation: /sim writes, rollbacks
    # (the whole volume); what the changed-blocks diff answers from. Writes through the loop
    # device bypass it (and the point-in-time lock), as documented.
    write_log: list[tuple[int, int, int]] = field(default_factory=list)
    loop: str | None = None  # /dev/loopN while attached
    link: str | None = None  # by-id symlink while attached

    def to_json(self) -> dict[str, Any]:
        return {
            "UUID": self.uuid,
            "name": self.name,
            "projectName": self.project,
            "nsid": self.nsid,
            "size": str(self.size),
            "state": self.state,
            "acl": {"values": list(self.acl)},
            "IPAcl": {"values": list(self.ip_acl)},
            "replicaCount": self.replica_count,
            "compression": self.compression,
            "qosPolicyUUID": self.qos_policy_uuid,
            "labels": [dict(label) for label in self.labels],
            "sourceSnapshotUUID": self.source_snapshot_uuid,
            "sourceSnapshotName": self.source_snapshot_name,
            "creationTime": self.creation_time,
            "statistics": {"logicalUsedStorage": str(allocated_bytes(self.path)),
                           "physicalUsedStorage": str(allocated_bytes(self.path))},
            "ETag": self.etag,
        }

    def sim_json(self) -> dict[str, Any]:
        """to_json plus the simulator's internals, for /sim/state."""
        return {**self.to_json(), "sim": {"file": self.path, "loop": self.loop, "link": self.link,
                                          "writeSeq": self.write_seq, "nextState": self.next_state,
                                          "stuck": self.stuck}}


@dataclass
class Snapshot(Resource):
    source_volume_uuid: str = ""
    source_volume_name: str = ""
    source_write_seq: int = 0  # the source's write_seq when the snapshot was taken
    # The source's write log up to source_write_seq, and a creation counter ("newer" for diff).
    write_log: list[tuple[int, int, int]] = field(default_factory=list)
    created_index: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "UUID": self.uuid,
            "name": self.name,
            "projectName": self.project,
            "state": self.state,
            "sourceVolumeUUID": self.source_volume_uuid,
            "sourceVolumeName": self.source_volume_name,
            "size": str(self.size),
            "creationTime": self.creation_time,
            "ETag": self.etag,
        }

    def sim_json(self) -> dict[str, Any]:
        return {**self.to_json(), "sim": {"file": self.path, "nextState": self.next_state,
                                          "sourceWriteSeq": self.source_write_seq,
                                          "stuck": self.stuck}}


def allocated_bytes(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


# ------------------------------------------------------------------------------------------------
# Fault injection
# ------------------------------------------------------------------------------------------------

FAULT_KINDS = {
    "error",        # answer `status` without doing anything
    "error_after",  # do the operation, then answer `status` (the client never sees the result)
    "stuck",        # a create stays Creating / a delete stays Deleting forever
    "fail",         # a create ends in state Failed instead of Available
    "delay",        # sleep `seconds`, then handle normally (for client timeouts)
    "down",         # do the operation, lose the reply, and the API node stops answering
}
KIND_METHODS = {"stuck": ("POST", "DELETE"), "fail": ("POST",)}  # the only requests they affect


@dataclass
class Fault:
    id: int
    kind: str
    method: str | None  # None = any method
    path: re.Pattern[str]  # re.search against the request target (path + query)
    body: re.Pattern[str] | None  # re.search against the raw request body
    clone: bool  # only volume creates with a source snapshot
    status: int
    count: int  # remaining matches; -1 = unlimited
    seconds: float
    node: int | None = None  # kind "down": the API node to take down (default: the one asked)
    hits: int = 0

    @staticmethod
    def from_json(fault_id: int, spec: dict[str, Any]) -> Fault:
        kind = spec.get("kind", "error")
        if kind not in FAULT_KINDS:
            raise ApiError(400, f"unknown fault kind {kind!r}; one of {sorted(FAULT_KINDS)}")
        try:
            return Fault(
                id=fault_id, kind=kind,
                method=(spec["method"].upper() if spec.get("method") else None),
                path=re.compile(spec.get("path", "")),
                body=re.compile(spec["body"]) if spec.get("body") else None,
                clone=bool(spec.get("clone", False)),
                status=int(spec.get("status", 503 if kind == "error" else 500)),
                count=int(spec.get("count", 1)),
                seconds=float(spec.get("seconds", 0.0)),
                node=(int(spec["node"]) if spec.get("node") is not None else None))
        except (re.error, ValueError, TypeError, AttributeError) as e:
            raise ApiError(400, f"invalid fault {spec!r}: {e}") from e

    def matches(self, method: str, target: str, body: bytes) -> bool:
        if self.count == 0 or (self.method and self.method != method):
            return False
        if method not in KIND_METHODS.get(self.kind, (method,)):
            return False  # e.g. a "stuck" rule is not used up by the GETs that poll
        if not self.path.search(target):
            return False
        text = body.decode("utf-8", "replace")
        if self.body and not self.body.search(text):
            return False
        if self.clone:
            try:
                parsed = json.loads(text or "{}")
            except json.JSONDecodeError:
                return False
            if not isinstance(parsed, dict) or not (parsed.get("sourceSnapshotUUID")
                                                    or parsed.get("sourceSnapshotName")):
                return False
        return True

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "method": self.method,
                "path": self.path.pattern, "body": self.body.pattern if self.body else None,
                "clone": self.clone, "status": self.status, "count": self.count,
                "seconds": self.seconds, "node": self.node, "hits": self.hits}


class FaultBook:
    """Ordered fault rules; the first rule that matches a request is consumed."""

    def __init__(self) -> None:
        self.faults: list[Fault] = []
        self.ids = itertools.count(1)

    def add(self, spec: dict[str, Any]) -> Fault:
        fault = Fault.from_json(next(self.ids), spec)
        self.faults.append(fault)
        return fault

    def take(self, method: str, target: str, body: bytes) -> Fault | None:
        for fault in self.faults:
            if fault.matches(method, target, body):
                fault.hits += 1
                if fault.count > 0:
                    fault.count -= 1
                return fault
        return None

    def clear(self) -> None:
        self.faults.clear()


# ------------------------------------------------------------------------------------------------
# Discovery-client files and loop devices (the NVMe/TCP stand-in)
# ------------------------------------------------------------------------------------------------

# Short and long `nvme connect`-style options accepted in discovery-client lines.
DSC_OPTIONS = {"-t": "transport", "--transport": "transport", "-a": "traddr", "--traddr": "traddr",
               "-s": "trsvcid", "--trsvcid": "trsvcid", "-q": "hostnqn", "--hostnqn": "hostnqn",
               "-n": "nqn", "--nqn": "nqn"}


def parse_dsc_line(line: str) -> dict[str, str]:
    """`-t tcp -a <ip> -s 8009 -q <hostnqn> -n <subsysnqn>` → {transport, traddr, ...}."""
    words = shlex.split(line)
    fields: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if "=" in word and word.split("=", 1)[0] in DSC_OPTIONS:
            key, value = word.split("=", 1)
            fields[DSC_OPTIONS[key]] = value
            i += 1
        elif word in DSC_OPTIONS and i + 1 < len(words):
            fields[DSC_OPTIONS[word]] = words[i + 1]
            i += 2
        else:
            raise ValueError(f"unexpected word {word!r}")
    return fields


@dataclass
class Attachment:
    volume_uuid: str
    file: str
    loop: str
    link: str
    size: int


class Attacher:
    """Plays discovery-client + kernel: discovery files + ACL → loop devices + by-id links.

    Callers hold `lock` (the reconciler tick, /sim/reset, shutdown), so losetup calls are
    serialised. Loop devices are only ever detached if their backing file is the
    one this simulator attached.
    """

    def __init__(self, discovery_dir: str | None, by_id_dir: str, sysfs_dir: str | None,
                 subsystem_nqn: str, node_ips: set[str], discovery_port: int,
                 nvme_class_dir: str | None = None) -> None:
        self.discovery_dir = discovery_dir
        self.by_id_dir = by_id_dir
        self.sysfs_dir = sysfs_dir
        self.nvme_class_dir = nvme_class_dir
        # host NQN → controller instance number, and what each controller dir holds now
        self.controller_of: dict[str, int] = {}
        self.controllers: dict[int, tuple[str, frozenset[tuple[str, int]]]] = {}
        self.subsystem_nqn = subsystem_nqn
        self.node_ips = node_ips
        self.discovery_port = discovery_port
        self.attached: dict[str, Attachment] = {}
        self.lock = threading.Lock()
        self.report: dict[str, Any] = {"files": {}, "hostNQNs": []}  # for /sim/state

    # -- discovery files -------------------------------------------------------------------------

    def scan(self) -> set[str]:
        """Host NQNs that some valid discovery file connects to this cluster's subsystem."""
        files: dict[str, Any] = {}
        hosts: set[str] = set()
        if self.discovery_dir and os.path.isdir(self.discovery_dir):
            for name in sorted(os.listdir(self.discovery_dir)):
                if not name.endswith(".conf"):
                    continue
                try:
                    with open(os.path.join(self.discovery_dir, name)) as f:
                        text = f.read()
                except OSError:
                    continue  # removed between listdir and open
                files[name] = self.check_file(text)
                hosts.update(files[name]["hostNQNs"])
        self.report = {"files": files, "hostNQNs": sorted(hosts)}
        return hosts

    def check_file(self, text: str) -> dict[str, Any]:
        """Validate each entry line; report accepted host NQNs and why other lines were ignored."""
        hosts: list[str] = []
        ignored: list[dict[str, str]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            problem = self.check_line(line)
            if problem:
                ignored.append({"line": line, "reason": problem})
            else:
                hosts.append(parse_dsc_line(line)["hostnqn"])
        return {"hostNQNs": sorted(set(hosts)), "ignoredLines": ignored}

    def check_line(self, line: str) -> str | None:
        """None if the line would let discovery-client connect to us, else the reason why not."""
        try:
            entry = parse_dsc_line(line)
        except ValueError as e:
            return str(e)
        required = ("transport", "traddr", "trsvcid", "hostnqn", "nqn")
        missing = [k for k in required if k not in entry]
        if missing:
            return f"missing {', '.join(missing)}"
        if entry["transport"] != "tcp":
            return f"transport {entry['transport']!r} is not tcp"
        if entry["traddr"].strip("[]") not in self.node_ips:
            return f"address {entry['traddr']} is not a node of this cluster"
        if entry["trsvcid"] != str(self.discovery_port):
            return f"port {entry['trsvcid']} is not the discovery port {self.discovery_port}"
        if entry["nqn"] != self.subsystem_nqn:
            return "subsystem NQN is not this cluster's"
        return None

    # -- loop devices ----------------------------------------------------------------------------

    def reconcile(self, desired: dict[str, tuple[str, int]]) -> None:
        """Make the attached set equal `desired` (uuid → (file, size)). Caller holds lock."""
        for vol_uuid in list(self.attached):
            if vol_uuid not in desired or desired[vol_uuid][0] != self.attached[vol_uuid].file:
                self.detach(vol_uuid)
        for vol_uuid, (path, size) in desired.items():
            if vol_uuid not in self.attached:
                self.attach(vol_uuid, path, size)
            elif self.attached[vol_uuid].size != size:
                self.resize(self.attached[vol_uuid], size)

    def attach(self, vol_uuid: str, path: str, size: int) -> None:
        loop = losetup_attach(path)
        if loop is None:
            return
        link = os.path.join(self.by_id_dir, f"nvme-uuid.{vol_uuid}")
        os.makedirs(self.by_id_dir, exist_ok=True)
        tmp = f"{link}.tmp-{os.getpid()}"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(loop, tmp)
        os.replace(tmp, link)  # atomic: a reader never sees a half-made link
        self.write_sysfs(loop, vol_uuid, size)
        self.attached[vol_uuid] = Attachment(vol_uuid, path, loop, link, size)
        log(f"attached volume {vol_uuid} as {loop} ({link})")

    def detach(self, vol_uuid: str) -> bool:
        """Remove the link, then detach the loop device. True when nothing is left attached."""
        att = self.attached.get(vol_uuid)
        if att is None:
            return True
        if os.path.islink(att.link) and os.readlink(att.link) == att.loop:
            os.unlink(att.link)
        self.remove_sysfs(att.loop)
        if not losetup_detach(att.loop, att.file):
            return False
        del self.attached[vol_uuid]
        log(f"detached volume {vol_uuid} from {att.loop}")
        return True

    def detach_all(self) -> None:
        """Caller holds lock."""
        self.remove_controllers()
        for vol_uuid in list(self.attached):
            self.detach(vol_uuid)

    def resize(self, att: Attachment, size: int) -> None:
        subprocess.run(["losetup", "--set-capacity", att.loop], capture_output=True)
        att.size = size
        self.write_sysfs(att.loop, att.volume_uuid, size)

    def loop_of(self, vol_uuid: str) -> Attachment | None:
        return self.attached.get(vol_uuid)

    # -- optional fake sysfs (`<dir>/<loopN>/wwid` = "uuid.<uuid>", `size` in 512-byte sectors) --

    def write_sysfs(self, loop: str, vol_uuid: str, size: int) -> None:
        if not self.sysfs_dir:
            return
        directory = os.path.join(self.sysfs_dir, os.path.basename(loop))
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "wwid"), "w") as f:
            f.write(f"uuid.{vol_uuid}\n")
        with open(os.path.join(directory, "size"), "w") as f:
            f.write(f"{size // 512}\n")

    def remove_sysfs(self, loop: str) -> None:
        if self.sysfs_dir:
            shutil.rmtree(os.path.join(self.sysfs_dir, os.path.basename(loop)), ignore_errors=True)

    # -- optional fake NVMe controllers (`<dir>/nvme<K>/…`, the kernel's /sys/class/nvme) ---------

    def reconcile_controllers(self, hosts: set[str], admitted: dict[str, tuple[int, list[str]]]
                              ) -> None:
        """One controller of this cluster's subsystem per connected host NQN, exposing one
        namespace per attached volume whose ACL admits that host (`admitted`: uuid → (nsid,
        acl)). Caller holds lock."""
        if not self.nvme_class_dir:
            return
        for host in sorted(hosts):
            if host not in self.controller_of:
                used = set(self.controller_of.values())
                self.controller_of[host] = next(k for k in itertools.count() if k not in used)
        for host in [h for h in self.controller_of if h not in hosts]:
            del self.controller_of[host]
        desired: dict[int, tuple[str, frozenset[tuple[str, int]]]] = {}
        for host, k in self.controller_of.items():
            namespaces = frozenset((vol_uuid, admitted[vol_uuid][0]) for vol_uuid in self.attached
                                   if vol_uuid in admitted
                                   and acl_admits(admitted[vol_uuid][1], {host}))
            desired[k] = (host, namespaces)
        for k in [k for k in self.controllers if k not in desired]:
            shutil.rmtree(os.path.join(self.nvme_class_dir, f"nvme{k}"), ignore_errors=True)
            del self.controllers[k]
            log(f"controller nvme{k} removed")
        for k, (host, namespaces) in desired.items():
            if self.controllers.get(k) == (host, namespaces):
                continue
            self.write_controller(k, host, namespaces)
            self.controllers[k] = (host, namespaces)

    def write_controller(self, k: int, host: str, namespaces: frozenset[tuple[str, int]]) -> None:
        directory = os.path.join(self.nvme_class_dir or "", f"nvme{k}")
        os.makedirs(directory, exist_ok=True)
        for name, value in (("subsysnqn", self.subsystem_nqn), ("hostnqn", host),
                            ("transport", "tcp"), ("state", "live")):
            with open(os.path.join(directory, name), "w") as f:
                f.write(f"{value}\n")
        wanted = {f"nvme{k}n{nsid}": vol_uuid for vol_uuid, nsid in namespaces}
        for name in os.listdir(directory):
            if re.fullmatch(r"nvme\d+n\d+", name) and name not in wanted:
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        for name, vol_uuid in wanted.items():
            ns_dir = os.path.join(directory, name)
            os.makedirs(ns_dir, exist_ok=True)
            nsid = name.rsplit("n", 1)[1]
            for file_name, value in (("wwid", f"uuid.{vol_uuid}"), ("uuid", vol_uuid),
                                     ("nsid", nsid)):
                with open(os.path.join(ns_dir, file_name), "w") as f:
                    f.write(f"{value}\n")
        log(f"controller nvme{k} (host {host}) exposes {sorted(wanted)}")

    def remove_controllers(self) -> None:
        """Caller holds lock."""
        self.reconcile_controllers(set(), {})

    def remove_stale_controllers(self) -> None:
        """At start: controller dirs a killed simulator left in its own fake class dir."""
        if self.nvme_class_dir and os.path.isdir(self.nvme_class_dir):
            for name in os.listdir(self.nvme_class_dir):
                if re.fullmatch(r"nvme\d+", name):
                    shutil.rmtree(os.path.join(self.nvme_class_dir, name), ignore_errors=True)


def loop_backing_file(loop: str) -> str | None:
    """The backing file of /dev/loopN per sysfs (without a " (deleted)" suffix), or None."""
    try:
        with open(f"/sys/block/{os.path.basename(loop)}/loop/backing_file") as f:
            return f.read().strip().removesuffix(" (deleted)")
    except OSError:
        return None


def losetup_attach(path: str) -> str | None:
    """`losetup --find --show --direct-io=on FILE`, falling back to buffered IO."""
    for extra in (["--direct-io=on"], []):
        result = subprocess.run(["losetup", "--find", "--show", *extra, path],
                                capture_output=True, text=True)
        if result.returncode == 0:
            return result.stdout.strip()
    log(f"losetup of {path} failed: {result.stderr.strip()}")
    return None


def losetup_detach(loop: str, expected_file: str) -> bool:
    """Detach `loop` only if it is still backed by `expected_file` (never someone else's device)."""
    backing = loop_backing_file(loop)
    if backing is None:
        return True  # already gone
    if os.path.realpath(backing) != os.path.realpath(expected_file):
        log(f"not detaching {loop}: backed by {backing}, not our {expected_file}")
        return True
    result = subprocess.run(["losetup", "-d", loop], capture_output=True, text=True)
    if result.returncode != 0:
        log(f"losetup -d {loop} failed: {result.stderr.strip()}")
        return False
    return True


def detach_stale_loops(state_dir: str, by_id_dir: str) -> None:
    """After a kill -9 of an earlier run: detach loop devices backed by files in our state dir."""
    root = os.path.realpath(state_dir) + os.sep
    stale: set[str] = set()
    for entry in sorted(os.listdir("/sys/block")):
        if not entry.startswith("loop"):
            continue
        backing = loop_backing_file(entry)
        if backing and os.path.realpath(backing).startswith(root):
            if losetup_detach(f"/dev/{entry}", backing):
                stale.add(f"/dev/{entry}")
                log(f"detached stale /dev/{entry} ({backing})")
    if os.path.isdir(by_id_dir):
        for name in os.listdir(by_id_dir):
            link = os.path.join(by_id_dir, name)
            if name.startswith("nvme-uuid.") and os.path.islink(link):
                if os.readlink(link) in stale:
                    os.unlink(link)



# ------------------------------------------------------------------------------------------------
# Changed blocks between two snapshots (reference B.8)
# ------------------------------------------------------------------------------------------------

DIFF_ALIGN_LBAS = 64  # offsetLBA is "aligned to 64 and rounded down" (B.8)


@dataclass
class DiffSettings:
    """How GET .../snapshots/diff/{uuid} answers; set by flags and POST /sim/diff."""

    page_size: int = 10000  # ranges per answer at most (the CLI's page; B.8)
    unsupported: int | None = None  # 404 or 501: answer like a cluster without the call
    lba_bytes: int = 512  # the LBA unit: the attached loop device's logical block size
    int64: str = "string"  # "string" (proto3 JSON), "number", or "mixed" (alternating)
    # LBA ranges [start, end] (inclusive) left out of every answer: a lying cluster, for
    # testing the client's sampling check.
    hide: list[tuple[int, int]] = field(default_factory=list)
    calls: int = 0  # answered diff calls (every page counts)

    def to_json(self) -> dict[str, Any]:
        return {"pageSize": self.page_size, "unsupported": self.unsupported,
                "lbaBytes": self.lba_bytes, "int64": self.int64,
                "hide": [list(r) for r in self.hide], "calls": self.calls}

    def update(self, body: dict[str, Any]) -> None:
        try:
            if "pageSize" in body:
                page = int(body["pageSize"])
                if page < 1:
                    raise ValueError("pageSize must be at least 1")
                self.page_size = page
            if "unsupported" in body:
                value = body["unsupported"]
                if value not in (None, 404, 501):
                    raise ValueError("unsupported is null, 404 or 501")
                self.unsupported = value
            if "int64" in body:
                if body["int64"] not in ("string", "number", "mixed"):
                    raise ValueError("int64 is string, number or mixed")
                self.int64 = body["int64"]
            if "hide" in body:
                self.hide = [(int(a), int(b)) for a, b in body["hide"]]
        except (TypeError, ValueError) as e:
            raise ApiError(400, f"bad diff settings: {e}") from e


def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged inclusive intervals (adjacent ones joined)."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def subtract_intervals(intervals: list[tuple[int, int]],
                       holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = intervals
    for hole_start, hole_end in holes:
        cut: list[tuple[int, int]] = []
        for start, end in out:
            if end < hole_start or start > hole_end:
                cut.append((start, end))
                continue
            if start < hole_start:
                cut.append((start, hole_start - 1))
            if end > hole_end:
                cut.append((hole_end + 1, end))
        out = cut
    return out


def changed_lbas(target: Snapshot, base: Snapshot | None, lba_bytes: int) -> list[tuple[int, int]]:
    """Inclusive LBA intervals of `target` written after `base` (all of it without a base)."""
    last_lba = target.size // lba_bytes - 1
    if base is None:
        return [(0, last_lba)] if last_lba >= 0 else []
    touched = [(offset // lba_bytes, (offset + length - 1) // lba_bytes)
               for seq, offset, length in target.write_log
               if base.source_write_seq < seq <= target.source_write_seq and length > 0]
    return [(s, min(e, last_lba)) for s, e in merge_intervals(touched) if s <= last_lba]


def bitmap_b64(start: int, end: int, written: list[tuple[int, int]]) -> str:
    """One bit per LBA of [start, end], least significant bit first, set where written."""
    count = end - start + 1
    bits = bytearray((count + 7) // 8)
    for w_start, w_end in written:
        for lba in range(max(w_start, start), min(w_end, end) + 1):
            bits[(lba - start) // 8] |= 1 << ((lba - start) % 8)
    return base64.b64encode(bytes(bits)).decode()


def diff_ranges(intervals: list[tuple[int, int]]) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Written intervals grouped into ranges by 64-LBA window: (lbaStart, lbaEnd, written)."""
    ranges: list[tuple[int, int, list[tuple[int, int]]]] = []
    for start, end in intervals:
        window_start = start - start % DIFF_ALIGN_LBAS
        if ranges and ranges[-1][1] // DIFF_ALIGN_LBAS >= window_start // DIFF_ALIGN_LBAS:
            first, _, written = ranges[-1]
            ranges[-1] = (first, end, written + [(start, end)])
        else:
            ranges.append((start, end, [(start, end)]))
    return ranges

# ------------------------------------------------------------------------------------------------
# The simulated cluster
# ------------------------------------------------------------------------------------------------

@dataclass
class Config:
    state_dir: str
    token_file: str
    token_projects: set[str] | None  # None = the token is valid for every project
    create_delay: float
    delete_delay: float
    snapshot_delay: float
    cluster_uuid: str
    subsystem_nqn: str
    node_endpoints: list[str]
    discovery_port: int
    diff_page_size: int = 10000
    diff_unsupported: int | None = None
    lba_bytes: int = 512


class Cluster:
    """All state, guarded by `lock`. File data of volumes is guarded by `data_lock`.

    Lock order: attacher.lock, then data_lock, then lock.
    """

    def __init__(self, config: Config, attacher: Attacher) -> None:
        self.config = config
        self.attacher = attacher
        self.lock = threading.RLock()
        self.data_lock = threading.Lock()
        self.volumes: dict[str, Volume] = {}
        self.snapshots: dict[str, Snapshot] = {}
        self.deleted: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_HISTORY)
        self.requests: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_HISTORY)
        self.faults = FaultBook()
        self.nsids = itertools.count(1)
        self.snapshot_counter = itertools.count(1)
        self.diff = DiffSettings(page_size=config.diff_page_size,
                                 unsupported=config.diff_unsupported, lba_bytes=config.lba_bytes)
        # API nodes: one listening port each; "up", "down" (connections dropped unanswered) or
        # "hang" (requests held unanswered). Ports are filled in by main().
        self.api_nodes: list[dict[str, Any]] = []
        self.stopping = threading.Event()
        self.nodes = [{"UUID": str(uuidlib.uuid5(uuidlib.UUID(config.cluster_uuid), f"node-{i}")),
                       "name": f"node{i}", "nvmeEndpoint": endpoint, "state": "Active"}
                      for i, endpoint in enumerate(config.node_endpoints)]
        for sub in ("volumes", "snapshots"):
            os.makedirs(os.path.join(config.state_dir, sub), exist_ok=True)

    # -- auth --------------------------------------------------------------------------------------

    def check_auth(self, header: str | None, project: str | None) -> str:
        """'ok', or raise 401 (missing/wrong token) / 403 (token not scoped to `project`)."""
        with open(self.config.token_file) as f:
            token = f.read().strip()
        if not header or not header.startswith("Bearer "):
            raise ApiError(401, "missing bearer token")
        if header[len("Bearer "):].strip() != token:
            raise ApiError(401, "invalid token")
        scope = self.config.token_projects
        if project is not None and scope is not None and project not in scope:
            raise ApiError(403, f"token has no access to project {project!r}")
        return "ok"

    # -- lookups ---------------------------------------------------------------------------------

    def volume(self, project: str, vol_uuid: str) -> Volume:
        vol = self.volumes.get(vol_uuid)
        if vol is None or vol.project != project or vol.gone:
            raise ApiError(404, f"volume {vol_uuid} not found in project {project}")
        return vol

    def volume_by_name(self, project: str, name: str) -> Volume:
        for vol in self.volumes.values():
            if vol.project == project and vol.name == name and not vol.gone:
                return vol
        raise ApiError(404, f"volume named {name!r} not found in project {project}")

    def snapshot(self, project: str, snap_uuid: str) -> Snapshot:
        snap = self.snapshots.get(snap_uuid)
        if snap is None or snap.project != project or snap.gone:
            raise ApiError(404, f"snapshot {snap_uuid} not found in project {project}")
        return snap

    def snapshot_by_name(self, project: str, name: str) -> Snapshot:
        for snap in self.snapshots.values():
            if snap.project == project and snap.name == name and not snap.gone:
                return snap
        raise ApiError(404, f"snapshot named {name!r} not found in project {project}")

    # -- volumes ---------------------------------------------------------------------------------

    def create_volume(self, project: str, body: dict[str, Any], fault: Fault | None,
                      from_file: str | None = None, immediate: bool = False) -> Volume:
        """Reserve the name, copy the data outside the state lock, then start Creating."""
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "name is required")
        acl = acl_values(body, "acl")
        ip_acl = acl_values(body, "IPAcl")
        with self.lock:
            if any(v.project == project and v.name == name and not v.gone
                   for v in self.volumes.values()):
                raise ApiError(409, f"volume named {name!r} already exists in project {project}")
            source = self.clone_source(project, body)
            size = self.volume_size(body, source, from_file)
            vol_uuid = str(uuidlib.uuid4())
            vol = Volume(
                uuid=vol_uuid, project=project, name=name, size=size,
                path=os.path.join(self.config.state_dir, "volumes", f"{vol_uuid}.img"),
                nsid=next(self.nsids),
                acl=acl if acl is not None else ["ALLOW_NONE"],
                ip_acl=ip_acl if ip_acl is not None else ["ALLOW_ANY"],
                replica_count=parse_replicas(body.get("replicaCount")),
                compression=str(body.get("compression") or "False"),
                qos_policy_uuid=body.get("qosPolicyUUID"),
                labels=list(body.get("labels") or []),
                source_snapshot_uuid=source.uuid if source else None,
                source_snapshot_name=source.name if source else None)
            vol.bump()
            self.volumes[vol_uuid] = vol  # Creating, no transition yet: the name is taken
        self.fill(self.volumes, vol, source.path if source else from_file)
        with self.lock:
            if vol.uuid not in self.volumes:  # deleted and finalised while copying
                os.unlink(vol.path)
            elif vol.state == CREATING and vol.next_state is None:  # not deleted meanwhile
                self.start_create(vol, fault, immediate)
            return vol

    def fill(self, table: dict[str, Any], res: Resource, copy_from: str | None) -> None:
        """Create a reserved resource's backing file; on failure drop the reservation (500)."""
        try:
            self.materialise(res.path, res.size, copy_from)
        except ApiError:
            with self.lock:
                table.pop(res.uuid, None)
            raise

    def clone_source(self, project: str, body: dict[str, Any]) -> Snapshot | None:
        """The snapshot named by sourceSnapshotUUID / sourceSnapshotName; must be Available."""
        if body.get("sourceSnapshotUUID"):
            snap = self.snapshot(project, str(body["sourceSnapshotUUID"]))
        elif body.get("sourceSnapshotName"):
            snap = self.snapshot_by_name(project, str(body["sourceSnapshotName"]))
        else:
            return None
        if snap.state != AVAILABLE:
            raise ApiError(400, f"source snapshot {snap.uuid} is {snap.state}, not Available")
        return snap

    @staticmethod
    def volume_size(body: dict[str, Any], source: Snapshot | None, from_file: str | None) -> int:
        if body.get("size") is None:
            if source:
                return source.size
            if from_file:
                return -(-os.path.getsize(from_file) // BLOCK) * BLOCK or BLOCK
            raise ApiError(400, "size is required")
        size = parse_size(body["size"])
        if source and size < source.size:
            raise ApiError(400, f"size {size} is smaller than the snapshot's {source.size}")
        return size

    @staticmethod
    def materialise(path: str, size: int, copy_from: str | None) -> None:
        """Create the backing file: a CoW/sparse copy of `copy_from` or an empty sparse file."""
        try:
            if copy_from:
                copy_sparse(copy_from, path)
            with open(path, "ab") as f:
                f.truncate(size)
        except (OSError, subprocess.CalledProcessError) as e:
            raise ApiError(500, f"cannot create backing file: {e}") from e

    def start_create(self, res: Resource, fault: Fault | None, immediate: bool) -> None:
        """Creating → Available (or Failed / stuck, per fault) after the configured delay."""
        delay = self.config.create_delay if isinstance(res, Volume) else self.config.snapshot_delay
        if fault and fault.kind == "stuck":
            res.schedule(CREATING, AVAILABLE, None)
        elif fault and fault.kind == "fail":
            res.schedule(CREATING, FAILED, delay)
        elif immediate or delay <= 0:
            res.schedule(AVAILABLE, None, None)
        else:
            res.schedule(CREATING, AVAILABLE, delay)

    def update_volume(self, project: str, vol_uuid: str, body: dict[str, Any],
                      if_match: str | None) -> Volume:
        with self.lock:
            vol = self.volume(project, vol_uuid)
            if if_match is not None and strip_etag(if_match) not in ("*", vol.etag):
                raise ApiError(412, f"ETag mismatch: If-Match {if_match!r}, current {vol.etag!r}")
            if body.get("UUID") not in (None, vol.uuid):
                raise ApiError(400, "UUID in body does not match the path")
            if vol.state == DELETING:
                raise ApiError(400, f"volume {vol.uuid} is Deleting")
            acl = acl_values(body, "acl")
            ip_acl = acl_values(body, "IPAcl")
            size = parse_size(body["size"]) if body.get("size") is not None else None
            if size is not None and size < vol.size:
                raise ApiError(400, f"cannot shrink volume from {vol.size} to {size}")
            if size is not None and size != vol.size:
                with open(vol.path, "r+b") as f:
                    f.truncate(size)
                vol.size = size
            if acl is not None:
                vol.acl = acl
            if ip_acl is not None:
                vol.ip_acl = ip_acl
            if "qosPolicyUUID" in body:
                vol.qos_policy_uuid = body["qosPolicyUUID"]
            if isinstance(body.get("labels"), list):
                vol.labels = list(body["labels"])
            vol.bump()
            return vol

    def delete_volume(self, project: str, vol_uuid: str, fault: Fault | None) -> None:
        with self.lock:
            vol = self.volume(project, vol_uuid)
            if vol.state != DELETING:
                self.start_delete(vol, fault)

    def start_delete(self, res: Resource, fault: Fault | None) -> None:
        """Deleting → gone (404) after the delay; the reconciler detaches and removes the file."""
        if fault and fault.kind == "stuck":
            res.schedule(DELETING, "Deleted", None)
        else:
            res.schedule(DELETING, "Deleted", max(self.config.delete_delay, 0.0))

    def rollback_volume(self, project: str, vol_uuid: str, body: dict[str, Any]) -> Volume:
        """PUT .../volumes/{uuid}/rollback {"srcSnapshotUUID"}: volume data := snapshot data."""
        with self.data_lock, self.lock:
            vol = self.volume(project, vol_uuid)
            snap = self.snapshot(project, str(body.get("srcSnapshotUUID", "")))
            if snap.source_volume_uuid != vol.uuid:
                raise ApiError(400, f"snapshot {snap.uuid} is not a snapshot of volume {vol.uuid}")
            with open(snap.path, "rb") as src, open(vol.path, "r+b") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.truncate(max(snap.size, vol.size))
            vol.write_seq = max(vol.write_seq, snap.source_write_seq) + 1
            vol.write_log.append((vol.write_seq, 0, max(snap.size, vol.size)))
            vol.bump()
            return vol

    # -- snapshots -------------------------------------------------------------------------------

    def create_snapshot(self, project: str, body: dict[str, Any], fault: Fault | None) -> Snapshot:
        """Point-in-time copy taken under data_lock, so it is an exact prefix of the /sim writes."""
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "name is required")
        with self.data_lock:
            with self.lock:
                if any(s.project == project and s.name == name and not s.gone
                       for s in self.snapshots.values()):
                    raise ApiError(409, f"snapshot named {name!r} already exists "
                                        f"in project {project}")
                if body.get("sourceVolumeUUID"):
                    vol = self.volume(project, str(body["sourceVolumeUUID"]))
                elif body.get("sourceVolumeName"):
                    vol = self.volume_by_name(project, str(body["sourceVolumeName"]))
                else:
                    raise ApiError(400, "sourceVolumeUUID or sourceVolumeName is required")
                if vol.state not in (AVAILABLE, "Updating"):
                    raise ApiError(400, f"source volume {vol.uuid} is {vol.state}, not Available")
                snap_uuid = str(uuidlib.uuid4())
                snap = Snapshot(uuid=snap_uuid, project=project, name=name, size=vol.size,
                                path=os.path.join(self.config.state_dir, "snapshots",
                                                  f"{snap_uuid}.img"),
                                source_volume_uuid=vol.uuid, source_volume_name=vol.name,
                                source_write_seq=vol.write_seq, write_log=list(vol.write_log),
                                created_index=next(self.snapshot_counter))
                snap.bump()
                self.snapshots[snap_uuid] = snap  # Creating, no transition yet: the name is taken
                source_path = vol.path
            self.fill(self.snapshots, snap, source_path)
        with self.lock:
            if snap.uuid not in self.snapshots:  # deleted and finalised while copying
                os.unlink(snap.path)
            elif snap.state == CREATING and snap.next_state is None:  # not deleted meanwhile
                self.start_create(snap, fault, immediate=False)
            return snap

    def delete_snapshot(self, project: str, snap_uuid: str, fault: Fault | None) -> None:
        """Allowed even when clones exist (clone data is an independent copy here)."""
        with self.lock:
            snap = self.snapshot(project, snap_uuid)
            if snap.state != DELETING:
                self.start_delete(snap, fault)

    # -- /sim data access ------------------------------------------------------------------------

    def write(self, vol_uuid: str, offset: int, data: bytes) -> int:
        """Write at `offset` under data_lock; returns the write's sequence number (1-based)."""
        with self.data_lock:
            with self.lock:
                vol = self.any_volume(vol_uuid)
                if offset < 0 or offset + len(data) > vol.size:
                    raise ApiError(400, f"write [{offset}, {offset + len(data)}) "
                                        f"beyond size {vol.size}")
                path = vol.path
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
            with self.lock:
                vol.write_seq += 1
                vol.write_log.append((vol.write_seq, offset, len(data)))
                return vol.write_seq

    def read(self, kind: str, res_uuid: str, offset: int, length: int | None) -> bytes:
        with self.data_lock:
            with self.lock:
                res = self.any_resource(kind, res_uuid)
                path, size = res.path, res.size
            length = size - offset if length is None else length
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read(max(0, length))

    def any_resource(self, kind: str, res_uuid: str) -> Resource:
        """A volume ("volumes") or snapshot ("snapshots") of any project, for /sim."""
        return self.any_volume(res_uuid) if kind == "volumes" else self.any_snapshot(res_uuid)

    def any_volume(self, vol_uuid: str) -> Volume:
        vol = self.volumes.get(vol_uuid)
        if vol is None or vol.gone:
            raise ApiError(404, f"volume {vol_uuid} not found")
        return vol

    def any_snapshot(self, snap_uuid: str) -> Snapshot:
        snap = self.snapshots.get(snap_uuid)
        if snap is None or snap.gone:
            raise ApiError(404, f"snapshot {snap_uuid} not found")
        return snap

    def force_state(self, kind: str, res_uuid: str, state: str) -> Resource:
        """/sim: set a state directly (e.g. release a stuck clone); cancels a pending transition."""
        with self.lock:
            res = self.any_resource(kind, res_uuid)
            allowed = VOLUME_STATES if kind == "volumes" else SNAPSHOT_STATES
            if state not in allowed:
                raise ApiError(400, f"state must be one of {sorted(allowed)}")
            if state == DELETING:
                self.start_delete(res, None)
            else:
                res.schedule(state, None, None)
            return res

    # -- reconciler ------------------------------------------------------------------------------

    def tick(self) -> None:
        """Advance due transitions, reconcile attachments, then drop finished deletions."""
        now = time.monotonic()
        with self.lock:
            for res in itertools.chain(self.volumes.values(), self.snapshots.values()):
                if res.due is not None and now >= res.due and res.next_state:
                    if res.state == DELETING:
                        res.gone = True
                        res.due = None
                    else:
                        res.schedule(res.next_state, None, None)
        with self.attacher.lock:
            hosts = self.attacher.scan()
            with self.lock:
                desired = {v.uuid: (v.path, v.size) for v in self.volumes.values()
                           if v.state == AVAILABLE and not v.gone and acl_admits(v.acl, hosts)
                           and os.path.exists(v.path)}
                admitted = {v.uuid: (v.nsid, list(v.acl)) for v in self.volumes.values()
                            if v.uuid in desired}
            self.attacher.reconcile(desired)
            self.attacher.reconcile_controllers(hosts, admitted)
            with self.lock:
                for vol in self.volumes.values():
                    att = self.attacher.loop_of(vol.uuid)
                    vol.loop, vol.link = (att.loop, att.link) if att else (None, None)
                self.finalise_gone()

    def finalise_gone(self) -> None:
        """Remove records and files of resources whose deletion finished (volumes once detached)."""
        for table in (self.volumes, self.snapshots):
            for res_uuid, res in list(table.items()):
                if not res.gone or (isinstance(res, Volume) and res.loop):
                    continue
                res.state = "Deleted"
                self.deleted.append({**res.sim_json(), "deletedAt": utc_now_iso()})
                del table[res_uuid]
                try:
                    os.unlink(res.path)
                except FileNotFoundError:
                    pass

    def reset(self) -> None:
        """/sim/reset: drop every volume, snapshot, fault and log; detach everything."""
        with self.attacher.lock:
            self.attacher.detach_all()
            with self.data_lock, self.lock:
                for res in itertools.chain(self.volumes.values(), self.snapshots.values()):
                    try:
                        os.unlink(res.path)
                    except FileNotFoundError:
                        pass
                self.volumes.clear()
                self.snapshots.clear()
                self.deleted.clear()
                self.requests.clear()
                self.faults.clear()
                self.diff = DiffSettings(page_size=self.config.diff_page_size,
                                         unsupported=self.config.diff_unsupported,
                                         lba_bytes=self.config.lba_bytes)
                for node in self.api_nodes:
                    node["state"] = "up"

    def api_node(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.api_nodes):
            raise ApiError(404, f"no API node {index} (there are {len(self.api_nodes)})")
        return self.api_nodes[index]

    def set_api_node_state(self, index: int, state: str) -> dict[str, Any]:
        if state not in API_NODE_STATES:
            raise ApiError(400, f"state must be one of {sorted(API_NODE_STATES)}")
        with self.lock:
            node = self.api_node(index)
            node["state"] = state
        log(f"API node {index} (port {node['port']}) is {state}")
        return dict(node)

    def api_node_answers(self, index: int) -> bool:
        """False when node `index` must not answer: it is down, or it hangs (the caller is held
        until the node leaves "hang"; a request that hung is never processed)."""
        hung = False
        while not self.stopping.is_set():
            with self.lock:
                state = self.api_node(index)["state"]
            if state != "hang":
                return state == "up" and not hung
            hung = True
            time.sleep(TICK_SECONDS)
        return False

    def state_json(self) -> dict[str, Any]:
        with self.lock:
            return {
                "cluster": self.cluster_json(),
                "nodes": self.nodes,
                "apiNodes": [dict(node) for node in self.api_nodes],
                "volumes": [v.sim_json() for v in self.volumes.values()],
                "snapshots": [s.sim_json() for s in self.snapshots.values()],
                "deleted": list(self.deleted),
                "attachments": [{"volumeUUID": a.volume_uuid, "loop": a.loop, "link": a.link,
                                 "file": a.file} for a in self.attacher.attached.values()],
                "discovery": self.attacher.report,
                "faults": [f.to_json() for f in self.faults.faults],
            }

    def cluster_json(self) -> dict[str, Any]:
        total = 1 << 50
        used = sum(allocated_bytes(v.path) for v in self.volumes.values())
        return {"UUID": self.config.cluster_uuid, "subsystemNQN": self.config.subsystem_nqn,
                "currentMaxReplicas": 3, "supportedMaxReplicas": 3,
                "statistics": {"estimatedLogicalStorage": str(total),
                               "estimatedFreeLogicalStorage": str(total - used)}}


# ------------------------------------------------------------------------------------------------
# HTTP layer
# ------------------------------------------------------------------------------------------------

@dataclass
class Request:
    method: str
    target: str  # path + query, as received
    path: str
    query: dict[str, list[str]]
    body: bytes
    headers: Any
    params: dict[str, str] = field(default_factory=dict)  # route captures
    fault: Fault | None = None

    def json(self) -> dict[str, Any]:
        if not self.body.strip():
            return {}
        try:
            parsed = json.loads(self.body)
        except json.JSONDecodeError as e:
            raise ApiError(400, f"invalid JSON body: {e}") from e
        if not isinstance(parsed, dict):
            raise ApiError(400, "JSON body must be an object")
        return parsed

    def arg(self, *names: str) -> str | None:
        for name in names:
            if name in self.query:
                return self.query[name][0]
        return None


Reply = tuple[int, Any, dict[str, str]]
Handler = Callable[[Cluster, Request], Reply]


def ok(body: Any, etag: str | None = None) -> Reply:
    return 200, body, ({"ETag": etag} if etag else {})


def project_of(req: Request) -> str:
    """Project from the path, else ?projectName= (non-project path form), else "default"."""
    if "project" in req.params:
        return req.params["project"]
    return req.arg("projectName") or "default"


def body_project(req: Request, body: dict[str, Any]) -> str:
    """For creates: the path's project, else the body's "projectName", else ?projectName=."""
    if "project" in req.params:
        return req.params["project"]
    return str(body.get("projectName") or project_of(req))


# -- REST handlers -------------------------------------------------------------------------------

def h_cluster_info(cluster: Cluster, req: Request) -> Reply:
    return ok(cluster.cluster_json())


def h_nodes(cluster: Cluster, req: Request) -> Reply:
    return ok({"nodes": cluster.nodes})


def h_node(cluster: Cluster, req: Request) -> Reply:
    for node in cluster.nodes:
        if node["UUID"] == req.params["node"]:
            return ok(node)
    raise ApiError(404, f"node {req.params['node']} not found")


def h_list_volumes(cluster: Cluster, req: Request) -> Reply:
    """List, or with ?name= one volume object (reference: GET by name returns one volume)."""
    project = project_of(req)
    with cluster.lock:
        name = req.arg("name", "Name")
        if name is not None:
            vol = cluster.volume_by_name(project, name)
            return ok(vol.to_json(), vol.etag)
        vols = [v.to_json() for v in cluster.volumes.values()
                if v.project == project and not v.gone]
        return ok({"volumes": vols})


def h_create_volume(cluster: Cluster, req: Request) -> Reply:
    body = req.json()
    vol = cluster.create_volume(body_project(req, body), body, req.fault)
    with cluster.lock:
        return ok(vol.to_json(), vol.etag)


def h_get_volume(cluster: Cluster, req: Request) -> Reply:
    with cluster.lock:
        vol = cluster.volume(project_of(req), req.params["uuid"])
        return ok(vol.to_json(), vol.etag)


def h_update_volume(cluster: Cluster, req: Request) -> Reply:
    vol = cluster.update_volume(project_of(req), req.params["uuid"], req.json(),
                                req.headers.get("If-Match"))
    with cluster.lock:
        return ok(vol.to_json(), vol.etag)


def h_delete_volume(cluster: Cluster, req: Request) -> Reply:
    cluster.delete_volume(project_of(req), req.params["uuid"], req.fault)
    return ok({})


def h_rollback_volume(cluster: Cluster, req: Request) -> Reply:
    vol = cluster.rollback_volume(project_of(req), req.params["uuid"], req.json())
    with cluster.lock:
        return ok(vol.to_json(), vol.etag)


def h_list_snapshots(cluster: Cluster, req: Request) -> Reply:
    """List (optionally ?sourceVolumeUUID=), or with ?Name= / ?name= one snapshot object."""
    project = project_of(req)
    with cluster.lock:
        name = req.arg("Name", "name")
        if name is not None:
            snap = cluster.snapshot_by_name(project, name)
            return ok(snap.to_json(), snap.etag)
        source = req.arg("sourceVolumeUUID")
        snaps = [s.to_json() for s in cluster.snapshots.values()
                 if s.project == project and not s.gone
                 and (source is None or s.source_volume_uuid == source)]
        return ok({"snapshots": snaps})


def h_create_snapshot(cluster: Cluster, req: Request) -> Reply:
    body = req.json()
    snap = cluster.create_snapshot(body_project(req, body), body, req.fault)
    with cluster.lock:
        return ok(snap.to_json(), snap.etag)


def h_get_snapshot(cluster: Cluster, req: Request) -> Reply:
    with cluster.lock:
        snap = cluster.snapshot(project_of(req), req.params["uuid"])
        return ok(snap.to_json(), snap.etag)


def h_delete_snapshot(cluster: Cluster, req: Request) -> Reply:
    cluster.delete_snapshot(project_of(req), req.params["uuid"], req.fault)
    return ok({})


def h_snapshot_diff(cluster: Cluster, req: Request) -> Reply:
    """GET .../snapshots/diff/{uuid}?baseSnapshotUUID=&offsetLBA= (B.8): one page of the LBA
    ranges of the target that differ from the base, `nextOffsetLBA` 0 on the last page."""
    settings = cluster.diff
    if settings.unsupported is not None:
        raise ApiError(settings.unsupported, f"no route for {req.method} {req.path}")
    project = project_of(req)
    try:
        offset = int(req.arg("offsetLBA") or 0)
    except ValueError as e:
        raise ApiError(400, f"bad offsetLBA: {e}") from e
    offset -= offset % DIFF_ALIGN_LBAS
    with cluster.lock:
        if req.params["uuid"] == "" or req.arg("snapshotName"):
            target = cluster.snapshot_by_name(project, req.arg("snapshotName") or "")
        else:
            target = cluster.snapshot(project, req.params["uuid"])
        base = None
        if req.arg("baseSnapshotUUID"):
            base = cluster.snapshot(project, req.arg("baseSnapshotUUID") or "")
        elif req.arg("baseSnapshotName"):
            base = cluster.snapshot_by_name(project, req.arg("baseSnapshotName") or "")
        if base is not None:
            if base.uuid == target.uuid:
                raise ApiError(400, "snapshot and base snapshot are identical")
            if base.source_volume_uuid != target.source_volume_uuid:
                raise ApiError(400, "snapshots are not on the same chain")
            if base.created_index > target.created_index:
                raise ApiError(400, "the base snapshot is newer than the snapshot")
        lba_bytes = settings.lba_bytes
        if offset * lba_bytes >= max(target.size, 1) and offset > 0:
            raise ApiError(400, f"offsetLBA {offset} is beyond the snapshot size")
        intervals = subtract_intervals(changed_lbas(target, base, lba_bytes), settings.hide)
        ranges = [(s, e, w) for s, e, w in diff_ranges(intervals) if e >= offset]
        page = ranges[:settings.page_size]
        rest = ranges[settings.page_size:]
        # The next offset must make progress past this call's (aligned) offset.
        while rest and rest[0][0] - rest[0][0] % DIFF_ALIGN_LBAS <= offset:
            page.append(rest.pop(0))
        next_offset = rest[0][0] - rest[0][0] % DIFF_ALIGN_LBAS if rest else 0
        settings.calls += 1
        mixed = itertools.count()

        def number(value: int) -> Any:
            if settings.int64 == "number" or (settings.int64 == "mixed" and next(mixed) % 2):
                return value
            return str(value)

        body: dict[str, Any] = {"nextOffsetLBA": number(next_offset), "lbaRanges": [
            {"lbaStart": number(max(s, offset)), "lbaEnd": number(e),
             "dataBitMap": bitmap_b64(max(s, offset), e, w)} for s, e, w in page]}
        return ok(body)


def h_sim_diff_get(cluster: Cluster, req: Request) -> Reply:
    with cluster.lock:
        return ok(cluster.diff.to_json())


def h_sim_diff_set(cluster: Cluster, req: Request) -> Reply:
    """{"pageSize", "unsupported": null|404|501, "int64", "hide": [[startLBA, endLBA], ...]}."""
    body = req.json()
    with cluster.lock:
        cluster.diff.update(body)
        return ok(cluster.diff.to_json())


# -- /sim control handlers (no auth) -------------------------------------------------------------

def h_sim_state(cluster: Cluster, req: Request) -> Reply:
    return ok(cluster.state_json())


def h_sim_reset(cluster: Cluster, req: Request) -> Reply:
    cluster.reset()
    return ok({})


def h_sim_faults_get(cluster: Cluster, req: Request) -> Reply:
    with cluster.lock:
        return ok({"faults": [f.to_json() for f in cluster.faults.faults]})


def h_sim_faults_add(cluster: Cluster, req: Request) -> Reply:
    """Body: one fault object, a list of them, or {"faults": [...]}."""
    try:
        parsed = json.loads(req.body or b"{}")
    except json.JSONDecodeError as e:
        raise ApiError(400, f"invalid JSON body: {e}") from e
    specs = parsed.get("faults", [parsed]) if isinstance(parsed, dict) else parsed
    with cluster.lock:
        added = [cluster.faults.add(spec).to_json() for spec in specs]
    return ok({"faults": added})


def h_sim_faults_clear(cluster: Cluster, req: Request) -> Reply:
    with cluster.lock:
        cluster.faults.clear()
    return ok({})


def h_sim_requests(cluster: Cluster, req: Request) -> Reply:
    with cluster.lock:
        return ok({"requests": list(cluster.requests)})


def h_sim_create_volume(cluster: Cluster, req: Request) -> Reply:
    """{"project","name","size","from_file","acl":[..]} → an Available volume, no delay."""
    body = req.json()
    rest = {"name": body.get("name"), "size": body.get("size")}
    if body.get("acl") is not None:
        rest["acl"] = {"values": body["acl"]}
    from_file = body.get("from_file")
    if from_file and not os.path.isfile(from_file):
        raise ApiError(400, f"from_file {from_file} is not a file")
    vol = cluster.create_volume(body.get("project") or "default", rest, None,
                                from_file=from_file, immediate=True)
    with cluster.lock:
        return ok(vol.sim_json(), vol.etag)


def h_sim_write(cluster: Cluster, req: Request) -> Reply:
    body = req.json()
    try:
        data = base64.b64decode(body.get("data_b64", ""), validate=True)
        offset = int(body.get("offset", 0))
    except (ValueError, TypeError) as e:
        raise ApiError(400, f"bad write: {e}") from e
    seq = cluster.write(req.params["uuid"], offset, data)
    return ok({"seq": seq, "offset": offset, "length": len(data)})


def h_sim_read(cluster: Cluster, req: Request) -> Reply:
    """GET ?offset=&length= or POST {"offset","length"}; default: the whole file."""
    body = req.json() if req.method == "POST" else {}
    try:
        offset = int(body.get("offset", req.arg("offset") or 0))
        raw_length = body.get("length", req.arg("length"))
        length = None if raw_length is None else int(raw_length)
    except (ValueError, TypeError) as e:
        raise ApiError(400, f"bad read: {e}") from e
    data = cluster.read(req.params["kind"], req.params["uuid"], offset, length)
    return ok({"offset": offset, "length": len(data), "data_b64": base64.b64encode(data).decode(),
               "sha256": hashlib.sha256(data).hexdigest()})


def h_sim_sha256(cluster: Cluster, req: Request) -> Reply:
    with cluster.data_lock:
        with cluster.lock:
            kind, res_uuid = req.params["kind"], req.params["uuid"]
            res = cluster.any_resource(kind, res_uuid)
            path, size = res.path, res.size
        return ok({"UUID": res_uuid, "size": size, "sha256": sha256_file(path)})


def h_sim_api_nodes(cluster: Cluster, req: Request) -> Reply:
    with cluster.lock:
        return ok({"apiNodes": [dict(node) for node in cluster.api_nodes]})


def h_sim_api_node_set(cluster: Cluster, req: Request) -> Reply:
    """{"state": "up" | "down" | "hang"} for API node {index}."""
    try:
        index = int(req.params["index"])
    except ValueError as e:
        raise ApiError(400, f"bad API node index: {e}") from e
    return ok(cluster.set_api_node_state(index, str(req.json().get("state"))))


def h_sim_state_set(cluster: Cluster, req: Request) -> Reply:
    res = cluster.force_state(req.params["kind"], req.params["uuid"], str(req.json().get("state")))
    with cluster.lock:
        return ok(res.sim_json())


# -- routing -------------------------------------------------------------------------------------

P = r"(?P<project>[^/]+)"
U = r"(?P<uuid>[^/]+)"
K = r"(?P<kind>volumes|snapshots)"

ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", f"{API}/clusterinfo", h_cluster_info),
    ("GET", f"{API}/cluster", h_cluster_info),
    ("GET", f"{API}/nodes/?", h_nodes),
    ("GET", f"{API}/nodes/(?P<node>[^/]+)", h_node),
    ("GET", f"{API}/projects/{P}/volumes/?", h_list_volumes),
    ("POST", f"{API}/projects/{P}/volumes/?", h_create_volume),
    ("GET", f"{API}/projects/{P}/volumes/{U}", h_get_volume),
    ("PUT", f"{API}/projects/{P}/volumes/{U}", h_update_volume),
    ("DELETE", f"{API}/projects/{P}/volumes/{U}", h_delete_volume),
    ("PUT", f"{API}/projects/{P}/volumes/{U}/rollback", h_rollback_volume),
    ("GET", f"{API}/projects/{P}/snapshots/?", h_list_snapshots),
    ("POST", f"{API}/projects/{P}/snapshots/?", h_create_snapshot),
    ("GET", f"{API}/projects/{P}/snapshots/{U}", h_get_snapshot),
    ("DELETE", f"{API}/projects/{P}/snapshots/{U}", h_delete_snapshot),
    ("GET", f"{API}/projects/{P}/snapshots/diff/(?P<uuid>[^/]*)", h_snapshot_diff),
    # Non-project path form (pve-lightbits): ?projectName=<p>, POST body "projectName".
    ("GET", f"{API}/volumes/?", h_list_volumes),
    ("POST", f"{API}/volumes/?", h_create_volume),
    ("GET", f"{API}/volumes/{U}", h_get_volume),
    ("PUT", f"{API}/volumes/{U}", h_update_volume),
    ("DELETE", f"{API}/volumes/{U}", h_delete_volume),
    ("GET", f"{API}/snapshots/?", h_list_snapshots),
    ("POST", f"{API}/snapshots/?", h_create_snapshot),
    ("GET", f"{API}/snapshots/{U}", h_get_snapshot),
    ("DELETE", f"{API}/snapshots/{U}", h_delete_snapshot),
    # Control API.
    ("GET", "/sim/state", h_sim_state),
    ("POST", "/sim/reset", h_sim_reset),
    ("GET", "/sim/faults", h_sim_faults_get),
    ("POST", "/sim/faults", h_sim_faults_add),
    ("DELETE", "/sim/faults", h_sim_faults_clear),
    ("GET", "/sim/requests", h_sim_requests),
    ("POST", "/sim/volumes", h_sim_create_volume),
    ("POST", f"/sim/volumes/{U}/write", h_sim_write),
    ("GET", f"/sim/{K}/{U}/read", h_sim_read),
    ("POST", f"/sim/{K}/{U}/read", h_sim_read),
    ("GET", f"/sim/{K}/{U}/sha256", h_sim_sha256),
    ("POST", f"/sim/{K}/{U}/state", h_sim_state_set),
    ("GET", "/sim/api-nodes", h_sim_api_nodes),
    ("GET", "/sim/diff", h_sim_diff_get),
    ("POST", "/sim/diff", h_sim_diff_set),
    ("POST", "/sim/api-nodes/(?P<index>[0-9]+)", h_sim_api_node_set),
]
COMPILED = [(method, re.compile(pattern), handler) for method, pattern, handler in ROUTES]


def route(method: str, path: str) -> tuple[Handler, dict[str, str]]:
    """The handler for (method, path); 404 for unknown paths, 405 for a known path, wrong method."""
    path_known = False
    for route_method, pattern, handler in COMPILED:
        match = pattern.fullmatch(path)
        if match:
            if route_method == method:
                return handler, match.groupdict()
            path_known = True
    raise ApiError(405 if path_known else 404, f"no route for {method} {path}")


class SimHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every reply carries Content-Length
    server_version = "lightbits-sim/1"
    cluster: Cluster  # set on the class by serve()

    def do_GET(self) -> None:
        self.handle_any()

    def do_POST(self) -> None:
        self.handle_any()

    def do_PUT(self) -> None:
        self.handle_any()

    def do_DELETE(self) -> None:
        self.handle_any()

    def do_HEAD(self) -> None:
        self.handle_any()

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default access log: handle_any logs one line per request itself."""

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def handle_any(self) -> None:
        started = time.monotonic()
        body = self.read_body()  # always drain, so keep-alive stays in sync on errors
        split = urlsplit(self.path)
        req = Request(method=self.command, target=self.path, path=split.path,
                      query=parse_qs(split.query, keep_blank_values=True), body=body,
                      headers=self.headers)
        auth = "-"
        node = self.node_index()
        if req.path.startswith("/api/") and not self.cluster.api_node_answers(node):
            self.record(req, 0, auth, started)
            self.drop()
            return
        try:
            status, payload, headers, auth = self.dispatch(req)
        except DropConnection:
            self.record(req, 0, auth, started)
            self.drop()
            return
        except ApiError as e:
            status, payload, headers = e.status, error_body(e.status, e.message), {}
        except Exception as e:  # a simulator bug: answer 500 and say so in the log
            log(f"internal error on {req.method} {req.target}: {e!r}")
            status, payload, headers = 500, error_body(500, f"simulator error: {e}"), {}
        self.send(status, payload, headers)
        self.record(req, status, auth, started)

    def node_index(self) -> int:
        return int(getattr(self.server, "node_index", 0))

    def drop(self) -> None:
        """End the connection without an answer: the client sees it closed mid-request."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def dispatch(self, req: Request) -> tuple[int, Any, dict[str, str], str]:
        cluster = self.cluster
        handler, req.params = route(req.method if req.method != "HEAD" else "GET", req.path)
        if not req.path.startswith("/api/"):
            status, payload, headers = handler(cluster, req)
            return status, payload, headers, "-"
        auth = cluster.check_auth(self.headers.get("Authorization"), self.scoped_project(req))
        with cluster.lock:
            req.fault = cluster.faults.take(req.method, req.target, req.body)
        fault = req.fault
        if fault and fault.kind == "delay":
            time.sleep(fault.seconds)
        if fault and fault.kind == "error":
            raise ApiError(fault.status, f"injected fault #{fault.id}")
        status, payload, headers = handler(cluster, req)
        if fault and fault.kind == "error_after":
            raise ApiError(fault.status, f"injected fault #{fault.id} (after the operation)")
        if fault and fault.kind == "down":
            node = self.node_index() if fault.node is None else fault.node
            cluster.set_api_node_state(node, "down")
            raise DropConnection()
        return status, payload, headers, auth

    @staticmethod
    def scoped_project(req: Request) -> str | None:
        """The project a request touches (for 403 scoping), None for cluster-wide endpoints."""
        if "project" in req.params:
            return req.params["project"]
        if req.path.startswith((f"{API}/volumes", f"{API}/snapshots")):
            if req.method == "POST":
                try:
                    return str(req.json().get("projectName") or "default")
                except ApiError:
                    return "default"
            return req.arg("projectName") or "default"
        return None

    def send(self, status: int, payload: Any, headers: dict[str, str]) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def record(self, req: Request, status: int, auth: str, started: float) -> None:
        """Log one line (never the token) and keep the request for /sim/requests."""
        elapsed_ms = (time.monotonic() - started) * 1000
        fault = f" fault#{req.fault.id}" if req.fault else ""
        node = self.node_index()
        answer = status if status else "no answer"
        log(f"node{node} {req.method} {req.target} -> {answer} ({elapsed_ms:.1f} ms){fault}")
        if req.path.startswith("/api/"):
            with self.cluster.lock:
                self.cluster.requests.append({
                    "time": utc_now_iso(), "method": req.method, "target": req.target,
                    "status": status, "ifMatch": req.headers.get("If-Match"),
                    "fault": req.fault.id if req.fault else None, "node": node})


class SimServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def finish_request(self, request: Any, client_address: Any) -> None:
        """TLS handshake in the worker thread, so a slow client cannot stall accept()."""
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(10)
            request.do_handshake()
            request.settimeout(None)
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log(f"connection error from {client_address[0]}: {sys.exc_info()[1]!r}")


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Lightbits (LightOS) REST API v2 + NVMe/TCP attach "
                                            "simulator for tests. See scripts/lightbits-sim.md.")
    p.add_argument("--port", type=int, default=0,
                   help="TCP port on 127.0.0.1 (0 = pick a free one)")
    p.add_argument("--port-file", help="write the chosen port here (atomically) once listening")
    p.add_argument("--tls-cert", help="PEM certificate: serve HTTPS instead of HTTP")
    p.add_argument("--tls-key", help="PEM private key for --tls-cert")
    p.add_argument("--token-file", required=True,
                   help="file holding the valid JWT (re-read per request)")
    p.add_argument("--token-projects", help="comma-separated projects the token may use "
                                            "(others answer 403); default: all")
    p.add_argument("--state-dir", help="directory for volume/snapshot files (default: a temp dir, "
                                       "removed at exit)")
    p.add_argument("--create-delay", type=float, default=0.5, help="seconds in Creating (volumes)")
    p.add_argument("--snapshot-delay", type=float, default=None,
                   help="seconds in Creating (snapshots); default: --create-delay")
    p.add_argument("--delete-delay", type=float, default=0.5, help="seconds in Deleting before 404")
    p.add_argument("--discovery-dir", help="watch this directory for discovery-client *.conf files")
    p.add_argument("--by-id-dir", help="where nvme-uuid.<uuid> links go (default: STATE_DIR/by-id)")
    p.add_argument("--sysfs-dir",
                   help="optional fake sysfs: writes DIR/loopN/wwid and DIR/loopN/size")
    p.add_argument("--nvme-class-dir",
                   help="optional fake /sys/class/nvme: DIR/nvmeK/{subsysnqn,hostnqn} per "
                        "connected host, DIR/nvmeK/nvmeKn<nsid>/{wwid,uuid,nsid} per namespace")
    p.add_argument("--api-nodes", type=int, default=1,
                   help="serve the API on this many ports (API nodes); the first is --port")
    p.add_argument("--cluster-uuid", default=None, help="cluster UUID (default: random)")
    p.add_argument("--subsystem-nqn", default=None,
                   help="subsystem NQN "
                        "(default: nqn.2016-01.com.lightbitslabs:uuid:<cluster uuid>)")
    p.add_argument("--node-endpoint", action="append", default=None,
                   help="a node's nvmeEndpoint, repeatable (default: 127.0.0.1:4420, "
                        "127.0.0.2:4420, 127.0.0.3:4420)")
    p.add_argument("--discovery-port", type=int, default=8009,
                   help="the -s port discovery files must name (default 8009)")
    p.add_argument("--diff-page-size", type=int, default=10000,
                   help="ranges per snapshots/diff answer at most (the CLI pages at 10,000)")
    p.add_argument("--diff-unsupported", type=int, choices=[404, 501], default=None,
                   help="answer snapshots/diff with this status, like an older cluster")
    p.add_argument("--lba-bytes", type=int, default=512,
                   help="the LBA unit of snapshots/diff (the loop device's logical block size)")
    p.add_argument("--fault", action="append", default=[],
                   help="a fault rule as JSON (same shape as POST /sim/faults), repeatable")
    args = p.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if args.api_nodes < 1:
        p.error("--api-nodes must be at least 1")
    if args.nvme_class_dir and os.path.abspath(args.nvme_class_dir).startswith("/sys/"):
        p.error("--nvme-class-dir is a fake sysfs directory, never the real /sys")
    return args


def endpoint_ip(endpoint: str) -> str:
    """'10.0.0.1:4420' → '10.0.0.1'; '[::1]:4420' → '::1'."""
    host = endpoint.rsplit(":", 1)[0]
    return host.strip("[]")


def build_cluster(args: argparse.Namespace, state_dir: str) -> Cluster:
    cluster_uuid = args.cluster_uuid or str(uuidlib.uuid4())
    endpoints = args.node_endpoint or ["127.0.0.1:4420", "127.0.0.2:4420", "127.0.0.3:4420"]
    config = Config(
        state_dir=state_dir, token_file=args.token_file,
        token_projects=(set(filter(None, args.token_projects.split(",")))
                        if args.token_projects else None),
        create_delay=args.create_delay, delete_delay=args.delete_delay,
        snapshot_delay=args.create_delay if args.snapshot_delay is None else args.snapshot_delay,
        cluster_uuid=cluster_uuid,
        subsystem_nqn=args.subsystem_nqn or f"nqn.2016-01.com.lightbitslabs:uuid:{cluster_uuid}",
        node_endpoints=endpoints, discovery_port=args.discovery_port,
        diff_page_size=args.diff_page_size, diff_unsupported=args.diff_unsupported,
        lba_bytes=args.lba_bytes)
    by_id_dir = args.by_id_dir or os.path.join(state_dir, "by-id")
    attacher = Attacher(args.discovery_dir, by_id_dir, args.sysfs_dir, config.subsystem_nqn,
                        {endpoint_ip(e) for e in endpoints}, args.discovery_port,
                        args.nvme_class_dir)
    attacher.remove_stale_controllers()
    cluster = Cluster(config, attacher)
    for spec in args.fault:
        cluster.faults.add(json.loads(spec))
    return cluster


def reconciler(cluster: Cluster, stop: threading.Event) -> None:
    while not stop.wait(TICK_SECONDS):
        try:
            cluster.tick()
        except Exception as e:  # keep the simulator alive; the log says what went wrong
            log(f"reconciler error: {e!r}")


def write_port_file(path: str, port: int) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not os.path.isfile(args.token_file):
        print(f"lightbits-sim: token file {args.token_file} not found", file=sys.stderr)
        return 2
    temp_state = args.state_dir is None
    state_dir = tempfile.mkdtemp(prefix="lightbits-sim-") if temp_state else args.state_dir
    state_dir = os.path.abspath(state_dir)  # losetup and the stale-loop check need absolute paths
    os.makedirs(state_dir, exist_ok=True)
    cluster = build_cluster(args, state_dir)
    detach_stale_loops(state_dir, cluster.attacher.by_id_dir)

    SimHandler.cluster = cluster
    scheme = "https" if args.tls_cert else "http"
    servers = []
    for index in range(args.api_nodes):
        server = SimServer(("127.0.0.1", args.port if index == 0 else 0), SimHandler)
        server.node_index = index  # type: ignore[attr-defined]
        if args.tls_cert:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(args.tls_cert, args.tls_key)
            server.socket = context.wrap_socket(server.socket, server_side=True,
                                                do_handshake_on_connect=False)
        servers.append(server)
        cluster.api_nodes.append({"index": index, "port": server.server_address[1],
                                  "state": "up"})
    port = servers[0].server_address[1]

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    reconcile_thread = threading.Thread(target=reconciler, args=(cluster, stop),
                                        name="reconciler", daemon=True)
    threads = [threading.Thread(target=server.serve_forever, name=f"http{index}", daemon=True)
               for index, server in enumerate(servers)] + [reconcile_thread]
    for thread in threads:
        thread.start()
    if args.port_file:
        write_port_file(args.port_file, port)
    print(f"listening on {scheme}://127.0.0.1:{port}", flush=True)
    log(f"cluster {cluster.config.cluster_uuid}, subsystem {cluster.config.subsystem_nqn}, "
        f"state in {state_dir}, API nodes on ports "
        f"{[node['port'] for node in cluster.api_nodes]}")

    while not stop.wait(1.0):
        pass
    log("shutting down: detaching every loop device this simulator attached")
    cluster.stopping.set()
    for server in servers:
        server.shutdown()
    reconcile_thread.join()
    with cluster.attacher.lock:
        cluster.attacher.detach_all()
    for server in servers:
        server.server_close()
    if temp_state:
        shutil.rmtree(state_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
