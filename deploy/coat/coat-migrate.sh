#!/bin/bash
# The BASELINE: COAT's migration procedure as COAT ran it (run_sockperf_test.sh): a script on the
# CLIENT host drives every step on the edge hosts over SSH, one step after the other:
#
#   1   checkpoint      ssh SRC  runc checkpoint --tcp-established (+ tar, as `podman checkpoint -e`)
#   2.1 clear-ns        ssh SRC  delete the container's namespace and OVS port
#   2.2 transfer        ssh DST  scp SRC:checkpoint.tar (the destination pulls)
#   2.3 create-ns       ssh DST  namespace with the same IP and MAC, CRIU's network lock installed first
#   3   flows           locally on the client host's OVS (COAT's set_flow.sh), then ssh DST and ssh SRC
#                       (our overlay has rules on every host; COAT's edge bridges forwarded NORMAL)
#   4   restore         ssh DST  runc restore --tcp-established -d
#
# Plain ssh: a new connection per command, no ControlMaster (COAT had none). Each remote command
# reports the time of its own work (real_ms); SSH overhead = wall time - real time, as COAT did.
# Prints one JSON object: steps with wall_ms / real_ms / ssh_ms, total_ms, downtime_ms.
#
#   coat-migrate.sh --key KEY --name NAME --ip A.B.C.D/N --mac MAC \
#     --src-ip IP --src-runc-root DIR --src-bundle DIR --src-netns NS --src-ovs DIR --src-work DIR --src-vx-to-dst N \
#     --dst-ip IP --dst-runc-root DIR --dst-netns NS --dst-ovs DIR --dst-work DIR --dst-lower DIR --dst-cgroup PATH \
#     --client-ovs DIR --client-vx-to-dst N
set -euo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
here=$(cd "$(dirname "$0")" && pwd)
remote="$here/coat-remote.sh"

declare -A o
while [ $# -gt 0 ]; do
  case "$1" in
    --*) o[${1#--}]=$2; shift 2 ;;
    *) echo "coat-migrate.sh: unexpected argument $1" >&2; exit 2 ;;
  esac
done
for k in key name ip mac src-ip src-runc-root src-bundle src-netns src-ovs src-work src-vx-to-dst \
         dst-ip dst-runc-root dst-netns dst-ovs dst-work dst-lower dst-cgroup client-ovs client-vx-to-dst; do
  [ -n "${o[$k]:-}" ] || { echo "coat-migrate.sh: --$k is required" >&2; exit 2; }
done

name=${o[name]}
addr=${o[ip]%/*}
# The agent's conventions: port "fv" + 8 hex of sha256(<host netns prefix><container>), namespace
# <host netns prefix><container>; so the ports are those the agent would have made.
port_of() { printf 'fv%s' "$(printf '%s' "$1" | sha256sum | cut -c1-8)"; }
src_prefix=${o[src-netns]%"$name"}
dst_prefix=${o[dst-netns]%"$name"}
src_port=$(port_of "$src_prefix$name")
dst_port=$(port_of "$dst_prefix$name")
IFS=. read -r a b c d <<<"$addr"
cookie=$(printf '0x%x' $(( 0xfe00000000 + (a << 24) + (b << 16) + (c << 8) + d )))

SSH=(ssh -i "${o[key]}" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes)
now() { date +%s%N; }
steps=()
# step NAME HOST CMD...: run a remote step over ssh, record wall and remote times; sets $out.
step() {
  local sname=$1 host=$2; shift 2
  local t=$(now)
  out=$("${SSH[@]}" "root@$host" "$remote" "$@")
  local wall=$(( ($(now) - t) / 1000000 ))
  local real=$(sed -n 's/^real_ms=//p' <<<"$out" | tail -1)
  steps+=("{\"name\":\"$sname\",\"wall_ms\":$wall,\"real_ms\":${real:-0},\"ssh_ms\":$(( wall - ${real:-0} ))}")
}

t_start=$(now)
step checkpoint "${o[src-ip]}" checkpoint "${o[src-runc-root]}" "$name" "${o[src-bundle]}" "${o[src-work]}/$name"
t_frozen=$t_start
step clear-ns "${o[src-ip]}" clear-ns "${o[src-netns]}" "$src_port" "${o[src-ovs]}"
step transfer "${o[dst-ip]}" fetch "${o[key]}" "${o[src-ip]}" "${o[src-work]}/$name.tar" "${o[dst-work]}/$name"
step create-ns "${o[dst-ip]}" create-ns "${o[dst-netns]}" "$dst_port" "${o[dst-ovs]}" "${o[ip]}" "${o[mac]}"
ofport=$(sed -n 's/^ofport=//p' <<<"$out")

# Step 3: the client's own switch locally (no SSH), then each edge host's over ssh.
t=$(now)
out=$("$remote" flows "${o[client-ovs]}" "$cookie" "$addr" "${o[client-vx-to-dst]}")
local_real=$(sed -n 's/^real_ms=//p' <<<"$out")
out_dst=$("${SSH[@]}" "root@${o[dst-ip]}" "$remote" flows "${o[dst-ovs]}" "$cookie" "$addr" "$ofport")
out_src=$("${SSH[@]}" "root@${o[src-ip]}" "$remote" flows "${o[src-ovs]}" "$cookie" "$addr" "${o[src-vx-to-dst]}")
wall=$(( ($(now) - t) / 1000000 ))
real=$(( local_real + $(sed -n 's/^real_ms=//p' <<<"$out_dst") + $(sed -n 's/^real_ms=//p' <<<"$out_src") ))
steps+=("{\"name\":\"flows\",\"wall_ms\":$wall,\"real_ms\":$real,\"ssh_ms\":$(( wall - real ))}")

step restore "${o[dst-ip]}" restore "${o[dst-runc-root]}" "$name" "${o[dst-work]}/$name/$name.tar" "${o[dst-work]}/$name" \
  "${o[dst-lower]}" "/run/netns/${o[dst-netns]}" "${o[dst-cgroup]}"
t_end=$(now)

total=$(( (t_end - t_start) / 1000000 ))
IFS=,
printf '{"tool":"coat-migrate","container":"%s","total_ms":%d,"downtime_ms":%d,"steps":[%s]}\n' \
  "$name" "$total" $(( (t_end - t_frozen) / 1000000 )) "${steps[*]}"
