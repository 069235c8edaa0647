#!/bin/bash
# COAT's per-host commands (its base_scripts/ and podman calls), run on an edge host over SSH by
# coat-migrate.sh. Each sub-command does one migration step and prints, as its last line,
# `real_ms=<N>`: the time of the step's actual work measured on this host, which the caller
# subtracts from its own wall time to get the SSH overhead (COAT: `perf stat` on both sides).
#
#   coat-remote.sh checkpoint RUNC_ROOT NAME BUNDLE OUT_DIR      runc checkpoint --tcp-established, then
#                                                               one uncompressed tar (images, rootfs diff,
#                                                               config.json), like `podman checkpoint -e
#                                                               --compress=none`
#   coat-remote.sh clear-ns NETNS PORT OVS_RUNDIR               delete the namespace and its OVS port
#   coat-remote.sh fetch SSH_KEY SRC_IP SRC_TAR DST_DIR         scp the tar from the source (COAT: the
#                                                               destination pulls)
#   coat-remote.sh create-ns NETNS PORT OVS_RUNDIR IP/N MAC     re-create the namespace, CRIU's network lock
#                                                               first; prints ofport=<N>
#   coat-remote.sh flows OVS_RUNDIR COOKIE IP OFPORT            point the container's two rules at OFPORT
#   coat-remote.sh restore RUNC_ROOT NAME TAR WORK_DIR LOWER NETNS_PATH CGROUP
#                                                               unpack, mount the rootfs, runc restore
#                                                               --tcp-established -d
#   coat-remote.sh cleanup RUNC_ROOT NAME WORK_DIR              after a run: delete what the baseline made
set -euo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
BRIDGE=br-ferry
# CRIU 4.2.1's lock, byte for byte (packages/agent/src/net/netns.ts CRIU_LOCK_RULES).
CRIU_LOCK=$'*filter\n:CRIU - [0:0]\n-I INPUT -j CRIU\n-I OUTPUT -j CRIU\n-A CRIU -m mark --mark 0xC114 -j ACCEPT\n-A CRIU -j DROP\nCOMMIT\n'

t0=$(date +%s%N)
done_ms() { echo "real_ms=$(( ($(date +%s%N) - t0) / 1000000 ))"; }

# Anonymous pipes as the container's stdio, held by a `cat` relay (runc.ts LAUNCH): what CRIU dumped
# were pipes, and runc restore -d maps them onto its own stdio.
launch() {
  local log=$1 runclog=$2; shift 2
  : >"$runclog"
  setsid bash -c '
    log=$1; shift
    coproc RELAY { exec cat 3>&1 >>"$log" 2>/dev/null; }
    "$@" <&"${RELAY[0]}" >&"${RELAY[1]}" 2>&"${RELAY[1]}"
  ' coat-launch "$log" "$@" || { tail -c 2000 "$runclog" >&2; return 1; }
}

cmd=$1; shift
case "$cmd" in
  checkpoint)
    root=$1 name=$2 bundle=$3 out=$4
    rm -rf "$out"; mkdir -p "$out/images" "$out/work"
    runc --root "$root" checkpoint --tcp-established --image-path "$out/images" --work-path "$out/work" "$name"
    # The rootfs diff (overlay upper dir, with whiteouts) and the OCI config travel with the images.
    tar --xattrs --xattrs-include='trusted.overlay.*' --numeric-owner -C "$(dirname "$bundle")/upper" -cf "$out/upper.tar" .
    cp "$bundle/config.json" "$out/config.json"
    tar -C "$out" -cf "$out.tar" images upper.tar config.json
    done_ms ;;
  clear-ns)
    ns=$1 port=$2 rundir=$3
    OVS_RUNDIR=$rundir ovs-vsctl --db="unix:$rundir/db.sock" --if-exists del-port "$BRIDGE" "$port"
    ip netns del "$ns" 2>/dev/null || true
    done_ms ;;
  fetch)
    key=$1 src=$2 tar=$3 dir=$4
    mkdir -p "$dir"
    scp -q -i "$key" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes \
      "root@$src:$tar" "$dir/"
    done_ms ;;
  create-ns)
    ns=$1 port=$2 rundir=$3 cidr=$4 mac=$5
    ip netns add "$ns"
    # The lock before any link is up: a retransmission reaching an unlocked namespace gets a RST.
    nsenter --net="/run/netns/$ns" iptables-restore -w --noflush <<<"$CRIU_LOCK"
    if [ -e /proc/net/if_inet6 ]; then nsenter --net="/run/netns/$ns" ip6tables-restore -w --noflush <<<"$CRIU_LOCK"; fi
    export OVS_RUNDIR=$rundir
    ovs-vsctl --db="unix:$rundir/db.sock" --may-exist add-port "$BRIDGE" "$port" -- set Interface "$port" type=internal \
      -- set Port "$port" external_ids:ferry-owner=coat
    ip link set "$port" netns "$ns"
    ip -n "$ns" -batch - <<EOF
link set $port name eth0
link set eth0 address $mac mtu 1450
addr add $cidr dev eth0
link set lo up
link set eth0 up
EOF
    echo "ofport=$(ovs-vsctl --db="unix:$rundir/db.sock" get Interface "$port" ofport)"
    done_ms ;;
  flows)
    rundir=$1 cookie=$2 ip=$3 ofport=$4
    printf 'delete cookie=%s/-1\nadd table=0,priority=100,cookie=%s,ip,nw_dst=%s,actions=output:%s\nadd table=0,priority=100,cookie=%s,arp,arp_tpa=%s,actions=output:%s\n' \
      "$cookie" "$cookie" "$ip" "$ofport" "$cookie" "$ip" "$ofport" |
      OVS_RUNDIR=$rundir ovs-ofctl -O OpenFlow14 --bundle add-flows "$BRIDGE" -
    done_ms ;;
  restore)
    root=$1 name=$2 tar=$3 dir=$4 lower=$5 netns=$6 cgroup=$7
    rm -rf "$dir/cp" "$dir/bundle" "$dir/upper" "$dir/ovl-work"
    mkdir -p "$dir/cp" "$dir/bundle/rootfs" "$dir/upper" "$dir/ovl-work"
    tar -C "$dir/cp" -xf "$tar"
    mkdir -p "$dir/cp/work"
    tar --xattrs --xattrs-include='trusted.overlay.*' --numeric-owner -p -C "$dir/upper" -xf "$dir/cp/upper.tar"
    mount -t overlay "coat-$name" -o "lowerdir=$lower,upperdir=$dir/upper,workdir=$dir/ovl-work" "$dir/bundle/rootfs"
    # Same container, this host's namespace path and cgroup.
    jq --arg ns "$netns" --arg cg "$cgroup" \
      '.root.path = "rootfs" | .linux.cgroupsPath = $cg | .linux.namespaces |= map(if .type == "network" then .path = $ns else . end)' \
      "$dir/cp/config.json" >"$dir/bundle/config.json"
    launch "$dir/container.log" "$dir/runc.log" runc --log "$dir/runc.log" --root "$root" restore -d --tcp-established \
      --image-path "$dir/cp/images" --work-path "$dir/cp/work" --bundle "$dir/bundle" --pid-file "$dir/container.pid" "$name"
    done_ms ;;
  cleanup)
    root=$1 name=$2 dir=$3
    runc --root "$root" delete --force "$name" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      mountpoint -q "$dir/bundle/rootfs" || break
      umount "$dir/bundle/rootfs" 2>/dev/null || sleep 0.1
    done
    rm -rf "$dir"
    done_ms ;;
  *) echo "coat-remote.sh: unknown command $cmd" >&2; exit 2 ;;
esac
