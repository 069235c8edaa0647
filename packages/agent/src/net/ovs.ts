import type { Flow } from "@ferry/api/agent";
import { ExecError, FerryError, exec, validateInterfaceName, validateIpv4 } from "@ferry/common";
import { OvsdbClient, OvsdbError, type OvsdbOp, type OvsdbRow, ovsdbMap, setMembers } from "./ovsdb.js";

/**
 * Where one Open vSwitch instance listens. Every emulated host runs its own ovsdb-server and
 * ovs-vswitchd, so nothing here may fall back to the system's default sockets.
 */
export interface OvsConfig {
  /** The daemons' rundir: holds `<bridge>.mgmt` (OpenFlow) and `ovs-vswitchd.<pid>.ctl`. */
  rundir: string;
  /** ovsdb-server's socket, an absolute path (ovs-vsctl resolves relative ones against its rundir). */
  dbSock: string;
  /** Written to `external_ids:ferry-owner` of every bridge and port Ferry creates. Default "ferry". */
  owner?: string;
  /** Per-command time limit, default 20 s. */
  timeoutMs?: number;
}

export interface PortOptions {
  /** Interface type: "" (system device), "internal", "vxlan", ... */
  type?: string;
  /** `options:<k>=<v>` of the interface. */
  options?: Record<string, string>;
  /** Pinned OpenFlow port number (`ofport_request`), 1..65279. */
  ofport?: number;
  /** Extra `external_ids` of the port (besides ferry-owner). */
  externalIds?: Record<string, string>;
}

export interface VxlanPortOptions {
  remoteIp: string;
  localIp?: string;
  /** VXLAN network identifier, sent as OVS `options:key`. */
  vni: number;
  ofport?: number;
}

export interface BridgeOptions {
  /** "secure": no implicit NORMAL flow, an empty table drops (Ferry's overlay bridge). */
  failMode?: "secure" | "standalone";
}

/** The OpenFlow adapter Ferry's path switch and the agent's RPCs need; {@link Ovs} is the real one. */
export interface OvsApi {
  ensureBridge(name: string, datapathType?: string, opts?: BridgeOptions): Promise<void>;
  addPort(bridge: string, port: string, opts?: PortOptions): Promise<number>;
  deletePort(bridge: string, port: string): Promise<void>;
  addVxlanPort(bridge: string, port: string, opts: VxlanPortOptions): Promise<number>;
  ofportOf(port: string): Promise<number>;
  /** The bridge's datapath_type: "netdev" (userspace) or "system" (kernel; OVS writes it as ""). */
  datapathType(bridge: string): Promise<string>;
  setFlows(bridge: string, flows: readonly Flow[]): Promise<{ durationMs: number }>;
  deleteFlows(bridge: string, cookie: number): Promise<void>;
  listFlows(bridge: string): Promise<Flow[]>;
}

/** OpenFlow 1.4 is the first version with bundles (atomic multi-rule transactions). */
const OF_VERSION = "OpenFlow14";
const BRIDGE_PROTOCOLS = "OpenFlow10,OpenFlow13,OpenFlow14,OpenFlow15";
const MAX_OFPORT = 0xfeff; // OFPP_MAX: numbers above are reserved (LOCAL, CONTROLLER...)
const DEFAULT_PRIORITY = 32768;

// match/actions: the ovs-ofctl syntax needs letters, digits and ,.:=/_-()[]>{}+ and spaces.
// Anything else (newline, ';', '#', quotes, '$', '|', '&', '\') is refused: a newline would
// inject a second flow_mod line into the bundle file, '#' would comment out the rest.
const FLOW_TEXT = /^[A-Za-z0-9_.:,=/()[\]{}>+\- ]*$/;
// keys that Ferry sets itself; a match carrying them would escape the cookie bookkeeping.
const RESERVED_MATCH_KEYS = /(^|[,\s])(cookie|table|priority|actions|idle_timeout|hard_timeout|importance|out_port|out_group)\s*=/;
const OPTION_KEY = /^[a-z0-9_:-]{1,64}$/;
const OPTION_VALUE = /^[A-Za-z0-9_.:/-]{0,200}$/;

