#!/usr/bin/env bash
# Ferry host check: a runc container with an established TCP connection is checkpointed with CRIU
# and restored, and the connection (and the process's memory) must survive. Run as root after
# deploy/host/setup.sh. Cleans up everything it creates (FERRY_VERIFY_KEEP=1 keeps the temp dir
# with the CRIU images and logs). Exit 0 = host is fit for Ferry.
#
# What it does (the same things ferry-agent does):
#  - OCI bundle in a temp dir; rootfs = one static binary (echo-server.c built with gcc -static);
#  - network namespace created by `ip netns add ferry-verify` and given to runc as a PATH in
#    config.json (so CRIU treats it as external and restores into it); lo up, veth with an IP;
#  - no rlimits in config.json (they must be <= the current hard limits, which cannot be raised);
#  - container stdio = anonymous pipes (CRIU cannot dump fds of host files; runc restore hands its
#    own stdio pipes to CRIU as --inherit-fd for the dumped pipes);
#  - runs under `tini -s` (child subreaper) because PID 1 here does not reap orphans;
#  - a client in the host namespace connects through the veth, then
#    `runc checkpoint --tcp-established` / `runc restore --tcp-established -d`, then the same
#    connection must still answer, with the server's in-memory counter continuing.
set -euo pipefail

NAME=ferry-verify
PORT=7000
HOST_IF=fv-host
CT_IF=fv-ct
HOST_IP=10.251.0.1
CT_IP=10.251.0.2
PLEN=30
NETNS=/run/netns/$NAME
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

say() { printf '%s\n' "$*"; }
die() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }
ms_now() { date +%s%3N; }

[ "$(id -u)" -eq 0 ] || die "verify.sh must run as root"
for t in runc criu tini ip nsenter gcc iptables-restore; do
  command -v "$t" >/dev/null || die "$t not found on PATH (run deploy/host/setup.sh)"
done

# Be a child subreaper: orphans of runc (the container's init, the restored tree after criu exits)
# are re-parented to us and reaped, instead of to a PID 1 that leaves zombies.
if [ -z "${FERRY_VERIFY_REAPER:-}" ]; then
  FERRY_VERIFY_REAPER=1 exec tini -s -g -- "$BASH" "${BASH_SOURCE[0]}" "$@"
fi

W=$(mktemp -d /tmp/ferry-verify.XXXXXX)
RUNC=(runc --root "$W/runc-state")
CLIENT_OPEN=0

