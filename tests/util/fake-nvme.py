#!/usr/bin/env python3
"""A stand-in for nvme-cli in ferry's Lightbits tests (`nvme_binary` in the [lightbits] table).

Every call appends its argv (without the program name) as one JSON line to $FAKE_NVME_LOG.

`connect -t tcp -a ADDR -s PORT -n SUBSYS_NQN -q HOST_NQN [--ctrl-loss-tmo N]` hands the connect to
scripts/lightbits-sim.py, which plays discovery-client and the kernel: it writes the discovery-client
line for ADDR (discovery port $FAKE_NVME_DISCOVERY_PORT, default 8009) into
$FAKE_NVME_DISCOVERY_DIR/fake-nvme-<ADDR>.conf, then waits, as the kernel's connect does, until a
controller of SUBSYS_NQN is live in $FAKE_NVME_SYSFS/class/nvme (the simulator's --nvme-class-dir).

`disconnect -n SUBSYS_NQN` removes those files and waits until the controller is gone; like
nvme-cli it prints how many controllers it disconnected and succeeds with 0.

Python 3.11 standard library only.
"""
from __future__ import annotations

import json
import os
import sys
import time

WAIT_SECONDS = 10.0


def options(words: list[str]) -> dict[str, str]:
    names = {"-t": "transport", "-a": "traddr", "-s": "trsvcid", "-n": "nqn", "-q": "hostnqn",
             "--ctrl-loss-tmo": "ctrl_loss_tmo"}
    found: dict[str, str] = {}
    i = 0
    while i < len(words):
        if words[i] not in names or i + 1 >= len(words):
            raise SystemExit(f"fake nvme: unexpected argument {words[i]!r}")
        found[names[words[i]]] = words[i + 1]
        i += 2
    return found


def controllers(nqn: str) -> list[str]:
    class_dir = os.path.join(os.environ["FAKE_NVME_SYSFS"], "class", "nvme")
    names = []
    for name in sorted(os.listdir(class_dir)) if os.path.isdir(class_dir) else []:
        try:
            with open(os.path.join(class_dir, name, "subsysnqn")) as f:
                if f.read().strip() == nqn:
                    names.append(name)
        except OSError:
            continue
    return names


def wait(what: str, done: callable) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"fake nvme: timed out waiting for {what}")
        time.sleep(0.02)


def our_files(nqn: str) -> list[str]:
    directory = os.environ["FAKE_NVME_DISCOVERY_DIR"]
    found = []
    for name in os.listdir(directory):
        if name.startswith("fake-nvme-") and name.endswith(".conf"):
            with open(os.path.join(directory, name)) as f:
                if f" -n {nqn}" in f.read():
                    found.append(os.path.join(directory, name))
    return found


def connect(opts: dict[str, str]) -> int:
    for key in ("transport", "traddr", "trsvcid", "nqn", "hostnqn"):
        if key not in opts:
            raise SystemExit(f"fake nvme: connect without {key}")
    port = os.environ.get("FAKE_NVME_DISCOVERY_PORT", "8009")
    line = (f"-t {opts['transport']} -a {opts['traddr']} -s {port} -q {opts['hostnqn']} "
            f"-n {opts['nqn']}\n")
    path = os.path.join(os.environ["FAKE_NVME_DISCOVERY_DIR"], f"fake-nvme-{opts['traddr']}.conf")
    with open(path + ".tmp", "w") as f:
        f.write(line)
    os.replace(path + ".tmp", path)
    wait("the controller", lambda: controllers(opts["nqn"]))
    print(f"connecting to device: {controllers(opts['nqn'])[0]}")
    return 0


def disconnect(opts: dict[str, str]) -> int:
    nqn = opts.get("nqn")
    if not nqn:
        raise SystemExit("fake nvme: disconnect without -n")
    count = len(controllers(nqn))
    for path in our_files(nqn):
        os.unlink(path)
    wait("the controller to go", lambda: not controllers(nqn))
    print(f"NQN:{nqn} disconnected {count} controller(s)")
    return 0


def main(argv: list[str]) -> int:
    with open(os.environ["FAKE_NVME_LOG"], "a") as f:
        f.write(json.dumps(argv) + "\n")
    if not argv or argv[0] not in ("connect", "disconnect"):
        print(f"fake nvme: unsupported command {argv[:1]}", file=sys.stderr)
        return 1
    opts = options(argv[1:])
    return connect(opts) if argv[0] == "connect" else disconnect(opts)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