/** Check one Flow's fields; the error names `<field>[i].<key>` and says what is allowed. */
export function validateFlow(f: Flow, field = "flows[0]"): void {
  if (!Number.isInteger(f.table) || f.table < 0 || f.table > 254) {
    throw FerryError.invalid(`${field}.table`, `table ${f.table} is out of range`, "use a table number 0-254");
  }
  if (!Number.isInteger(f.priority) || f.priority < 0 || f.priority > 65535) {
    throw FerryError.invalid(`${field}.priority`, `priority ${f.priority} is out of range`, "use a priority 0-65535");
  }
  validateCookie(`${field}.cookie`, f.cookie);
  if (f.cookie === 0) {
    throw FerryError.invalid(
      `${field}.cookie`,
      "cookie 0 is not allowed",
      "tag every rule with a non-zero cookie (SetFlows replaces rules by cookie)",
    );
  }
  if (!FLOW_TEXT.test(f.match) || f.match.length > 1000) {
    throw FerryError.invalid(
      `${field}.match`,
      `"${f.match}" has characters outside ovs-ofctl match syntax`,
      'write an ovs-ofctl match such as "ip,nw_dst=10.77.0.10" (letters, digits, ,.:=/_-()[]{}>+ and spaces)',
    );
  }
  if (RESERVED_MATCH_KEYS.test(f.match)) {
    throw FerryError.invalid(
      `${field}.match`,
      `"${f.match}" sets a field that belongs in table/priority/cookie/actions`,
      "put only match fields in match; use the table, priority and cookie fields",
    );
  }
  if (!f.actions.trim() || !FLOW_TEXT.test(f.actions) || f.actions.length > 1000) {
    throw FerryError.invalid(
      `${field}.actions`,
      `"${f.actions}" is empty or has characters outside ovs-ofctl action syntax`,
      'write ovs-ofctl actions such as "output:7" or "drop"',
    );
  }
}

function validateCookie(field: string, cookie: number): void {
  if (!Number.isSafeInteger(cookie) || cookie < 0) {
    throw FerryError.invalid(
      field,
      `cookie ${cookie} is not an integer in 0..2^53-1`,
      "use a non-negative integer below 2^53 (JavaScript numbers carry no more)",
    );
  }
}

function validateOfport(field: string, ofport: number | undefined): void {
  if (ofport === undefined || ofport === 0) return;
  if (!Number.isInteger(ofport) || ofport < 1 || ofport > MAX_OFPORT) {
    throw FerryError.invalid(field, `ofport ${ofport} is out of range`, `use 1-${MAX_OFPORT}, or 0 to let OVS pick one`);
  }
}

function hexCookie(c: number): string {
  return "0x" + BigInt(c).toString(16);
}

/** One flow as a flow_mod line of an `ovs-ofctl add-flows` file. */
export function flowLine(f: Flow): string {
  const match = f.match.trim();
  return `add table=${f.table},priority=${f.priority},cookie=${hexCookie(f.cookie)}${match ? "," + match : ""},actions=${f.actions.trim()}`;
}

/**
 * The bundle file for "replace every rule of these cookies by these rules": one
 * `delete cookie=X/-1` per cookie, then the adds. Applied with `--bundle`, it is one atomic
 * transaction: a packet sees either the old rules or the new ones, never none.
 */
export function setFlowsFile(flows: readonly Flow[]): string {
  const cookies = [...new Set(flows.map((f) => f.cookie))];
  const lines = cookies.map((c) => `delete cookie=${hexCookie(c)}/-1`);
  for (const f of flows) lines.push(flowLine(f));
  return lines.join("\n") + "\n";
}

const STAT_KEYS = new Set([
  "duration",
  "n_packets",
  "n_bytes",
  "idle_age",
  "hard_age",
  "idle_timeout",
  "hard_timeout",
  "importance",
  "send_flow_rem",
  "reset_counts",
  "no_packet_counts",
  "no_byte_counts",
  "check_overlap",
]);

