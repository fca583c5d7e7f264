#!/usr/bin/env bash
# A multi-node Ray cluster on this one machine, for trying `distbp train --address ...`
# and `ray job submit` without any cloud.  Token authentication stays on.
#
#   cluster/local_cluster.sh up [N]   head node + N worker nodes (default N=1)
#   cluster/local_cluster.sh status   the nodes this script started, then `ray status`
#   cluster/local_cluster.sh env      the export lines a client shell needs
#   cluster/local_cluster.sh down     stop exactly the processes `up` started
#
# Every node is a `ray start --block` process started in its own session (setsid); its
# pid and start time are recorded in the state directory.  `down` signals those
# processes and what they spawned (found by session id and parent pid, start times
# checked), never `ray stop` and never a kill by process name, so other Ray clusters
# on the machine are left alone.
#
# Settings (environment):
#   DISTBP_CLUSTER_DIR         state dir: token, pids, logs   (default ~/.distbp/cluster)
#   RAY_AUTH_TOKEN             use this token instead of the one in the state dir
#   DISTBP_RAY_PORT            GCS port                        (default 6379)
#   DISTBP_DASHBOARD_PORT      dashboard + jobs API port       (default 8265)
#   DISTBP_CLIENT_PORT         Ray Client server port          (default 10001)
#   DISTBP_HEAD_CPUS           logical CPUs of the head node   (default 1)
#   DISTBP_WORKER_CPUS         logical CPUs per worker node    (default 1)
#   DISTBP_OBJECT_STORE_BYTES  object store per node           (default 1000000000)
#   DISTBP_RAY                 the `ray` executable            (default: `ray` on PATH)
#   DISTBP_START_TIMEOUT / DISTBP_STOP_TIMEOUT   seconds       (default 120 / 30)
#   DISTBP_DRAIN_SECONDS       how long a node drains on SIGTERM (default 5; Ray's is 30)
set -euo pipefail

PROG=$(basename "$0")
STATE_DIR="${DISTBP_CLUSTER_DIR:-$HOME/.distbp/cluster}"
GCS_PORT="${DISTBP_RAY_PORT:-6379}"
DASH_PORT="${DISTBP_DASHBOARD_PORT:-8265}"
CLIENT_PORT="${DISTBP_CLIENT_PORT:-10001}"
HEAD_CPUS="${DISTBP_HEAD_CPUS:-1}"
WORKER_CPUS="${DISTBP_WORKER_CPUS:-1}"
OBJ_STORE="${DISTBP_OBJECT_STORE_BYTES:-1000000000}"
START_TIMEOUT="${DISTBP_START_TIMEOUT:-120}"
STOP_TIMEOUT="${DISTBP_STOP_TIMEOUT:-30}"
HOST=127.0.0.1

TOKEN_FILE="$STATE_DIR/auth_token"
NODES_FILE="$STATE_DIR/nodes"        # one line per node: name pid starttime
INFO_FILE="$STATE_DIR/cluster.info"  # key=value: ports, temp dir, worker count
LOG_DIR="$STATE_DIR/logs"

die() { echo "$PROG: $*" >&2; exit "${2:-1}"; }
die2() { echo "$PROG: $1" >&2; exit 2; }

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit "${1:-2}"
}

# ---------------------------------------------------------------- ray and python
find_ray() {
    RAY_BIN="${DISTBP_RAY:-$(command -v ray || true)}"
    [ -n "$RAY_BIN" ] && [ -x "$RAY_BIN" ] ||
        die2 "no 'ray' executable found: install ray[default] or set DISTBP_RAY"
    # The python that runs `ray`: job entrypoints such as `python -m distbp` must
    # resolve to it, so its directory goes first on the nodes' PATH.
    PY=$(head -n 1 "$RAY_BIN" | sed -n 's/^#! *//p' | awk '{print $1}')
    if [ -z "$PY" ] || [ ! -x "$PY" ] || [ "$(basename "$PY")" = env ]; then
        PY=$(command -v python3 || command -v python || true)
    fi
    [ -n "$PY" ] || die2 "no python found next to $RAY_BIN"
}