cleanup() {
  set +e
  [ "$CLIENT_OPEN" = 1 ] && exec 3>&-
  "${RUNC[@]}" delete -f "$NAME" >/dev/null 2>&1
  ip netns del "$NAME" 2>/dev/null
  ip link del "$HOST_IF" 2>/dev/null
  # the netns' veth goes away asynchronously; wait so a re-run can reuse the name
  for _ in $(seq 50); do ip link show "$HOST_IF" >/dev/null 2>&1 || break; sleep 0.1; done
  if [ -n "${FERRY_VERIFY_KEEP:-}" ]; then say "kept: $W (images, criu logs)"; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# leftovers of an interrupted run
if [ -e "$NETNS" ] || ip link show "$HOST_IF" >/dev/null 2>&1; then
  die "$NETNS or link $HOST_IF already exists (another verify.sh running, or a leftover: ip netns del $NAME; ip link del $HOST_IF)"
fi
ip -4 -o addr show | grep -qF " ${HOST_IP%.*}." && die "addresses ${HOST_IP%.*}.x are already in use on this host"

say "criu: $(criu --version | awk '/^Version:/ {print $2}') ($(readlink -f "$(command -v criu)")), runc: $(runc --version | awk 'NR==1 {print $3}')"

# ---- bundle -------------------------------------------------------------------------------------
mkdir -p "$W/bundle/rootfs"/{proc,dev,sys,tmp} "$W/img" "$W/work-dump" "$W/work-restore"
gcc -static -O2 -o "$W/bundle/rootfs/echo-server" "$HERE/echo-server.c" \
  || die "cannot build a static binary (gcc + libc6-dev needed)"

cat >"$W/bundle/config.json" <<EOF
{
  "ociVersion": "1.0.2",
  "process": {
    "terminal": false,
    "user": { "uid": 0, "gid": 0 },
    "args": [ "/echo-server", "$PORT" ],
    "env": [ "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" ],
    "cwd": "/",
    "capabilities": {
      "bounding": [ "CAP_NET_BIND_SERVICE" ], "effective": [ "CAP_NET_BIND_SERVICE" ],
      "permitted": [ "CAP_NET_BIND_SERVICE" ]
    },
    "noNewPrivileges": true
  },
  "root": { "path": "rootfs", "readonly": false },
  "hostname": "$NAME",
  "mounts": [
    { "destination": "/proc", "type": "proc", "source": "proc" },
    { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": [ "nosuid", "strictatime", "mode=755", "size=65536k" ] },
    { "destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": [ "nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620" ] },
    { "destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": [ "nosuid", "noexec", "nodev", "mode=1777", "size=65536k" ] },
    { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": [ "nosuid", "noexec", "nodev" ] },
    { "destination": "/sys", "type": "sysfs", "source": "sysfs", "options": [ "nosuid", "noexec", "nodev", "ro" ] },
    { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": [ "nosuid", "nodev", "mode=1777", "size=16m" ] }
  ],
  "linux": {
    "cgroupsPath": "/$NAME",
    "resources": {
      "devices": [ { "allow": false, "access": "rwm" } ],
      "memory": { "limit": 67108864 },
      "pids": { "limit": 64 }
    },
    "namespaces": [
      { "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" },
      { "type": "network", "path": "$NETNS" }
    ],
    "maskedPaths": [ "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
      "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi" ],
    "readonlyPaths": [ "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger" ]
  }
}
EOF

# ---- network namespace --------------------------------------------------------------------------
ip netns add "$NAME"
ip link add "$HOST_IF" type veth peer name "$CT_IF"
ip link set "$CT_IF" netns "$NAME"
ip -n "$NAME" link set lo up
ip -n "$NAME" addr add "$CT_IP/$PLEN" dev "$CT_IF"
ip -n "$NAME" link set "$CT_IF" up
ip addr add "$HOST_IP/$PLEN" dev "$HOST_IF"
ip link set "$HOST_IF" up
say "ok: netns $NETNS, $HOST_IF $HOST_IP <-> $CT_IF $CT_IP"

# ---- run ----------------------------------------------------------------------------------------
# stdio: stdin = a pipe whose writer is gone (EOF), stdout/stderr = pipes into cat -> log files.
# -d: runc passes its own stdio straight to the container's process (no terminal).
"${RUNC[@]}" run -d --bundle "$W/bundle" --pid-file "$W/pid" "$NAME" \
  < <(:) > >(exec cat >>"$W/ct.out") 2> >(exec cat >>"$W/ct.err") \
  || die "runc run failed: $(cat "$W/ct.err" 2>/dev/null)"
say "ok: container $NAME running, pid $(cat "$W/pid")"

for _ in $(seq 50); do
  nsenter --net="$NETNS" cat /proc/net/tcp | awk '$4 == "0A"' | grep -qi ":$(printf '%04X' $PORT) " && break
  sleep 0.1
done

# ---- client from the host, through the veth -----------------------------------------------------
exec 3<>"/dev/tcp/$CT_IP/$PORT"
CLIENT_OPEN=1
ask() { # $1 = message, $2 = expected reply, $3 = timeout
  local reply
  printf '%s\n' "$1" >&3
  IFS= read -r -t "$3" reply <&3 || die "no reply to '$1' within $3 s"
  [ "$reply" = "$2" ] || die "reply to '$1' was '$reply', expected '$2'"
  say "ok: '$1' -> '$reply'"
}
ask hello-1 "n=1 hello-1" 5
ask hello-2 "n=2 hello-2" 5
say "connection: $(ss -tnH state established dst "$CT_IP" | awk '{print $3, $4}')"

# ---- checkpoint ---------------------------------------------------------------------------------
t0=$(ms_now)
"${RUNC[@]}" checkpoint --tcp-established --image-path "$W/img" --work-path "$W/work-dump" "$NAME" \
  </dev/null >"$W/checkpoint.log" 2>&1 \
  || { cat "$W/checkpoint.log" "$W/work-dump/dump.log" >&2 2>/dev/null; die "runc checkpoint failed"; }
t1=$(ms_now)
say "ok: checkpoint in $((t1 - t0)) ms, images $(du -sh "$W/img" | cut -f1)"
"${RUNC[@]}" state "$NAME" >/dev/null 2>&1 && die "container still exists after checkpoint"
# CRIU leaves the whole namespace locked (iptables chain CRIU, DROP all but lo) until a restore
# unlocks it: packets that arrive meanwhile are dropped (client retransmits) instead of RST.
# A re-created namespace on another host has no such lock: install it before switching the path.
lock_rules() { nsenter --net="$NETNS" iptables-save 2>/dev/null | grep -c -- '-j DROP\|^:CRIU' || true; }
say "info: netns lock after checkpoint: $(lock_rules) iptables lines (chain CRIU)"
nsenter --net="$NETNS" iptables-save 2>/dev/null | sed -n '/^\*filter/,/^COMMIT/p' | sed 's/^/info:   /'

# data sent while the container is frozen/gone: must be answered after restore (TCP retransmission)
printf '%s\n' during-downtime >&3

# ---- restore ------------------------------------------------------------------------------------
t2=$(ms_now)
"${RUNC[@]}" restore -d --tcp-established --image-path "$W/img" --work-path "$W/work-restore" \
  --bundle "$W/bundle" --pid-file "$W/pid2" "$NAME" \
  < <(:) > >(exec cat >>"$W/ct.out") 2> >(exec cat >>"$W/ct.err") \
  || { cat "$W/ct.err" "$W/work-restore/restore.log" >&2 2>/dev/null; die "runc restore failed"; }
t3=$(ms_now)
say "info: netns lock after restore: $(lock_rules) iptables lines"
say "ok: restore in $((t3 - t2)) ms, pid $(cat "$W/pid2"), state $("${RUNC[@]}" state "$NAME" | awk -F'"' '/"status"/ {print $4}')"

IFS= read -r -t 10 reply <&3 || die "no reply to the data sent during the downtime"
[ "$reply" = "n=3 during-downtime" ] || die "reply after restore was '$reply', expected 'n=3 during-downtime'"
say "ok: 'during-downtime' -> '$reply' (sent while checkpointed, answered after restore)"
ask hello-3 "n=4 hello-3" 5

# ---- second round: checkpoint/restore the restored container again ------------------------------
rm -rf "$W/img" "$W/work-dump" "$W/work-restore"; mkdir -p "$W/img" "$W/work-dump" "$W/work-restore"
"${RUNC[@]}" checkpoint --tcp-established --image-path "$W/img" --work-path "$W/work-dump" "$NAME" \
  </dev/null >"$W/checkpoint.log" 2>&1 \
  || { cat "$W/checkpoint.log" "$W/work-dump/dump.log" >&2 2>/dev/null; die "second runc checkpoint failed"; }
"${RUNC[@]}" restore -d --tcp-established --image-path "$W/img" --work-path "$W/work-restore" \
  --bundle "$W/bundle" --pid-file "$W/pid2" "$NAME" \
  < <(:) > >(exec cat >>"$W/ct.out") 2> >(exec cat >>"$W/ct.err") \
  || { cat "$W/ct.err" "$W/work-restore/restore.log" >&2 2>/dev/null; die "second runc restore failed"; }
ask hello-4 "n=5 hello-4" 5
say "ok: second checkpoint/restore round"

grep -q "listening on $PORT" "$W/ct.out" || die "container stdout did not reach the log (stdio pipes)"
say "PASS: TCP connection survived runc checkpoint/restore (--tcp-established) with CRIU $(criu --version | awk '/^Version:/ {print $2}')"
