// The network lock of a container's namespace: while it holds, everything but CRIU's own marked
// packets is dropped, so a client's segments meet neither a socket being dumped (whose state
// would then move on without the checkpoint) nor an empty namespace (a RST), and are sent again
// once the container runs where the path leads.
//
// CRIU's own iptables lock costs a restore 8 iptables-restore processes, one after another, and
// each removal waits for the kernel's RCU grace period (10-20 ms here, the CPU idle): ~100 ms
// of every downtime. Ferry's containers tell CRIU to skip it and to run {@link CRIU_NETWORK_SCRIPT}
// instead, where CRIU would lock and unlock (runtime/container-runtime.ts, criu.conf): the same
// rules, at the same moments (the unlock before the restored sockets leave repair mode and send
// their window probes), one transaction per address family, both families at once. The agent
// locks a destination's namespace with the same rules (NetNs.create) until the restore unlocks it.
import { exec } from "@ferry/common";

/**
 * CRIU 4.2.1's network lock, byte for byte (criu/net.c `iptables_network_lock_internal`, read off
 * the installed binary with `strings`), so that a lock made by either (a container dumped by an
 * agent of an older version, whose CRIU still locked) is removed by both.
 */
export const CRIU_LOCK_RULES =
  "*filter\n:CRIU - [0:0]\n-I INPUT -j CRIU\n-I OUTPUT -j CRIU\n-A CRIU -m mark --mark 0xC114 -j ACCEPT\n-A CRIU -j DROP\nCOMMIT\n";
/** The NFQUEUE queue a locked namespace's packets from elsewhere wait in (./hold.ts). */
export const HOLD_QUEUE = 0xc114;
/**
 * The lock Ferry applies: CRIU's, and one rule more before the DROP: what arrives from elsewhere
 * is queued to {@link HOLD_QUEUE}, for ferry-hold to keep until the restore; with nothing bound to
 * the queue the kernel drops it, as CRIU's lock would. Where the kernel lacks NFQUEUE or the
 * addrtype match, the script applies {@link CRIU_LOCK_RULES} instead.
 */
export const HOLD_LOCK_RULES = CRIU_LOCK_RULES.replace(
  "-A CRIU -j DROP\n",
  `-A CRIU -m addrtype ! --src-type LOCAL -j NFQUEUE --queue-num ${HOLD_QUEUE}\n-A CRIU -j DROP\n`,
);
/** First half of CRIU's unlock: remove the jumps (CRIU repeats it while `iptables -C INPUT -j CRIU` still matches). */
export const CRIU_UNLOCK_JUMPS = "*filter\n:CRIU - [0:0]\n-D INPUT -j CRIU\n-D OUTPUT -j CRIU\nCOMMIT\n";
/** Second half of CRIU's unlock: remove the chain. */
export const CRIU_UNLOCK_CHAIN = "*filter\n:CRIU - [0:0]\n-X CRIU\nCOMMIT\n";
/** Both halves in one transaction: all or nothing (it fails, changing nothing, on an unlocked or twice-locked namespace). */
export const UNLOCK_RULES = "*filter\n:CRIU - [0:0]\n-D INPUT -j CRIU\n-D OUTPUT -j CRIU\n-X CRIU\nCOMMIT\n";

/**
 * Run {@link CRIU_NETWORK_SCRIPT} on a namespace by path, as CRIU runs it on a container's: the
 * agent's own lock and unlock are the same code.
 */
async function runScript(action: "network-lock" | "network-unlock", netnsPath: string): Promise<void> {
  await exec("sh", ["-c", CRIU_NETWORK_SCRIPT, "ferry-network-lock"], {
    env: { ...process.env, CRTOOLS_SCRIPT_ACTION: action, FERRY_NETNS: netnsPath },
  });
}

/** Install the lock (both families at once). Not idempotent: a second lock adds a second jump, which {@link unlockNetns} removes too. */
export function lockNetns(netnsPath: string): Promise<void> {
  return runScript("network-lock", netnsPath);
}