# ---------------------------------------------------------------- processes
# Start time (clock ticks since boot) of a pid, empty if it is gone or a zombie.  The
# comm field can hold spaces, so cut everything up to the last ')' first.
proc_start() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '$1 != "Z" && $1 != "X" {print $20}' || true; }
proc_sid() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $4}' || true; }

# True if pid is still the very process recorded with that start time.
same_proc() { [ -n "$1" ] && [ -n "$2" ] && [ "$(proc_start "$1")" = "$2" ]; }

# All live processes belonging to the given sessions, plus their descendants (Ray
# job drivers run in sessions of their own, under a process of ours): "pid starttime".
our_procs() {
    local sids="$*"
    [ -n "$sids" ] || return 0
    ps -eo pid=,ppid=,sid= | awk -v sids="$sids" '
        BEGIN { n = split(sids, s, " "); for (i = 1; i <= n; i++) want[s[i]] = 1 }
        { pid[NR] = $1; ppid[NR] = $2; sid[NR] = $3; if ($3 in want) mine[$1] = 1 }
        END {
            do { grew = 0
                 for (i = 1; i <= NR; i++)
                     if (!(pid[i] in mine) && (ppid[i] in mine)) { mine[pid[i]] = 1; grew = 1 }
            } while (grew)
            for (p in mine) print p
        }' | while read -r p; do
            st=$(proc_start "$p")
            if [ -n "$st" ]; then echo "$p $st"; fi
        done
    return 0
}

# Of a "pid starttime" list, those still alive (same start time).
still_alive() {
    local p st
    while read -r p st; do
        if [ -n "$p" ] && same_proc "$p" "$st"; then echo "$p $st"; fi
    done
    return 0
}

signal_list() {  # signal_list SIG < "pid starttime" lines
    local sig=$1 p st
    while read -r p st; do
        if [ -n "$p" ] && same_proc "$p" "$st"; then kill "-$sig" "$p" 2>/dev/null || true; fi
    done
    return 0
}

# Nodes recorded in the state dir whose `ray start` process is still alive.
live_nodes() {
    [ -f "$NODES_FILE" ] || return 0
    local name pid st
    while read -r name pid st; do
        if [ -n "$name" ] && same_proc "$pid" "$st"; then echo "$name $pid $st"; fi
    done < "$NODES_FILE"
    return 0
}

# ---------------------------------------------------------------- ports and token
port_free() {  # port_free PORT  (GCS and raylets bind every interface: test 0.0.0.0)
    "$PY" - "$1" <<'EOF'
import socket, sys
s = socket.socket()
# SO_REUSEADDR: ignore TIME_WAIT leftovers of a previous cluster (as Ray's servers do);
# a live listener still makes bind() fail.
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("0.0.0.0", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
}

free_ports() {  # free_ports K : K distinct currently free TCP ports
    "$PY" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("0.0.0.0", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

load_token() {
    mkdir -p "$STATE_DIR"
    chmod 700 "$STATE_DIR"
    if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
        TOKEN="$RAY_AUTH_TOKEN"
        if [ ! -f "$TOKEN_FILE" ] || [ "$(cat "$TOKEN_FILE")" != "$TOKEN" ]; then
            (umask 077; printf '%s' "$TOKEN" > "$TOKEN_FILE")
        fi
    elif [ -s "$TOKEN_FILE" ]; then
        TOKEN=$(cat "$TOKEN_FILE")
    else
        (umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$TOKEN_FILE")
        TOKEN=$(cat "$TOKEN_FILE")
        echo "generated a new cluster token in $TOKEN_FILE"
    fi
    chmod 600 "$TOKEN_FILE"
    [ -n "$TOKEN" ] || die2 "empty token in $TOKEN_FILE"
}

# The environment of every ray command this script runs (and, through `ray start`,
# of every node process and job driver): token auth on, this cluster's token.
ray_env() {
    export RAY_AUTH_MODE=token
    export RAY_AUTH_TOKEN="$TOKEN"
    unset RAY_AUTH_TOKEN_PATH RAY_ADDRESS RAY_API_SERVER_ADDRESS
    export RAY_USAGE_STATS_ENABLED=0
    # On SIGTERM a node first drains (Ray's default: up to 30 s while work is running).
    export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${DISTBP_DRAIN_SECONDS:-5}"
    export PATH="$(dirname "$PY"):$PATH"
}

read_info() {
    [ -f "$INFO_FILE" ] || return 0
    local k v
    while IFS='=' read -r k v; do
        case "$k" in
            GCS_PORT) GCS_PORT=$v ;; DASH_PORT) DASH_PORT=$v ;;
            NUM_WORKERS) NUM_WORKERS=$v ;; TEMP_ROOT) TEMP_ROOT=$v ;;
        esac
    done < "$INFO_FILE"
}