/** Parse `ovs-ofctl dump-flows` output into Flows (statistics dropped, priority defaulted). */
export function parseDumpFlows(text: string): Flow[] {
  const flows: Flow[] = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    const at = line.indexOf(" actions=");
    if (!line || line.startsWith("OFPST_") || line.startsWith("NXST_") || at < 0) continue;
    const head = line.slice(0, at).trim();
    const actions = line.slice(at + " actions=".length).trim();
    let table = 0;
    let priority = DEFAULT_PRIORITY;
    let cookie = 0;
    const match: string[] = [];
    // the head is "cookie=0x5, duration=1s, table=0, ..., priority=100,ip,nw_dst=10.77.0.10":
    // statistics are separated by ", ", the match itself by ",".
    for (const tok of head.split(/,\s*/)) {
      if (!tok) continue;
      const eq = tok.indexOf("=");
      const key = eq < 0 ? tok : tok.slice(0, eq);
      const val = eq < 0 ? "" : tok.slice(eq + 1);
      if (key === "cookie") cookie = Number(BigInt(val));
      else if (key === "table") table = Number(val);
      else if (key === "priority") priority = Number(val);
      else if (!STAT_KEYS.has(key)) match.push(tok);
    }
    flows.push({ table, priority, match: match.join(","), actions, cookie });
  }
  return flows;
}

/**
 * One Open vSwitch instance: ports through its database's own protocol (./ovsdb.ts), bridges
 * (start-up only) through ovs-vsctl, flows through ovs-ofctl. Every method is safe to call twice;
 * what it creates is tagged `external_ids:ferry-owner`.
 */
export class Ovs implements OvsApi {
  private readonly owner: string;
  private readonly env: NodeJS.ProcessEnv;
  /** The database, over its own protocol: the per-migration port operations (see ./ovsdb.ts). */
  private readonly db: OvsdbClient;

  constructor(private readonly cfg: OvsConfig) {
    if (!cfg.dbSock.startsWith("/"))
      throw FerryError.invalid("ovs.dbSock", `"${cfg.dbSock}" is not absolute`, "give the ovsdb-server socket as an absolute path");
    this.owner = cfg.owner ?? "ferry";
    // ovs-ofctl finds <rundir>/<bridge>.mgmt, ovs-appctl <rundir>/ovs-vswitchd.pid, through OVS_RUNDIR.
    this.env = { ...process.env, OVS_RUNDIR: cfg.rundir };
    this.db = new OvsdbClient(cfg.dbSock, cfg.timeoutMs ?? 20_000);
  }

  get config(): Readonly<OvsConfig> {
    return this.cfg;
  }

  /** Run ovs-vsctl against this instance's database. */
  async vsctl(args: readonly string[], okCodes?: number[]): Promise<string> {
    return this.run("ovs-vsctl", [`--db=unix:${this.cfg.dbSock}`, "--timeout=10", ...args], okCodes);
  }

  async ofctl(args: readonly string[], input?: string): Promise<string> {
    return this.run("ovs-ofctl", args, undefined, input);
  }

  async appctl(args: readonly string[]): Promise<string> {
    return this.run("ovs-appctl", args);
  }

  private async run(cmd: string, args: readonly string[], okCodes?: number[], input?: string): Promise<string> {
    try {
      const r = await exec(cmd, args, {
        env: this.env,
        timeoutMs: this.cfg.timeoutMs ?? 20_000,
        ...(okCodes ? { okCodes } : {}),
        ...(input !== undefined ? { input } : {}),
      });
      return r.stdout;
    } catch (e) {
      if (
        e instanceof ExecError &&
        /database connection failed|failed to connect to socket|No such file or directory.*\.mgmt|cannot find pidfile/i.test(e.stderr)
      ) {
        throw new FerryError("Unavailable", `Open vSwitch is not reachable (${cmd}): ${e.stderr.trim().split("\n").pop()}`, {
          fix: `start ovsdb-server/ovs-vswitchd with rundir ${this.cfg.rundir} and socket ${this.cfg.dbSock}`,
          cause: e,
        });
      }
      throw e;
    }
  }

  /** `external_ids` with Ferry's owner tag, each key and value checked. */
  private externalIds(kind: "bridge" | "port", extra: Record<string, string> = {}): Record<string, string> {
    const ids = { "ferry-owner": this.owner, ...extra };
    for (const [k, v] of Object.entries(ids)) {
      if (!OPTION_KEY.test(k) || !OPTION_VALUE.test(v))
        throw FerryError.invalid(
          `${kind}.external_ids.${k}`,
          `"${k}=${v}" is not a plain key/value`,
          "use [a-z0-9_:-] keys and [A-Za-z0-9_.:/-] values",
        );
    }
    return ids;
  }

