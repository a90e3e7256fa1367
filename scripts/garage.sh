#!/usr/bin/env bash
# Throwaway single-node Garage (S3-compatible object store) for ferry's S3 tests.
#
#   scripts/garage.sh install      install garage 2.5.0 with cargo unless already there
#   scripts/garage.sh start DIR    write DIR/garage.toml, start garage, write DIR/env
#   scripts/garage.sh stop DIR     stop the garage started in DIR (idempotent)
#
# and a 3-node cluster (replication factor 3, consistency mode "consistent": writes and reads
# need 2 of the 3 nodes), for the tests of many hosts and of a node lost mid-job
# (tests/cluster.rs):
#
#   scripts/garage.sh cluster-start DIR    three garage processes, layout assigned and applied,
#                                          a key and a bucket, DIR/cluster-env
#   scripts/garage.sh cluster-stop DIR     stop all three (idempotent)
#   scripts/garage.sh node-stop DIR N      kill -9 node N (1-3): a node lost, not shut down
#   scripts/garage.sh node-start DIR N     start node N again with its data and identity; once
#                                          all three run, wait until the cluster is healthy
#
# DIR/cluster-env (mode 0600) exports FERRY_TEST_CLUSTER_ENDPOINT (node 1's S3 API),
# FERRY_TEST_CLUSTER_BUCKET, FERRY_TEST_CLUSTER_REGION, FERRY_TEST_CLUSTER_DIR,
# FERRY_TEST_CLUSTER_ACCESS_KEY_ID and FERRY_TEST_CLUSTER_SECRET_ACCESS_KEY (names of their own,
# so that it can be sourced next to the single node's env). Node i listens for S3 on
# ${FERRY_GARAGE_CLUSTER_PORT:-39600} + 10*(i-1), RPC on S3+1, admin on S3+3; when one of the
# nine ports is busy all move up together. Node i's files are DIR/node<i>/.
#
# `start` uses `garage server --single-node --default-bucket` (Garage >= 2.0): the node assigns
# itself a layout and imports a random access key with read/write/owner rights on the bucket
# `ferry-test`. DIR/env (mode 0600) holds `export` lines for FERRY_TEST_S3_ENDPOINT,
# FERRY_TEST_S3_BUCKET, FERRY_TEST_S3_REGION, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; source
# it before `cargo test`. The secret is never printed.
#
# Ports: S3 API on 127.0.0.1:${FERRY_GARAGE_S3_PORT:-39000}, RPC on S3+1, admin on S3+3; when one
# of them is busy the script moves the three up together (a busy RPC port makes garage panic).
# This is a test fixture: no TLS, no persistence guarantees (fsync off), loopback only.
set -euo pipefail

GARAGE_VERSION="2.5.0"
BUCKET="ferry-test"
REGION="garage"

die() {
    echo "garage.sh: $*" >&2
    exit 1
}

usage() {
    echo "usage: $0 install | start DIR | stop DIR | cluster-start DIR | cluster-stop DIR" \
        "| node-stop DIR N | node-start DIR N" >&2
    exit 2
}

# Prints the path of the garage binary, or nothing.
garage_bin() {
    if [[ -n "${FERRY_GARAGE_BIN:-}" ]]; then
        echo "$FERRY_GARAGE_BIN"
    elif command -v garage >/dev/null 2>&1; then
        command -v garage
    elif [[ -x "$HOME/.cargo/bin/garage" ]]; then
        echo "$HOME/.cargo/bin/garage"
    fi
}

garage_is_wanted_version() {
    local bin
    bin="$(garage_bin)"
    [[ -n "$bin" ]] || return 1
    "$bin" --version 2>/dev/null | grep -q "v\?${GARAGE_VERSION//./\\.}\b"
}

cmd_install() {
    if garage_is_wanted_version; then
        echo "garage ${GARAGE_VERSION} already installed: $(garage_bin)"
        return 0
    fi
    if pgrep -f "cargo install --locked garage" >/dev/null 2>&1; then
        die "another 'cargo install --locked garage' is running; wait for it to finish"
    fi
    cargo install --locked garage --version "$GARAGE_VERSION"
    garage_is_wanted_version || die "installed garage does not report version ${GARAGE_VERSION}"
}

random_hex() { # $1 = number of random bytes
    if command -v openssl >/dev/null 2>&1; then
        openssl rand -hex "$1"
    else
        od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'
    fi
}