print_env() {
    cat <<EOF
export RAY_ADDRESS=$HOST:$GCS_PORT
export RAY_API_SERVER_ADDRESS=http://$HOST:$DASH_PORT
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE
# or, instead of RAY_AUTH_TOKEN_PATH:  export RAY_AUTH_TOKEN="\$(cat $TOKEN_FILE)"
EOF
}

lock() {
    mkdir -p "$STATE_DIR"
    exec 9> "$STATE_DIR/.lock"
    flock -w 60 9 || die "another $PROG is running on $STATE_DIR"
}

# ---------------------------------------------------------------- up
wait_ready() {  # wait_ready NAME PID LOG DEADLINE
    local name=$1 pid=$2 log=$3 deadline=$4
    while :; do
        grep -q "block forever" "$log" 2>/dev/null && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$PROG: $name exited during start; last lines of $log:" >&2
            tail -n 15 "$log" >&2
            return 1
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "$PROG: $name not ready after ${START_TIMEOUT}s; last lines of $log:" >&2
            tail -n 15 "$log" >&2
            return 1
        fi
        sleep 0.25
    done
}

start_node() {  # start_node NAME ray-start-args... ; appends to NODES_FILE
    local name=$1; shift
    local log="$LOG_DIR/$name.log"
    # In a non-interactive shell a background job is not a process-group leader, so
    # setsid(1) calls setsid() itself without forking: $! is the ray process, and it
    # leads a new session whose id is its pid.
    # 9>&-: the node must not inherit (and hold forever) this script's lock.
    setsid "$RAY_BIN" start --block "$@" > "$log" 2>&1 < /dev/null 9>&- &
    local pid=$!
    local st=""
    for _ in 1 2 3 4 5 6 7 8 9 10; do st=$(proc_start "$pid"); [ -n "$st" ] && break; sleep 0.05; done
    [ -n "$st" ] || { echo "$PROG: $name exited at once; see $log" >&2; return 1; }
    echo "$name $pid $st" >> "$NODES_FILE"
    # The forked child calls setsid() a moment after the fork: wait for it.
    for _ in $(seq 1 40); do [ "$(proc_sid "$pid")" = "$pid" ] && break; sleep 0.05; done
    if [ -z "$(proc_start "$pid")" ]; then
        echo "$PROG: $name exited at once; last lines of $log:" >&2; tail -n 15 "$log" >&2
        return 1
    elif [ "$(proc_sid "$pid")" != "$pid" ]; then
        echo "$PROG: $name (pid $pid) did not get its own session" >&2
        return 1
    fi
    STARTED_PIDS+=("$name:$pid")
}