  async ensureBridge(name: string, datapathType = "netdev", opts: BridgeOptions = {}): Promise<void> {
    validateInterfaceName("bridge", name);
    if (datapathType !== "netdev" && datapathType !== "system") {
      throw FerryError.invalid(
        "datapath_type",
        `"${datapathType}" is not a datapath type`,
        'use "netdev" (userspace) or "system" (kernel module)',
      );
    }
    // --may-exist plus "set" in the same transaction: an existing bridge converges to the spec.
    const set = ["--", "set", "Bridge", name, `datapath_type=${datapathType}`, `protocols=${BRIDGE_PROTOCOLS}`];
    if (opts.failMode) set.push(`fail_mode=${opts.failMode}`);
    const ids = Object.entries(this.externalIds("bridge")).map(([k, v]) => `external_ids:${k}=${v}`);
    await this.vsctl(["--may-exist", "add-br", name, ...set, "--", "set", "Bridge", name, ...ids]);
  }

  async addPort(bridge: string, port: string, opts: PortOptions = {}): Promise<number> {
    validateInterfaceName("bridge", bridge);
    validateInterfaceName("port", port);
    validateOfport("ofport", opts.ofport);
    if (opts.type !== undefined && !/^[a-z0-9_]{0,20}$/.test(opts.type))
      throw FerryError.invalid("type", `"${opts.type}" is not an interface type`, 'use e.g. "internal" or "vxlan"');
    for (const [k, v] of Object.entries(opts.options ?? {})) {
      if (!OPTION_KEY.test(k) || !OPTION_VALUE.test(v))
        throw FerryError.invalid(`options.${k}`, `"${k}=${v}" is not a plain option`, "use [a-z0-9_:-] keys and [A-Za-z0-9_.:/-] values");
    }
    const externalIds = this.externalIds("port", opts.externalIds);
    // As `ovs-vsctl --may-exist add-port B P -- set Interface P ... -- set Port P external_ids:...`:
    // a port already on this bridge gets the given settings, one on another bridge is refused.
    const [br, existing] = await this.db.transact([
      selectByName("Bridge", bridge, ["_uuid", "ports"]),
      selectByName("Port", port, ["_uuid"]),
    ]);
    const brRow = br!.rows?.[0];
    if (!brRow) throw FerryError.notFound("OVS bridge", bridge, "create the bridge first (EnsureBridge)");
    const portUuid = existing!.rows?.[0]?._uuid;
    const iface: OvsdbRow = {};
    if (opts.type !== undefined) iface.type = opts.type;
    if (opts.ofport) iface.ofport_request = opts.ofport;
    const ops: OvsdbOp[] = [];
    if (portUuid) {
      if (!uuidsOf(brRow.ports).includes((portUuid as [string, string])[1])) {
        throw new FerryError("AlreadyExists", `port: "${port}" already exists on another bridge`, {
          field: "port",
          fix: "delete it there first or pick another port name",
        });
      }
      if (Object.keys(iface).length) ops.push({ op: "update", table: "Interface", where: [["name", "==", port]], row: iface });
      if (opts.options && Object.keys(opts.options).length) ops.push(setKeys("Interface", port, "options", opts.options));
      ops.push(setKeys("Port", port, "external_ids", externalIds));
    } else {
      ops.push(
        { op: "insert", table: "Interface", "uuid-name": "iface", row: { name: port, ...iface, options: ovsdbMap(opts.options ?? {}) } },
        {
          op: "insert",
          table: "Port",
          "uuid-name": "port",
          row: { name: port, interfaces: ["named-uuid", "iface"], external_ids: ovsdbMap(externalIds) },
        },
        {
          op: "mutate",
          table: "Bridge",
          where: [["name", "==", bridge]],
          mutations: [["ports", "insert", ["set", [["named-uuid", "port"]]]]],
        },
      );
    }
    try {
      await this.commitAndWait(ops);
    } catch (e) {
      // Another create of the same name won the race: the name index refuses the second.
      if (e instanceof OvsdbError && e.code === "constraint violation") {
        throw new FerryError("AlreadyExists", `port: "${port}" was created concurrently`, { field: "port", fix: "retry", cause: e });
      }
      throw e;
    }
    const ofport = await this.ofportOf(port);
    if (opts.ofport && ofport !== opts.ofport) {
      throw new FerryError(
        "AlreadyExists",
        `ofport: ${opts.ofport} requested for "${port}" but OVS gave ${ofport} (taken by another port?)`,
        {
          field: "ofport",
          fix: "pick a free ofport or delete the port holding it",
        },
      );
    }
    return ofport;
  }