port_busy() { # $1 = port on 127.0.0.1
    if command -v ss >/dev/null 2>&1; then
        ss -Htln "sport = :$1" 2>/dev/null | grep -q . && return 0
    fi
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Sets S3_PORT, RPC_PORT, ADMIN_PORT to a free triple starting at the requested S3 port.
pick_ports() {
    local base="${FERRY_GARAGE_S3_PORT:-39000}" attempt
    [[ "$base" =~ ^[0-9]+$ ]] || die "FERRY_GARAGE_S3_PORT is not a number: $base"
    for attempt in $(seq 0 49); do
        S3_PORT=$((base + attempt * 10))
        RPC_PORT=$((S3_PORT + 1))
        ADMIN_PORT=$((S3_PORT + 3))
        ((ADMIN_PORT < 65536)) || break
        if ! port_busy "$S3_PORT" && ! port_busy "$RPC_PORT" && ! port_busy "$ADMIN_PORT"; then
            return 0
        fi
    done
    die "no free port triple found from $base"
}

proc_running() { # $1 = pid; a zombie (exited, not yet reaped) does not count
    local state
    state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)"
    [[ -n "$state" && "$state" != "Z" && "$state" != "X" ]]
}

pid_alive() { # $1 = pid file; succeeds when it names a running garage process
    local pid
    [[ -f "$1" ]] || return 1
    pid="$(cat "$1")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q garage
}

cmd_start() {
    local dir="$1" bin
    bin="$(garage_bin)"
    [[ -n "$bin" ]] || die "garage not found; run '$0 install' first"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    if pid_alive "$dir/garage.pid"; then
        die "garage already running from $dir (pid $(cat "$dir/garage.pid"))"
    fi
    mkdir -p "$dir/meta" "$dir/data"
    pick_ports

    local access_key secret_key
    access_key="GK$(random_hex 12)"
    secret_key="$(random_hex 32)"

    umask 077
    cat >"$dir/garage.toml" <<EOF
# generated by scripts/garage.sh: throwaway single-node test instance
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$RPC_PORT"
rpc_public_addr = "127.0.0.1:$RPC_PORT"
rpc_secret = "$(random_hex 32)"

[s3_api]
s3_region = "$REGION"
api_bind_addr = "127.0.0.1:$S3_PORT"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$ADMIN_PORT"
admin_token = "$(random_hex 24)"
EOF

    GARAGE_DEFAULT_ACCESS_KEY="$access_key" \
        GARAGE_DEFAULT_SECRET_KEY="$secret_key" \
        GARAGE_DEFAULT_BUCKET="$BUCKET" \
        nohup "$bin" -c "$dir/garage.toml" server --single-node --default-bucket \
        >"$dir/garage.log" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" >"$dir/garage.pid"

    local endpoint="http://127.0.0.1:$S3_PORT" started=$SECONDS code
    while true; do
        if ! proc_running "$pid"; then
            tail -n 20 "$dir/garage.log" >&2 || true
            rm -f "$dir/garage.pid"
            die "garage exited during start-up (log: $dir/garage.log)"
        fi
        code="$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$endpoint/" || true)"
        if [[ -n "$code" && "$code" != "000" ]]; then
            break
        fi
        # 120 s of real time: a loaded machine can be slow to start it.
        if ((SECONDS - started >= START_TIMEOUT_SECS)); then
            tail -n 20 "$dir/garage.log" >&2 || true
            cmd_stop "$dir"
            die "garage did not answer on $endpoint within $START_TIMEOUT_SECS s (log: $dir/garage.log)"
        fi
        sleep 0.1
    done

    cat >"$dir/env" <<EOF
export FERRY_TEST_S3_ENDPOINT=$endpoint
export FERRY_TEST_S3_BUCKET=$BUCKET
export FERRY_TEST_S3_REGION=$REGION
export AWS_ACCESS_KEY_ID=$access_key
export AWS_SECRET_ACCESS_KEY=$secret_key
EOF
    chmod 600 "$dir/env"
    echo "garage running (pid $pid) at $endpoint, bucket $BUCKET; credentials in $dir/env"
}

