#!/usr/bin/env bash
# Submit `python -m distbp train ...` to a running Ray cluster through the jobs API,
# follow its log, and exit with its outcome (0 only if the job SUCCEEDED).
#
#   cluster/submit.sh [options] -- [distbp train options...]
#
# Options:
#   --address URL    jobs API (dashboard) URL.  Default: $RAY_API_SERVER_ADDRESS, else
#                    $RAY_ADDRESS if it is an http(s) URL, else the cluster started by
#                    cluster/local_cluster.sh, else http://127.0.0.1:8265.
#   --pip SPEC       add SPEC to the job's runtime_env "pip" list (repeatable), for
#                    nodes that lack one of distbp's dependencies.  Off by default.
#   --submission-id ID   job id (default distbp-<date>-<time>-<random>).
#   --no-wait        submit and return; follow with `ray job logs -f ID`.
#
# How the job gets distbp: the repository root is the job's working_dir.  Ray uploads
# it (minus runs/, data/, .git/, *.npz, caches; .gitignore is honoured too) and unpacks
# it on every node that runs a part of the job; the driver starts in that directory, so
# `python -m distbp` imports the uploaded package, and Ray puts the same directory on the
# workers' import path.  The nodes need only Python with ray[default], numpy and
# threadpoolctl (or use --pip).
#
# Where results go: the driver runs on the HEAD node.  Without --out, this script adds
# --out "$HOME/distbp-runs/<submission-id>" (expanded on the head node).  A relative
# --out would land in the job's temporary copy of the working_dir, so it is refused.
# A URL (--out s3://bucket/run) is uploaded to as the run goes, from the head node.
# Unless the train options hold --address, `--address auto` is added (inside a job
# RAY_ADDRESS points at the cluster).
#
# Authentication stays on: RAY_AUTH_MODE=token, with the token from RAY_AUTH_TOKEN,
# else RAY_AUTH_TOKEN_PATH, else local_cluster.sh's token when submitting to that
# cluster, else ~/.ray/auth_token.  The token travels in the Authorization header only;
# it is never put in the job's runtime_env (job specs are readable via the API).
set -euo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
STATE_DIR="${DISTBP_CLUSTER_DIR:-$HOME/.distbp/cluster}"

die2() { echo "$PROG: $1" >&2; exit 2; }

ADDRESS=""
SUBMISSION_ID=""
NO_WAIT=""
PIP=()
while [ $# -gt 0 ]; do
    case "$1" in
        --address) [ $# -ge 2 ] || die2 "--address needs a URL"; ADDRESS=$2; shift 2 ;;
        --address=*) ADDRESS=${1#*=}; shift ;;
        --pip) [ $# -ge 2 ] || die2 "--pip needs a requirement"; PIP+=("$2"); shift 2 ;;
        --submission-id) [ $# -ge 2 ] || die2 "--submission-id needs a value"; SUBMISSION_ID=$2; shift 2 ;;
        --no-wait) NO_WAIT=1; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        --) shift; break ;;
        *) die2 "unknown option '$1' (train options go after --; see --help)" ;;
    esac
done
TRAIN_ARGS=("$@")

RAY_BIN="${DISTBP_RAY:-$(command -v ray || true)}"
[ -n "$RAY_BIN" ] && [ -x "$RAY_BIN" ] || die2 "no 'ray' executable found: install ray[default] or set DISTBP_RAY"
# The python that runs `ray` (it has the ray package): for the status query below.
PY=$(head -n 1 "$RAY_BIN" | sed -n 's/^#! *//p' | awk '{print $1}')
if [ -z "$PY" ] || [ ! -x "$PY" ] || [ "$(basename "$PY")" = env ]; then
    PY=$(command -v python3 || command -v python || true)
fi
[ -n "$PY" ] || die2 "no python found next to $RAY_BIN"

