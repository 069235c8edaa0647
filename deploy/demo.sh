#!/usr/bin/env bash
# The demo: the smallest real thing Ferry does end to end today. A controller and an agent with
# mTLS on this machine, the agent registered, the host listed through the admin CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
work=.ferry/demo
rm -rf "$work" && mkdir -p "$work"
deploy/certs.sh "$work/certs" controller:controller admin:admin agent:edge-a >/dev/null
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

start() { # name log -- command...
  local log=$1; shift
  "$@" >"$log.out" 2>"$log.err" &
  pids+=($!)
  for _ in $(seq 100); do
    grep -q ' ready port=' "$log.out" 2>/dev/null && { sed -n 's/.* ready port=\([0-9]*\).*/\1/p' "$log.out"; return; }
    sleep 0.1
  done
  echo "demo: $1 did not start:" >&2; cat "$log.err" >&2; exit 1
}

agent_port=$(start "$work/agent" tini -s -- node packages/agent/dist/main.js --name edge-a --listen 127.0.0.1:0 \
  --state-dir "$work/agent-state" --tls-dir "$work/certs")
ctl_port=$(start "$work/controller" node packages/controller/dist/main.js --listen 127.0.0.1:0 \
  --state-dir "$work/controller-state" --tls-dir "$work/certs")
export FERRY_CONTROLLER=127.0.0.1:$ctl_port FERRY_TLS_DIR=$work/certs
bin/ferry host add edge-a "127.0.0.1:$agent_port" >/dev/null
echo "== ferry hosts"
bin/ferry hosts