  async deletePort(bridge: string, port: string): Promise<void> {
    validateInterfaceName("bridge", bridge);
    validateInterfaceName("port", port);
    // As `ovs-vsctl --if-exists del-port B P`. The Port and its Interface are not root rows:
    // the database drops them once no bridge refers to them.
    const [br, existing] = await this.db.transact([selectByName("Bridge", bridge, ["ports"]), selectByName("Port", port, ["_uuid"])]);
    const portUuid = existing!.rows?.[0]?._uuid as [string, string] | undefined;
    if (!portUuid) return;
    if (!uuidsOf(br!.rows?.[0]?.ports).includes(portUuid[1])) {
      throw new FerryError("FailedPrecondition", `port: "${port}" is not on bridge "${bridge}"`, {
        field: "port",
        fix: "delete it from the bridge that holds it",
      });
    }
    await this.commitAndWait([
      { op: "mutate", table: "Bridge", where: [["name", "==", bridge]], mutations: [["ports", "delete", ["set", [portUuid]]]] },
    ]);
  }

  /**
   * Commit `ops` with Open_vSwitch.next_cfg raised by one, then wait until ovs-vswitchd has applied
   * that configuration (cur_cfg), as ovs-vsctl does without --no-wait: only then does a new port
   * have its OpenFlow number, and a deleted one has let go of its device.
   */
  private async commitAndWait(ops: readonly OvsdbOp[]): Promise<void> {
    const res = await this.db.transact([
      ...ops,
      { op: "mutate", table: "Open_vSwitch", where: [], mutations: [["next_cfg", "+=", 1]] },
      { op: "select", table: "Open_vSwitch", where: [], columns: ["next_cfg", "cur_cfg"] },
    ]);
    const row = res[res.length - 1]!.rows?.[0];
    const target = Number(row?.next_cfg);
    let cur = Number(row?.cur_cfg);
    const deadline = performance.now() + (this.cfg.timeoutMs ?? 20_000);
    while (cur < target) {
      const left = Math.round(deadline - performance.now());
      try {
        if (left <= 0) throw new OvsdbError("timed out", "timed out");
        // Held by ovsdb-server until cur_cfg changes (or the time is up); the select then reads
        // the new value in the same round trip.
        const [, now] = await this.db.transact([
          { op: "wait", table: "Open_vSwitch", where: [], columns: ["cur_cfg"], until: "!=", rows: [{ cur_cfg: cur }], timeout: left },
          { op: "select", table: "Open_vSwitch", where: [], columns: ["cur_cfg"] },
        ]);
        cur = Number(now!.rows?.[0]?.cur_cfg);
      } catch (e) {
        if (!(e instanceof OvsdbError && e.code === "timed out")) throw e;
        throw new FerryError("Unavailable", `ovs-vswitchd did not apply configuration ${target} (at ${cur}) in time`, {
          fix: `check that ovs-vswitchd is running with rundir ${this.cfg.rundir}`,
          cause: e,
        });
      }
    }
  }

  async addVxlanPort(bridge: string, port: string, opts: VxlanPortOptions): Promise<number> {
    validateIpv4("remote_ip", opts.remoteIp);
    if (opts.localIp) validateIpv4("local_ip", opts.localIp);
    if (!Number.isInteger(opts.vni) || opts.vni < 0 || opts.vni > 0xffffff) {
      throw FerryError.invalid("vni", `VNI ${opts.vni} is out of range`, "use 0-16777215");
    }
    const options: Record<string, string> = { remote_ip: opts.remoteIp, key: String(opts.vni) };
    if (opts.localIp) options.local_ip = opts.localIp;
    return this.addPort(bridge, port, { type: "vxlan", options, ...(opts.ofport ? { ofport: opts.ofport } : {}) });
  }