cmd_up() {
    local n=${1:-1}
    [[ "$n" =~ ^[0-9]+$ ]] || die2 "up: N must be a whole number, got '$n'"
    find_ray
    lock
    if [ -n "$(live_nodes)" ]; then
        read_info
        echo "a local cluster is already up (state: $STATE_DIR):"
        live_nodes | sed 's/^/  /'
        echo "address 127.0.0.1:$GCS_PORT; run '$PROG down' first to restart it."
        exit 2
    fi
    rm -f "$NODES_FILE" "$INFO_FILE"
    load_token
    ray_env

    local p
    for p in "$GCS_PORT" "$DASH_PORT" "$CLIENT_PORT"; do
        [[ "$p" =~ ^[0-9]+$ ]] || die2 "port '$p' is not a number"
        # Ray gives worker processes ports 10002-19999 by default.
        if [ "$p" -ge 10002 ] && [ "$p" -le 19999 ]; then
            die2 "port $p is inside Ray's worker port range 10002-19999; pick another"
        fi
        port_free "$p" || die2 "port $p is in use; pick others with DISTBP_RAY_PORT / DISTBP_DASHBOARD_PORT / DISTBP_CLIENT_PORT"
    done
    # Each node runs a dashboard agent whose HTTP port defaults to 52365: on one
    # machine every node needs its own.
    read -r -a agent_ports <<< "$(free_ports $((n + 1)))"

    # Per-node temp dirs (Ray allows --temp-dir per node).  Unix socket paths under
    # them must stay short (< 108 bytes), so fall back to /tmp for a long $HOME.
    TEMP_ROOT="$STATE_DIR/tmp"
    if [ ${#TEMP_ROOT} -gt 36 ]; then
        TEMP_ROOT="/tmp/distbp-$(id -u)-$(printf '%s' "$STATE_DIR" | cksum | cut -d' ' -f1)"
    fi
    rm -rf "$TEMP_ROOT"
    mkdir -p "$TEMP_ROOT" "$LOG_DIR"
    : > "$NODES_FILE"
    {
        echo "GCS_PORT=$GCS_PORT"; echo "DASH_PORT=$DASH_PORT"
        echo "NUM_WORKERS=$n"; echo "TEMP_ROOT=$TEMP_ROOT"
    } > "$INFO_FILE"

    local t0; t0=$(date +%s.%N)
    STARTED_PIDS=()
    local common=(--node-ip-address "$HOST" --object-store-memory "$OBJ_STORE" --disable-usage-stats)
    start_node head --head "${common[@]}" --port "$GCS_PORT" \
        --dashboard-host "$HOST" --dashboard-port "$DASH_PORT" --include-dashboard true \
        --ray-client-server-port "$CLIENT_PORT" \
        --dashboard-agent-listen-port "${agent_ports[0]}" \
        --num-cpus "$HEAD_CPUS" --temp-dir "$TEMP_ROOT/head" || { cmd_down_locked quiet; exit 1; }
    local deadline=$(( $(date +%s) + START_TIMEOUT ))
    wait_ready head "${STARTED_PIDS[0]#*:}" "$LOG_DIR/head.log" "$deadline" || { cmd_down_locked quiet; exit 1; }

    # One worker at a time: starting several nodes at once on a small, busy machine
    # can starve a node's agents past Ray's own start-up timeouts.
    local i
    for ((i = 1; i <= n; i++)); do
        start_node "worker-$i" "${common[@]}" --address "$HOST:$GCS_PORT" \
            --dashboard-agent-listen-port "${agent_ports[$i]}" \
            --num-cpus "$WORKER_CPUS" --resources "{\"worker_node_$i\": 1}" \
            --temp-dir "$TEMP_ROOT/w$i" || { cmd_down_locked quiet; exit 1; }
        wait_ready "worker-$i" "${STARTED_PIDS[$i]#*:}" "$LOG_DIR/worker-$i.log" "$deadline" ||
            { cmd_down_locked quiet; exit 1; }
    done

    # All nodes registered with the GCS?
    local alive=0
    while [ "$(date +%s)" -lt "$deadline" ]; do
        alive=$(timeout 30 "$RAY_BIN" status --address "$HOST:$GCS_PORT" 2>/dev/null |
                sed -n '/^Active:/,/^Pending:/p' | grep -c ' node_' || true)
        [ "$alive" -ge $((n + 1)) ] && break
        sleep 1
    done
    if [ "$alive" -lt $((n + 1)) ]; then
        echo "$PROG: only $alive of $((n + 1)) nodes registered; logs in $LOG_DIR" >&2
        cmd_down_locked quiet; exit 1
    fi
    local secs; secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')

    echo "local Ray cluster up in ${secs}s: head + $n worker node(s), token auth on"
    echo "  address    $HOST:$GCS_PORT"
    echo "  dashboard  http://$HOST:$DASH_PORT   (also the jobs API; needs the token)"
    echo "  token      $TOKEN_FILE"
    echo "  state      $STATE_DIR   (logs: $LOG_DIR, ray temp: $TEMP_ROOT)"
    echo "In a client shell (or: eval \"\$($0 env)\"):"
    print_env | sed 's/^/  /'
}

# ---------------------------------------------------------------- down
cmd_down_locked() {  # assumes the lock is held
    local quiet=${1:-}
    if [ ! -s "$NODES_FILE" ]; then
        [ -n "$quiet" ] || echo "no local cluster is up (state: $STATE_DIR)"
        rm -f "$NODES_FILE"
        return 0
    fi
    local t0; t0=$(date +%s.%N)
    local live sids=""
    live=$(live_nodes)
    local name pid st
    while read -r name pid st; do if [ -n "$name" ]; then sids="$sids $pid"; fi; done <<< "$live"
    # Processes started before `down` (ours by session or ancestry), checked by start time.
    local procs; procs=$(our_procs $sids)
    if [ -z "$live" ] && [ -z "$procs" ]; then
        [ -n "$quiet" ] || echo "no local cluster is up (stale state in $STATE_DIR removed)"
        rm -f "$NODES_FILE"
        return 0
    fi
    # Graceful: SIGTERM each `ray start --block`; it drains its node and stops the
    # processes it spawned.
    if [ -n "$live" ]; then awk '{print $2, $3}' <<< "$live" | signal_list TERM; fi
    local deadline=$(( $(date +%s) + STOP_TIMEOUT ))
    local left
    while :; do
        left=$( { still_alive <<< "$procs"; our_procs $sids; } | sort -u)
        [ -z "$left" ] && break
        [ "$(date +%s)" -ge "$deadline" ] && break
        sleep 0.25
    done
    if [ -n "$left" ]; then
        echo "$PROG: $(wc -l <<< "$left") process(es) still running after ${STOP_TIMEOUT}s; sending SIGTERM, then SIGKILL" >&2
        signal_list TERM <<< "$left"; sleep 3
        left=$( { still_alive <<< "$left"; our_procs $sids; } | sort -u)
        if [ -n "$left" ]; then signal_list KILL <<< "$left"; fi
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            sleep 0.5
            left=$( { still_alive <<< "$left"; our_procs $sids; } | sort -u)
            [ -z "$left" ] && break
        done
    fi
    rm -f "$NODES_FILE"
    local secs; secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if [ -n "$left" ]; then
        echo "$PROG: could not stop: $(awk '{print $1}' <<< "$left" | tr '\n' ' ')" >&2
        return 1
    fi
    [ -n "$quiet" ] || echo "local Ray cluster stopped in ${secs}s ($(wc -l <<< "$procs") processes; token and logs kept in $STATE_DIR)"
}

cmd_down() { find_ray; lock; cmd_down_locked; }

# ---------------------------------------------------------------- status / env
cmd_status() {
    find_ray
    read_info
    local live; live=$(live_nodes)
    if [ -z "$live" ]; then
        echo "no local cluster is up (state: $STATE_DIR)"
        exit 1
    fi
    echo "local cluster (state: $STATE_DIR), address $HOST:$GCS_PORT, dashboard http://$HOST:$DASH_PORT"
    local name pid st
    while read -r name pid st; do
        echo "  $name  pid $pid  $(our_procs "$pid" | wc -l) processes"
    done <<< "$live"
    if [ "$(wc -l < "$NODES_FILE")" -ne "$(wc -l <<< "$live")" ]; then
        echo "  warning: some recorded nodes have exited (see $LOG_DIR)"
    fi
    [ -s "$TOKEN_FILE" ] || die2 "token file $TOKEN_FILE is missing"
    TOKEN=$(cat "$TOKEN_FILE")
    ray_env
    timeout 60 "$RAY_BIN" status --address "$HOST:$GCS_PORT"
}

cmd_env() {
    read_info
    [ -n "$(live_nodes)" ] || die "no local cluster is up (state: $STATE_DIR)"
    print_env
}

case "${1:-}" in
    up) shift; [ $# -le 1 ] || usage; cmd_up "${1:-1}" ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    -h|--help|help) usage 0 ;;
    *) usage ;;
esac