cmd_stop() {
    local dir="$1" pid waited=0
    if ! pid_alive "$dir/garage.pid"; then
        rm -f "$dir/garage.pid"
        echo "garage not running in $dir"
        return 0
    fi
    pid="$(cat "$dir/garage.pid")"
    kill -TERM "$pid" 2>/dev/null || true
    while proc_running "$pid" && ((waited < 100)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    if proc_running "$pid"; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/garage.pid"
    echo "garage stopped (pid $pid)"
}

# ---- 3-node cluster ---------------------------------------------------------------------------

NODES=(1 2 3)

# How long a starting Garage may take to answer.
START_TIMEOUT_SECS=120

# Sets CLUSTER_BASE to an S3 port from which the nine ports of the three nodes are free.
pick_cluster_ports() {
    local base="${FERRY_GARAGE_CLUSTER_PORT:-39600}" attempt node port busy
    [[ "$base" =~ ^[0-9]+$ ]] || die "FERRY_GARAGE_CLUSTER_PORT is not a number: $base"
    for attempt in $(seq 0 19); do
        CLUSTER_BASE=$((base + attempt * 30))
        ((CLUSTER_BASE + 23 < 65536)) || break
        busy=0
        for node in "${NODES[@]}"; do
            for port in 0 1 3; do
                if port_busy $((CLUSTER_BASE + 10 * (node - 1) + port)); then busy=1; fi
            done
        done
        ((busy == 0)) && return 0
    done
    die "no nine free ports found from $base"
}

# Starts node $2 of the cluster in $1 from its existing config; waits for its S3 port.
start_node() {
    local dir="$1" node="$2" bin ndir pid port started=$SECONDS
    bin="$(garage_bin)"
    [[ -n "$bin" ]] || die "garage not found; run '$0 install' first"
    ndir="$dir/node$node"
    [[ -f "$ndir/garage.toml" ]] || die "no node $node in $dir (run cluster-start first)"
    if pid_alive "$ndir/garage.pid"; then
        echo "node $node already running (pid $(cat "$ndir/garage.pid"))"
        return 0
    fi
    nohup "$bin" -c "$ndir/garage.toml" server >>"$ndir/garage.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$ndir/garage.pid"
    port="$(cat "$ndir/s3-port")"
    until port_busy "$port"; do
        if ! proc_running "$pid"; then
            tail -n 20 "$ndir/garage.log" >&2 || true
            rm -f "$ndir/garage.pid"
            die "garage node $node exited during start-up (log: $ndir/garage.log)"
        fi
        if ((SECONDS - started >= START_TIMEOUT_SECS)); then
            tail -n 20 "$ndir/garage.log" >&2 || true
            die "garage node $node did not listen on $port within $START_TIMEOUT_SECS s (log: $ndir/garage.log)"
        fi
        sleep 0.1
    done
    echo "node $node running (pid $pid, S3 port $port)"
}

# node-start: starts node $2 and tells node 1 to connect to it now (rather than at its next
# reconnection attempt, up to about 10 s later); when all three run, waits until the cluster
# is healthy.
cmd_node_start() {
    local dir="$1" node="$2" other id all=1
    start_node "$dir" "$node"
    if ((node != 1)) && pid_alive "$dir/node1/garage.pid"; then
        id="$("$(garage_bin)" -c "$dir/node$node/garage.toml" node id -q 2>/dev/null)" ||
            die "cannot read node $node's id"
        cluster_cli "$dir" node connect "$id" >/dev/null
    fi
    for other in "${NODES[@]}"; do
        pid_alive "$dir/node$other/garage.pid" || all=0
    done
    if ((all == 1)); then
        wait_cluster_healthy "$dir"
        # A node that was down lists objects deleted meanwhile until its tables are synced
        # (Garage filters deleted entries per node before merging): start that sync now.
        cluster_cli "$dir" repair -a --yes tables >/dev/null
        echo "cluster healthy"
    fi
}

# Runs the garage CLI against node 1 of the cluster in $1.
cluster_cli() {
    local dir="$1"
    shift
    "$(garage_bin)" -c "$dir/node1/garage.toml" "$@"
}

# Waits until the cluster reports itself healthy: every node up, every partition at full
# replication.
wait_cluster_healthy() {
    local dir="$1" waited=0
    until cluster_cli "$dir" json-api GetClusterHealth 2>/dev/null |
        grep -q '"status": *"healthy"'; do
        if ((waited >= 600)); then
            cluster_cli "$dir" status >&2 || true
            die "the cluster in $dir did not become healthy within 60 s"
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
}

cmd_cluster_start() {
    local dir="$1" bin node ndir secret s3 rpc admin
    bin="$(garage_bin)"
    [[ -n "$bin" ]] || die "garage not found; run '$0 install' first"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    for node in "${NODES[@]}"; do
        if pid_alive "$dir/node$node/garage.pid"; then
            die "cluster node $node already running from $dir"
        fi
    done
    pick_cluster_ports
    secret="$(random_hex 32)"
    umask 077
    for node in "${NODES[@]}"; do
        ndir="$dir/node$node"
        rm -rf "$ndir"
        mkdir -p "$ndir/meta" "$ndir/data"
        s3=$((CLUSTER_BASE + 10 * (node - 1)))
        rpc=$((s3 + 1))
        admin=$((s3 + 3))
        echo "$s3" >"$ndir/s3-port"
        cat >"$ndir/garage.toml" <<EOF
# generated by scripts/garage.sh: throwaway 3-node test cluster, node $node
metadata_dir = "$ndir/meta"
data_dir = "$ndir/data"
db_engine = "sqlite"
replication_factor = 3
consistency_mode = "consistent"
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$secret"

[s3_api]
s3_region = "$REGION"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin"
admin_token = "$(random_hex 24)"
EOF
    done
    for node in "${NODES[@]}"; do
        start_node "$dir" "$node" >/dev/null
    done

    # Connect nodes 2 and 3 to node 1; one role each in one zone; apply layout version 1.
    local id ids=()
    for node in "${NODES[@]}"; do
        id="$("$bin" -c "$dir/node$node/garage.toml" node id -q 2>/dev/null)" ||
            die "cannot read node $node's id"
        ids+=("${id%%@*}")
        if ((node > 1)); then
            cluster_cli "$dir" node connect "$id" >/dev/null
        fi
    done
    for id in "${ids[@]}"; do
        cluster_cli "$dir" layout assign -z dc1 -c 1G "$id" >/dev/null
    done
    cluster_cli "$dir" layout apply --version 1 >/dev/null
    wait_cluster_healthy "$dir"

    # A key, imported through stdin (the secret is on no command line), and a bucket.
    local access_key secret_key
    access_key="GK$(random_hex 12)"
    secret_key="$(random_hex 32)"
    printf '{"accessKeyId":"%s","secretAccessKey":"%s","name":"ferry-test"}' \
        "$access_key" "$secret_key" | cluster_cli "$dir" json-api ImportKey - >/dev/null
    cluster_cli "$dir" bucket create "$BUCKET" >/dev/null
    cluster_cli "$dir" bucket allow --read --write --owner "$BUCKET" --key "$access_key" \
        >/dev/null

    local endpoint
    endpoint="http://127.0.0.1:$(cat "$dir/node1/s3-port")"
    cat >"$dir/cluster-env" <<EOF
export FERRY_TEST_CLUSTER_ENDPOINT=$endpoint
export FERRY_TEST_CLUSTER_BUCKET=$BUCKET
export FERRY_TEST_CLUSTER_REGION=$REGION
export FERRY_TEST_CLUSTER_DIR=$dir
export FERRY_TEST_CLUSTER_ACCESS_KEY_ID=$access_key
export FERRY_TEST_CLUSTER_SECRET_ACCESS_KEY=$secret_key
EOF
    chmod 600 "$dir/cluster-env"
    echo "garage cluster running (3 nodes, replication factor 3) at $endpoint, bucket $BUCKET;" \
        "credentials in $dir/cluster-env"
}

stop_node() { # $1 = dir, $2 = node, $3 = signal
    local ndir="$1/node$2" pid waited=0
    if ! pid_alive "$ndir/garage.pid"; then
        rm -f "$ndir/garage.pid"
        echo "node $2 not running"
        return 0
    fi
    pid="$(cat "$ndir/garage.pid")"
    kill "-$3" "$pid" 2>/dev/null || true
    while proc_running "$pid" && ((waited < 100)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    if proc_running "$pid"; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$ndir/garage.pid"
    echo "node $2 stopped (pid $pid, SIG$3)"
}

cmd_cluster_stop() {
    local node
    for node in "${NODES[@]}"; do
        stop_node "$1" "$node" TERM
    done
}

check_node() { # $1 = node
    [[ "$1" =~ ^[123]$ ]] || die "the node is 1, 2 or 3, not $1"
}

case "${1:-}" in
install)
    [[ $# -eq 1 ]] || usage
    cmd_install
    ;;
start)
    [[ $# -eq 2 ]] || usage
    cmd_start "$2"
    ;;
stop)
    [[ $# -eq 2 ]] || usage
    cmd_stop "$2"
    ;;
cluster-start)
    [[ $# -eq 2 ]] || usage
    cmd_cluster_start "$2"
    ;;
cluster-stop)
    [[ $# -eq 2 ]] || usage
    cmd_cluster_stop "$2"
    ;;
node-stop)
    [[ $# -eq 3 ]] || usage
    check_node "$3"
    stop_node "$2" "$3" KILL
    ;;
node-start)
    [[ $# -eq 3 ]] || usage
    check_node "$3"
    cmd_node_start "$2" "$3"
    ;;
*)
    usage
    ;;
esac