  /** The OpenFlow port number of an interface; NotFound when OVS has no such interface. */
  async ofportOf(port: string): Promise<number> {
    validateInterfaceName("port", port);
    const [r] = await this.db.transact([selectByName("Interface", port, ["ofport", "error"])]);
    const row = r!.rows?.[0];
    if (!row) throw FerryError.notFound("OVS interface", port, "add the port first");
    const ofport = Number(setMembers(row.ofport)[0] ?? 0);
    if (!Number.isInteger(ofport) || ofport <= 0) {
      const error = setMembers(row.error)[0];
      throw new FerryError(
        "FailedPrecondition",
        `OVS interface "${port}" has no OpenFlow port: ${typeof error === "string" ? error : "not attached"}`,
        {
          fix: "check the interface exists in the bridge's network namespace (ovs-vsctl list interface)",
        },
      );
    }
    return ofport;
  }

  async datapathType(bridge: string): Promise<string> {
    validateInterfaceName("bridge", bridge);
    const [r] = await this.db.transact([selectByName("Bridge", bridge, ["datapath_type"])]);
    const row = r!.rows?.[0];
    if (!row) throw FerryError.notFound("OVS bridge", bridge, "create the bridge first (EnsureBridge)");
    return String(row.datapath_type) || "system";
  }

  async setFlows(bridge: string, flows: readonly Flow[]): Promise<{ durationMs: number }> {
    validateInterfaceName("bridge", bridge);
    flows.forEach((f, i) => validateFlow(f, `flows[${i}]`));
    const started = performance.now();
    if (flows.length) {
      // "-" = read the flow_mods from stdin; --bundle makes delete+add one atomic OF1.4 transaction.
      const args = ["-O", OF_VERSION, "--bundle", "add-flows", bridge, "-"];
      const file = setFlowsFile(flows);
      // Port names in the flows need ovs-ofctl to fetch the bridge's port table first: a round trip
      // that triples its cost (17 ms against 5 ms here). Flows with port numbers, as Ferry's own are,
      // skip it; a flow naming a port fails to parse, before anything is sent, and goes again with names.
      try {
        await this.ofctl(["--no-names", ...args], file);
      } catch (e) {
        if (!(e instanceof ExecError && /unknown (port|action)/i.test(e.stderr))) throw e;
        await this.ofctl(args, file);
      }
    }
    return { durationMs: performance.now() - started };
  }

  async deleteFlows(bridge: string, cookie: number): Promise<void> {
    validateInterfaceName("bridge", bridge);
    validateCookie("cookie", cookie);
    await this.ofctl(["--no-names", "-O", OF_VERSION, "del-flows", bridge, `cookie=${hexCookie(cookie)}/-1`]);
  }

  async listFlows(bridge: string): Promise<Flow[]> {
    validateInterfaceName("bridge", bridge);
    return parseDumpFlows(await this.ofctl(["-O", OF_VERSION, "--no-stats", "dump-flows", bridge]));
  }
}

/** Select the row of `table` named `name` (Bridge, Port and Interface names are unique indexes). */
function selectByName(table: string, name: string, columns: string[]): OvsdbOp {
  return { op: "select", table, where: [["name", "==", name]], columns };
}

/** Set some keys of a map column, leaving its other keys, as `ovs-vsctl set T R col:k=v` does. */
function setKeys(table: string, name: string, column: string, kv: Record<string, string>): OvsdbOp {
  return {
    op: "mutate",
    table,
    where: [["name", "==", name]],
    mutations: [
      [column, "delete", ["set", Object.keys(kv)]],
      [column, "insert", ovsdbMap(kv)],
    ],
  };
}

/** The uuid strings of a set-of-uuids column (a bridge's ports). */
function uuidsOf(v: unknown): string[] {
  return setMembers(v as OvsdbRow[string] | undefined).map((u) => (u as [string, string])[1]);
}
