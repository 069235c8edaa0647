#!/usr/bin/env node
// ferry-agent: the host agent. Runs as root on every edge host, under an init that reaps
// orphans (`tini -s`): restored containers are re-parented to the nearest subreaper.
import { access, constants, stat } from "node:fs/promises";
import path from "node:path";
import { parseArgs } from "node:util";
import { FerryError, asFerryError, createLogger, securityFromFlags, useLauncher } from "@ferry/common";
import { startAgent } from "./agent.js";
import { favorCgroupDynmods } from "./runtime/favor-dynmods.js";

const HELP = `usage: ferry-agent --name NAME [--listen ADDR] [--state-dir DIR] (--tls-dir DIR [--tls-name NAME] | --insecure)

  --name NAME        this host's name (default: the hostname)
  --listen ADDR      gRPC address (default 0.0.0.0:7441)
  --state-dir DIR    images, containers, checkpoints (default /var/lib/ferry/agent)
  --tls-dir DIR      CA and certificates made by deploy/certs.sh; presents <tls-name>.crt
  --tls-name NAME    certificate name in --tls-dir (default: --name)
  --insecure         no TLS, no client authentication: local experiments only
  --criu PATH        CRIU binary (default: criu on PATH)
  --runc PATH        runc binary (default: runc on PATH)
  --criu-tools DIR   put first on CRIU's PATH: its \`tar\` writes and reads an empty tmpfs
                     mount's archive itself (deploy/host/criu-tar.c; default
                     /opt/ferry/criu-tools when setup.sh built it there; "" for none)
  --netns-prefix P   container namespaces are /run/netns/<P><name> (default ferry-)
  --netns-link tap|veth
                     how a container's eth0 joins the bridge: an OVS internal port moved into
                     the namespace (default), or a veth pair made across the namespaces
  --ovs-rundir DIR   this host's OVS run dir (default /var/run/openvswitch)
  --ovs-db SOCK      this host's ovsdb-server socket (default <ovs-rundir>/db.sock)
  --bridge BR        the overlay bridge (default br-ferry)
  --page-server-address IP
                     where CRIU page servers listen (default: the --listen host)
  --spawn helper|in-process
                     who spawns runc, criu, ip, ovs-*: a small helper process (default;
                     ferry-spawn, built by \`make build\`), or the agent itself (each spawn
                     then stalls the agent ~0.06 ms per MiB of its resident size: fork copies
                     its page tables)
  --cgroup-favor-dynmods on|off
                     hold a cgroup hierarchy with the kernel's favordynmods option while the
                     agent runs (default on): runc and CRIU then move processes between
                     cgroups without waiting for an RCU grace period each, inside the downtime
                     (runtime/favor-dynmods.ts); forks and exits pay an atomic operation

FERRY_FAILPOINTS (tests only) makes named RPCs fail on purpose, e.g. "restore=1".
`;

/** Where setup.sh builds deploy/host/criu-tar.c (FERRY_PREFIX/criu-tools). */
const CRIU_TOOLS = "/opt/ferry/criu-tools";

/**
 * --criu-tools: absent, the default directory if setup.sh built it; "", none; else it must hold
 * an executable tar. CRIU runs as root what it finds there: the directory and the tar must be
 * root's and writable by no one else.
 */
async function criuTools(flag: string | undefined): Promise<string | undefined> {
  const dir = path.resolve(flag ?? CRIU_TOOLS);
  if (flag === "") return undefined;
  const tar = path.join(dir, "tar");
  const found = await access(tar, constants.X_OK).then(
    () => true,
    () => false,
  );
  if (!found) {
    if (flag === undefined) return undefined;
    throw FerryError.invalid(
      "--criu-tools",
      `${dir} holds no executable tar`,
      'run deploy/host/setup.sh (it builds one there), or pass "" for none',
    );
  }
  for (const p of [dir, tar]) {
    const st = await stat(p);
    if (st.uid !== 0 || (st.mode & 0o022) !== 0) {
      throw FerryError.invalid(
        "--criu-tools",
        `${p} is not root's alone (uid ${st.uid}, mode ${(st.mode & 0o777).toString(8)})`,
        `chown root ${p} && chmod go-w ${p}`,
      );
    }
  }
  return dir;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      name: { type: "string" },
      listen: { type: "string", default: "0.0.0.0:7441" },
      "state-dir": { type: "string", default: "/var/lib/ferry/agent" },
      "tls-dir": { type: "string" },
      "tls-name": { type: "string" },
      insecure: { type: "boolean", default: false },
      criu: { type: "string", default: "criu" },
      runc: { type: "string", default: "runc" },
      "criu-tools": { type: "string" },
      "netns-prefix": { type: "string", default: "ferry-" },
      "netns-link": { type: "string", default: "tap" },
      "ovs-rundir": { type: "string", default: "/var/run/openvswitch" },
      "ovs-db": { type: "string" },
      bridge: { type: "string", default: "br-ferry" },
      "page-server-address": { type: "string" },
      spawn: { type: "string", default: "helper" },
      "cgroup-favor-dynmods": { type: "string", default: "on" },
      help: { type: "boolean", short: "h" },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(HELP);
    return;
  }
  const name = values.name ?? (await import("node:os")).hostname();
  const log = createLogger("ferry-agent").child({ host: name });
  const security = securityFromFlags(values, name);
  if (values.spawn !== "helper" && values.spawn !== "in-process") {
    throw FerryError.invalid("--spawn", `"${values.spawn}" is not a spawn mode`, "use helper (the default) or in-process");
  }
  const netnsLink = values["netns-link"];
  if (netnsLink !== "tap" && netnsLink !== "veth") {
    throw FerryError.invalid("--netns-link", `"${netnsLink}" is not a link mode`, "use tap (the default) or veth");
  }
  const favor = values["cgroup-favor-dynmods"];
  if (favor !== "on" && favor !== "off") {
    throw FerryError.invalid("--cgroup-favor-dynmods", `"${favor}" is neither on nor off`, "use on (the default) or off");
  }
  // runc, criu, ip, ovs-*: spawned by a small helper, so that no spawn stalls the calls being served.
  if (values.spawn === "helper") useLauncher();
  const tools = await criuTools(values["criu-tools"]);
  const dynmods = favor === "on" ? await favorCgroupDynmods({ log }) : undefined;
  const agent = await startAgent({
    name,
    listen: values.listen,
    stateDir: values["state-dir"],
    security,
    criuPath: values.criu,
    runcPath: values.runc,
    criuTools: tools,
    netnsPrefix: values["netns-prefix"],
    netnsLink,
    ovs: { rundir: values["ovs-rundir"], dbSock: values["ovs-db"] ?? `${values["ovs-rundir"]}/db.sock` },
    bridge: values.bridge,
    pageServerAddress: values["page-server-address"] ?? values.listen.replace(/:\d+$/, ""),
    ...(process.env.FERRY_FAILPOINTS ? { failpoints: process.env.FERRY_FAILPOINTS } : {}),
    log,
  });
  log.info(
    { port: agent.port, security: security.mode, criuTools: tools ?? "none", cgroupFavorDynmods: dynmods?.status ?? { state: "off" } },
    "agent listening",
  );
  // A line on stdout that a supervisor (the testbed) can wait for.
  process.stdout.write(`ferry-agent ready port=${agent.port}\n`);
  const stop = (): void => {
    log.info("agent stopping");
    void agent.close().then(() => {
      dynmods?.release();
      process.exit(0);
    });
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((e: unknown) => {
  process.stderr.write(`ferry-agent: ${asFerryError(e).fullMessage}\n`);
  process.exit(1);
});