/**
 * Remove the lock: one transaction per family, both at once. A family where it fails (never
 * locked, locked twice, half removed) is taken apart step by step, as CRIU does.
 */
export function unlockNetns(netnsPath: string): Promise<void> {
  return runScript("network-unlock", netnsPath);
}

/**
 * The restore's unlock (FERRY_UNLOCK=open): one rule put first in the chain, which lets
 * everything through. Taking rules or chains away waits for the kernel's RCU grace period
 * (12-20 ms here, each family, the CPU idle) and adding them does not: the restore's unlock took
 * 26-66 ms (median ~30) inside the downtime. The runtime takes the lock away right after
 * (ContainerRuntime.restore, with {@link unlockNetns}), while its clients are already served.
 */
export const OPEN_RULES = "*filter\n-I CRIU 1 -j RETURN\nCOMMIT\n";

/** Whether the namespace's IPv4 traffic is locked: a jump to CRIU's chain, which does not let everything through. */
export async function isNetnsLocked(netnsPath: string): Promise<boolean> {
  const { stdout } = await exec("nsenter", [`--net=${netnsPath}`, "iptables-save", "-t", "filter"]);
  const first = /^-A CRIU .*$/m.exec(stdout)?.[0];
  return /^-A INPUT -j CRIU$/m.test(stdout) && first !== "-A CRIU -j RETURN";
}

/**
 * CRIU's action script for Ferry's containers (criu.conf `action-script`), run by CRIU with
 * CRTOOLS_SCRIPT_ACTION and CRTOOLS_INIT_PID (the container's init, in its namespace), and by the
 * agent with FERRY_NETNS (a namespace's path) instead. A failure fails the dump or restore, as
 * CRIU's own lock would. With FERRY_UNLOCK=open (which ContainerRuntime.restore gives runc
 * restore), the unlock opens the lock ({@link OPEN_RULES}) instead of taking it away.
 */
export const CRIU_NETWORK_SCRIPT = `#!/bin/sh
# Written by ferry-agent (net/lock.ts). CRIU runs it at each action of a dump or restore of a Ferry
# container, and it does what CRIU's iptables network lock would: the same rules, one transaction
# per address family, both families at once.
case "$CRTOOLS_SCRIPT_ACTION" in
network-lock | network-unlock) ;;
*) exit 0 ;;
esac
PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
net="--net=\${FERRY_NETNS:-/proc/\${CRTOOLS_INIT_PID:?CRIU did not say which process}/ns/net}"
LOCK='${CRIU_LOCK_RULES}'
HOLD_LOCK='${HOLD_LOCK_RULES}'
UNLOCK='${UNLOCK_RULES}'
OPEN='${OPEN_RULES}'
JUMPS='${CRIU_UNLOCK_JUMPS}'
CHAIN='${CRIU_UNLOCK_CHAIN}'
apply() { printf '%s' "$2" | nsenter "$net" "$1-restore" -w --noflush; }
lock() { apply "$1" "$HOLD_LOCK" 2>/dev/null || apply "$1" "$LOCK"; }
unlock() {
  if [ "\${FERRY_UNLOCK:-}" = open ]; then apply "$1" "$OPEN" 2>/dev/null && return 0; fi
  apply "$1" "$UNLOCK" 2>/dev/null && return 0
  # not locked, locked twice, or half unlocked: CRIU's own steps
  i=0
  while [ $i -lt 3 ] && nsenter "$net" "$1" -w -C INPUT -j CRIU 2>/dev/null; do
    apply "$1" "$JUMPS" || return 1
    i=$((i + 1))
  done
  ! nsenter "$net" "$1" -w -n -L CRIU >/dev/null 2>&1 || apply "$1" "$CHAIN"
}
do=\${CRTOOLS_SCRIPT_ACTION#network-}
$do iptables &
v4=$!
status=0
if [ -e /proc/net/if_inet6 ]; then $do ip6tables || status=1; fi
wait $v4 || status=1
exit $status
`;