# ------------------------------------------------------------------ address
local_dash_port() {
    [ -f "$STATE_DIR/cluster.info" ] && [ -s "$STATE_DIR/nodes" ] || return 1
    sed -n 's/^DASH_PORT=//p' "$STATE_DIR/cluster.info"
}
if [ -z "$ADDRESS" ]; then
    if [ -n "${RAY_API_SERVER_ADDRESS:-}" ]; then
        ADDRESS=$RAY_API_SERVER_ADDRESS
    elif [[ "${RAY_ADDRESS:-}" == http://* || "${RAY_ADDRESS:-}" == https://* ]]; then
        ADDRESS=$RAY_ADDRESS
    elif port=$(local_dash_port) && [ -n "$port" ]; then
        ADDRESS="http://127.0.0.1:$port"
    else
        ADDRESS="http://127.0.0.1:8265"
    fi
fi
[[ "$ADDRESS" == http://* || "$ADDRESS" == https://* ]] ||
    die2 "--address must be the jobs API URL, e.g. http://127.0.0.1:8265 (got '$ADDRESS')"
# The Ray CLI lets RAY_API_SERVER_ADDRESS override --address: make them agree.
export RAY_API_SERVER_ADDRESS="$ADDRESS"

# ------------------------------------------------------------------ auth
if [ -n "${RAY_AUTH_MODE:-}" ] && [ "$RAY_AUTH_MODE" != token ]; then
    echo "$PROG: RAY_AUTH_MODE=$RAY_AUTH_MODE ignored: this script always uses token authentication" >&2
fi
export RAY_AUTH_MODE=token
if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
    TOKEN_SOURCE="RAY_AUTH_TOKEN"
elif [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; then
    [ -s "$RAY_AUTH_TOKEN_PATH" ] || die2 "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty"
    TOKEN_SOURCE="$RAY_AUTH_TOKEN_PATH"
elif port=$(local_dash_port) && [ "$ADDRESS" = "http://127.0.0.1:$port" ] && [ -s "$STATE_DIR/auth_token" ]; then
    export RAY_AUTH_TOKEN_PATH="$STATE_DIR/auth_token"
    TOKEN_SOURCE="$RAY_AUTH_TOKEN_PATH (local_cluster.sh)"
elif [ -s "$HOME/.ray/auth_token" ]; then
    TOKEN_SOURCE="$HOME/.ray/auth_token"
else
    die2 "no auth token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put the cluster's token in ~/.ray/auth_token"
fi

# ------------------------------------------------------------------ job
[ -f "$ROOT/distbp/__main__.py" ] || [ -f "$ROOT/distbp/__init__.py" ] ||
    die2 "$ROOT does not look like the distbp repository (no distbp/ package)"
SUBMISSION_ID=${SUBMISSION_ID:-distbp-$(date +%Y%m%d-%H%M%S)-$RANDOM}
[[ "$SUBMISSION_ID" =~ ^[A-Za-z0-9_.-]+$ ]] || die2 "--submission-id may hold only letters, digits, '_', '.', '-'"

has_address=""; out=""
for ((i = 0; i < ${#TRAIN_ARGS[@]}; i++)); do
    case "${TRAIN_ARGS[$i]}" in
        --address|--address=*) has_address=1 ;;
        --out) out="${TRAIN_ARGS[$((i + 1))]:-}" ;;
        --out=*) out="${TRAIN_ARGS[$i]#--out=}" ;;
    esac
done
[ -n "$has_address" ] || TRAIN_ARGS=(--address auto "${TRAIN_ARGS[@]}")
if [ -n "$out" ] && [[ "$out" != /* ]] && [[ "$out" != *://* ]]; then
    die2 "--out must be an absolute path on the head node (a relative path lands in the job's temporary working_dir)"
fi

RUNTIME_ENV=$(SUB_PIP="$(printf '%s\n' "${PIP[@]+"${PIP[@]}"}")" "$PY" -c '
import json, os
env = {"excludes": ["runs/", "data/", ".git/", "*.npz", "__pycache__/", ".pytest_cache/",
                    ".ruff_cache/", ".mypy_cache/", "*.egg-info/", ".venv/", "venv/"]}
pip = [p for p in os.environ["SUB_PIP"].splitlines() if p]
if pip:
    env["pip"] = pip
print(json.dumps(env))
')

if [ -z "$out" ]; then
    # `sh -c` so that $HOME expands on the head node, where the driver runs.
    ENTRYPOINT=(sh -c "exec python -m distbp train \"\$@\" --out \"\$HOME/distbp-runs/$SUBMISSION_ID\"" distbp-train "${TRAIN_ARGS[@]}")
    OUT_DESC="\$HOME/distbp-runs/$SUBMISSION_ID on the head node"
else
    ENTRYPOINT=(python -m distbp train "${TRAIN_ARGS[@]}")
    OUT_DESC="$out on the head node"
    [[ "$out" != *://* ]] || OUT_DESC="$out"
fi

echo "$PROG: submitting $SUBMISSION_ID to $ADDRESS (token: $TOKEN_SOURCE)"
echo "$PROG: working_dir $ROOT; results: $OUT_DESC"
rc=0
timeout "${DISTBP_SUBMIT_TIMEOUT:-86400}" "$RAY_BIN" job submit --address "$ADDRESS" \
    --submission-id "$SUBMISSION_ID" --working-dir "$ROOT" --runtime-env-json "$RUNTIME_ENV" \
    ${NO_WAIT:+--no-wait} -- "${ENTRYPOINT[@]}" || rc=$?

if [ -n "$NO_WAIT" ]; then
    [ "$rc" -eq 0 ] || exit "$rc"
    echo "$PROG: follow with: ray job logs -f $SUBMISSION_ID   (stop: ray job stop $SUBMISSION_ID)"
    exit 0
fi

# `ray job submit` exits 0 for a STOPPED job and may lose the log stream: ask for the
# final status explicitly.
status=$(timeout 60 "$PY" -c '
import sys
from ray.job_submission import JobSubmissionClient
print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)
' "$ADDRESS" "$SUBMISSION_ID" 2>/dev/null | tail -n 1 || true)
if [ -z "$status" ]; then
    echo "$PROG: could not submit or query job $SUBMISSION_ID at $ADDRESS (see the error above)" >&2
    exit "$([ "$rc" -ne 0 ] && echo "$rc" || echo 1)"
fi
echo "$PROG: job $SUBMISSION_ID finished with status $status"
case "$status" in
    SUCCEEDED) echo "$PROG: results: $OUT_DESC"; exit 0 ;;
    PENDING|RUNNING)
        echo "$PROG: the job is still $status; stop it with: ray job stop $SUBMISSION_ID" >&2
        exit 1 ;;
    *) exit 1 ;;
esac
