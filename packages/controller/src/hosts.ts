import * as agentApi from "@ferry/api/agent";
import { AgentServiceService, type StreamMetricsResponse } from "@ferry/api/agent";
import { HostState, type Host, type RegisterHostRequest } from "@ferry/api/controller";
import {
  FerryError,
  asFerryError,
  connect,
  validateIpv4,
  validateName,
  type Logger,
  type PromiseClient,
  type Security,
} from "@ferry/common";
import { createHash, randomBytes } from "node:crypto";
import { mkdir, readFile, rename, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { OvsTopology } from "./sdn/index.js";

export type AgentClient = PromiseClient<typeof AgentServiceService>;

/** Opens a client to an agent; injected so that tests can point the controller at fakes. */
export type AgentConnector = (address: string, serverName: string) => AgentClient;

export function mtlsAgentConnector(security: Security): AgentConnector {
  return (address, serverName) =>
    connect(AgentServiceService, agentApi as unknown as Record<string, unknown>, {
      address,
      security,
      serverName,
      options: { "grpc-node.flow_control_window": 16 * 1024 * 1024 },
    });
}

/** The overlay bridge every host gets, its datapath (no kernel module here) and the VXLAN id. */
export const OVERLAY_BRIDGE = "br-ferry";
export const OVERLAY_DATAPATH = "netdev";
export const OVERLAY_VNI = 77;

/** OVS port name of the tunnel towards `peer`: `vx-<peer>`, cut to 15 (IFNAMSIZ - 1). */
export function vxlanPortName(peer: string): string {
  return `vx-${peer}`.slice(0, 15);
}

/** What the controller keeps of a host across restarts (<stateDir>/hosts.json). */
interface SavedHost {
  name: string;
  address: string;
  tlsServerName: string;
  underlayIp: string;
  labels: Record<string, string>;
  cordoned: boolean;
  /** Peer host → ofport of the VXLAN port towards it, on this host's bridge. */
  vxlanPortTo: Record<string, number>;
  /** Peer host → OVS port name used for it. */
  vxlanPortName: Record<string, string>;
}

/** A registered host, its agent channel, reachability and metrics. */
export interface HostEntry {
  readonly saved: SavedHost;
  readonly client: AgentClient;
  reachable: boolean;
  host: Host;
  latest?: StreamMetricsResponse | undefined;
  /** Recent samples, oldest first. */
  history: StreamMetricsResponse[];
  streamAbort?: AbortController | undefined;
  reconnectTimer?: NodeJS.Timeout | undefined;
  backoffMs: number;
}

/** A host as the migration steps see it. */
export interface HostHandleLike {
  name: string;
  address: string;
  tlsServerName: string;
  client: AgentClient;
}

export interface HostRegistryOptions {
  connectAgent: AgentConnector;
  log: Logger;
  /** Where hosts.json lives; memory only when absent. */
  stateDir?: string | undefined;
  /** StreamMetrics interval; 0 = do not stream. Default 1000. */
  metricsIntervalMs?: number | undefined;
  /** Samples kept per host; default 120. */
  historySize?: number | undefined;
  /** First reconnect delay, doubled up to 30 s; default 500. */
  reconnectInitialMs?: number | undefined;
  /** Deadline of the registry's own agent calls; default 10 000. */
  callTimeoutMs?: number | undefined;
}

export type MetricsListener = (host: string, sample: StreamMetricsResponse) => void;

/**
 * The edge hosts the controller knows, each with one long-lived channel to its agent. Persisted in
 * `<stateDir>/hosts.json` so a restarted controller reconnects to them; builds the VXLAN overlay
 * mesh among hosts with an underlay address; consumes each agent's metrics stream; marks a host
 * UNREACHABLE when its agent fails and reconnects it with backoff.
 */
export class HostRegistry {
  private readonly hosts = new Map<string, HostEntry>();
  private readonly listeners = new Set<MetricsListener>();
  private readonly readyListeners = new Set<(host: string) => void>();
  private saveChain: Promise<void> = Promise.resolve();
  private closed = false;
  private readonly interval: number;
  private readonly historySize: number;
  private readonly reconnectInitialMs: number;
  private readonly callTimeoutMs: number;
  private readonly log: Logger;

  constructor(private readonly opts: HostRegistryOptions) {
    this.log = opts.log;
    this.interval = opts.metricsIntervalMs ?? 1000;
    this.historySize = opts.historySize ?? 120;
    this.reconnectInitialMs = opts.reconnectInitialMs ?? 500;
    this.callTimeoutMs = opts.callTimeoutMs ?? 10_000;
  }

  /** Loads hosts.json and tries every saved host once (bounded by `waitMs`); failures reconnect in the background. */
  async load(waitMs = 5_000): Promise<void> {
    if (!this.opts.stateDir) return;
    let saved: Partial<SavedHost>[] = [];
    try {
      saved = JSON.parse(await readFile(join(this.opts.stateDir, "hosts.json"), "utf8")) as Partial<SavedHost>[];
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") {
        throw new FerryError("DataLoss", `hosts.json unreadable: ${(e as Error).message}`, { fix: "fix or remove <state-dir>/hosts.json" });
      }
    }
    for (const s of saved) {
      if (!s.name || !s.address) continue;
      const e = this.newEntry({
        name: s.name,
        address: s.address,
        tlsServerName: s.tlsServerName ?? s.name,
        underlayIp: s.underlayIp ?? "",
        vxlanPortName: s.vxlanPortName ?? {},
        vxlanPortTo: s.vxlanPortTo ?? {},
        labels: s.labels ?? {},
        cordoned: !!s.cordoned,
      });
      this.hosts.set(s.name, e);
    }
    await Promise.all(
      [...this.hosts.values()].map((e) =>
        withTimeout(this.connectEntry(e), waitMs).catch((err: unknown) => {
          this.lost(e, err);
        }),
      ),
    );
  }

  /** RegisterHost: connect, check, build the overlay links, start the metrics stream. Idempotent for the same address. */
  async register(req: RegisterHostRequest): Promise<Host> {
    validateName("name", req.name);
    if (!/^[^\s/]+:\d{1,5}$/.test(req.address)) {
      throw FerryError.invalid("address", `"${req.address}" is not host:port`, 'give the agent\'s gRPC address, e.g. "10.0.0.2:7441"');
    }
    if (req.underlayIp) validateIpv4("underlay_ip", req.underlayIp);
    const existing = this.hosts.get(req.name);
    if (existing && existing.saved.address !== req.address) {
      throw new FerryError("AlreadyExists", `host "${req.name}" is already registered at ${existing.saved.address}`, {
        field: "name",
        fix: "remove it first (ferry host rm) or use another name",
      });
    }
    const dup = [...this.hosts.values()].find((e) => e !== existing && req.underlayIp && e.saved.underlayIp === req.underlayIp);
    if (dup) {
      throw new FerryError("AlreadyExists", `underlay address ${req.underlayIp} is already used by host "${dup.saved.name}"`, {
        field: "underlay_ip",
        fix: "give each host its own underlay address",
      });
    }
    const saved: SavedHost = existing
      ? { ...existing.saved, underlayIp: req.underlayIp || existing.saved.underlayIp, labels: { ...existing.saved.labels, ...req.labels } }
      : {
          name: req.name,
          address: req.address,
          tlsServerName: req.tlsServerName || req.name,
          underlayIp: req.underlayIp,
          labels: { ...req.labels },
          cordoned: false,
          vxlanPortTo: {},
          vxlanPortName: {},
        };
    const e = existing ?? this.newEntry(saved);
    if (existing) Object.assign(existing.saved, saved);
    try {
      await this.connectEntry(e, true);
    } catch (err) {
      if (!existing) e.client.close();
      const fe = asFerryError(err);
      if (fe.code !== "Unavailable" && fe.code !== "DeadlineExceeded") throw fe;
      throw new FerryError("Unavailable", `cannot reach the agent of "${req.name}" at ${req.address}: ${fe.message}`, {
        field: "address",
        fix: "check that ferry-agent runs there and that its certificate is issued for tls_server_name by Ferry's CA",
        cause: err,
      });
    }
    this.hosts.set(req.name, e);
    await this.save();
    if (!existing) this.notifyReady(req.name);
    this.log.info({ host: req.name, address: req.address, criu: e.host.capabilities?.criu?.version }, "host registered");
    return this.snapshot(e);
  }

  list(): Host[] {
    return [...this.hosts.values()].map((e) => this.snapshot(e));
  }

  names(): string[] {
    return [...this.hosts.keys()];
  }

  has(name: string): boolean {
    return this.hosts.has(name);
  }

  get(name: string): HostEntry {
    const e = this.hosts.get(name);
    if (!e) throw FerryError.notFound("host", name, "list hosts with `ferry hosts`, register one with `ferry host add`");
    return e;
  }

  /** The host's public record (state computed from reachability and cordon). */
  host(name: string): Host {
    return this.snapshot(this.get(name));
  }

  handle(name: string): HostHandleLike {
    const e = this.get(name);
    return { name, address: e.saved.address, tlsServerName: e.saved.tlsServerName, client: e.client };
  }

  client(name: string): AgentClient {
    return this.get(name).client;
  }

  isReachable(name: string): boolean {
    return this.hosts.get(name)?.reachable ?? false;
  }

  isCordoned(name: string): boolean {
    return this.get(name).saved.cordoned;
  }

  /** Throws unless the host exists, is reachable and (for placements) not cordoned. */
  requireReady(field: string, name: string, forPlacement: boolean): HostEntry {
    const e = this.get(name);
    if (!e.reachable) {
      throw new FerryError("Unavailable", `host "${name}" is unreachable (its agent at ${e.saved.address} does not answer)`, {
        field,
        fix: "check ferry-agent on that host; the controller reconnects on its own",
      });
    }
    if (forPlacement && e.saved.cordoned) {
      throw new FerryError("FailedPrecondition", `host "${name}" is cordoned: it takes no new containers or migrations`, {
        field,
        fix: "pick another host, or uncordon it by registering it again",
      });
    }
    return e;
  }

  async setCordoned(name: string, cordoned: boolean): Promise<void> {
    this.get(name).saved.cordoned = cordoned;
    await this.save();
  }

  /** Forgets a host (the caller checked it is unused): its tunnels on the peers go too (best effort). */
  async remove(name: string): Promise<void> {
    const e = this.get(name);
    this.stop(e);
    this.hosts.delete(name);
    await Promise.all(
      [...this.hosts.values()].map(async (p) => {
        const port = p.saved.vxlanPortName[name];
        delete p.saved.vxlanPortTo[name];
        delete p.saved.vxlanPortName[name];
        if (!port || !p.reachable) return;
        await p.client
          .deletePort({ operationKey: "", bridge: OVERLAY_BRIDGE, port }, { timeoutMs: this.callTimeoutMs })
          .catch((err: unknown) => {
            this.log.warn({ host: p.saved.name, port, err: asFerryError(err).message }, "tunnel not removed");
          });
      }),
    );
    e.client.close();
    await this.save();
    this.log.info({ host: name }, "host removed");
  }

  /** A failing agent call says the host is gone: mark it, drop its stream, reconnect with backoff. */
  markUnreachable(name: string, err: unknown): void {
    const e = this.hosts.get(name);
    if (e?.reachable) this.lost(e, err);
  }

  /** Metrics samples as the agents stream them; returns the unsubscribe function. */
  onMetrics(l: MetricsListener): () => void {
    this.listeners.add(l);
    return () => this.listeners.delete(l);
  }

  /** Called when a host becomes reachable again (after being unreachable). */
  onReady(l: (host: string) => void): () => void {
    this.readyListeners.add(l);
    return () => this.readyListeners.delete(l);
  }

  /** Recent samples of a host, oldest first. */
  history(name: string): StreamMetricsResponse[] {
    return [...(this.hosts.get(name)?.history ?? [])];
  }

  /** Feeds a sample as if the agent had streamed it (tests; also used for the registration report). */
  ingest(name: string, s: StreamMetricsResponse): void {
    const e = this.get(name);
    e.latest = s;
    e.history.push(s);
    if (e.history.length > this.historySize) e.history.splice(0, e.history.length - this.historySize);
    if (s.capacity) e.host.capacity = s.capacity;
    if (s.used) e.host.used = s.used;
    e.host.containers = s.containers.length;
    e.host.lastSeen = s.sampledAt ?? new Date();
    for (const l of this.listeners) {
      try {
        l(name, s);
      } catch (err) {
        this.log.warn({ err: asFerryError(err).message }, "metrics listener failed");
      }
    }
  }

  /** The overlay as the ovs SDN backend needs it (reachable hosts only: flows cannot be set on the others). */
  topology(): OvsTopology {
    return {
      hosts: [...this.hosts.values()]
        .filter((e) => e.reachable)
        .map((e) => ({ name: e.saved.name, bridge: OVERLAY_BRIDGE, vxlanPortTo: { ...e.saved.vxlanPortTo } })),
    };
  }

  close(): void {
    this.closed = true;
    for (const e of this.hosts.values()) {
      this.stop(e);
      e.client.close();
    }
    this.hosts.clear();
  }

  // ------------------------------------------------------------------------------------------

  private newEntry(saved: SavedHost): HostEntry {
    const client = this.opts.connectAgent(saved.address, saved.tlsServerName || saved.name);
    const host: Host = {
      name: saved.name,
      address: saved.address,
      tlsServerName: saved.tlsServerName,
      underlayIp: saved.underlayIp,
      state: HostState.HOST_STATE_UNREACHABLE,
      containers: 0,
      labels: saved.labels,
    };
    return { saved, client, reachable: false, host, history: [], backoffMs: this.reconnectInitialMs };
  }

  private snapshot(e: HostEntry): Host {
    const state = !e.reachable
      ? HostState.HOST_STATE_UNREACHABLE
      : e.saved.cordoned
        ? HostState.HOST_STATE_CORDONED
        : HostState.HOST_STATE_READY;
    return structuredClone({ ...e.host, underlayIp: e.saved.underlayIp, labels: e.saved.labels, state });
  }

  /** Capabilities, resources, overlay links, then the metrics stream. */
  private async connectEntry(e: HostEntry, strictOverlay = false): Promise<void> {
    const t = { timeoutMs: this.callTimeoutMs };
    const [caps, res] = await Promise.all([e.client.getCapabilities({}, t), e.client.getResources({}, t)]);
    e.host.capabilities = caps;
    if (res.capacity) e.host.capacity = res.capacity;
    if (res.used) e.host.used = res.used;
    e.host.containers = res.containers.length;
    e.host.lastSeen = new Date();
    await this.ensureOverlay(e, strictOverlay);
    const wasReachable = e.reachable;
    e.reachable = true;
    e.backoffMs = this.reconnectInitialMs;
    this.startStream(e);
    if (!wasReachable && this.hosts.get(e.saved.name) === e) this.notifyReady(e.saved.name);
  }

  private notifyReady(name: string): void {
    for (const l of this.readyListeners) {
      try {
        l(name);
      } catch (err) {
        this.log.warn({ host: name, err: asFerryError(err).message }, "ready listener failed");
      }
    }
  }

  /**
   * The bridge, and a VXLAN tunnel both ways to every reachable peer with an underlay address.
   * Without an underlay address the host is alone: its bridge is made best effort.
   */
  private async ensureOverlay(e: HostEntry, strict: boolean): Promise<void> {
    const t = { timeoutMs: this.callTimeoutMs };
    const me = e.saved;
    try {
      await e.client.ensureBridge({ operationKey: "", bridge: OVERLAY_BRIDGE, datapathType: OVERLAY_DATAPATH }, t);
    } catch (err) {
      if (strict && me.underlayIp) throw err;
      this.log.warn({ host: me.name, err: asFerryError(err).message }, "overlay bridge not ensured");
      return;
    }
    if (!me.underlayIp) return;
    for (const p of this.hosts.values()) {
      const peer = p.saved;
      if (peer.name === me.name || !peer.underlayIp || !p.reachable) continue;
      try {
        await this.tunnel(e, p);
        await this.tunnel(p, e);
      } catch (err) {
        if (strict) {
          throw new FerryError(
            "Unavailable",
            `cannot build the VXLAN tunnel between "${me.name}" and "${peer.name}": ${asFerryError(err).message}`,
            {
              fix: `check OVS on both hosts and that ${me.underlayIp} and ${peer.underlayIp} reach each other`,
              cause: err,
            },
          );
        }
        this.log.warn({ host: me.name, peer: peer.name, err: asFerryError(err).message }, "tunnel not built");
      }
    }
    await this.save();
  }

  /** The VXLAN port on `from`'s bridge towards `to`; remembers its ofport for the flows. */
  private async tunnel(from: HostEntry, to: HostEntry): Promise<void> {
    const f = from.saved;
    let port = f.vxlanPortName[to.saved.name] ?? vxlanPortName(to.saved.name);
    // Two long peer names may cut to the same 15 characters: then a hashed name.
    const taken = Object.entries(f.vxlanPortName).some(([peer, n]) => peer !== to.saved.name && n === port);
    if (taken) port = `vx-${to.saved.name.slice(0, 5)}-${createHash("sha256").update(to.saved.name).digest("hex").slice(0, 6)}`;
    const r = await from.client.addVxlanPort(
      { operationKey: "", bridge: OVERLAY_BRIDGE, port, remoteIp: to.saved.underlayIp, localIp: f.underlayIp, vni: OVERLAY_VNI, ofport: 0 },
      { timeoutMs: this.callTimeoutMs },
    );
    f.vxlanPortName[to.saved.name] = port;
    f.vxlanPortTo[to.saved.name] = r.ofport;
  }

  private startStream(e: HostEntry): void {
    if (this.interval <= 0 || this.closed) return;
    e.streamAbort?.abort();
    const ac = new AbortController();
    e.streamAbort = ac;
    void (async () => {
      try {
        for await (const s of e.client.streamMetrics({ intervalMs: this.interval }, { signal: ac.signal })) {
          if (ac.signal.aborted) return;
          this.ingest(e.saved.name, s);
        }
        if (!ac.signal.aborted) throw new FerryError("Unavailable", "the metrics stream ended");
      } catch (err) {
        if (ac.signal.aborted || this.closed) return;
        this.lost(e, err);
      }
    })();
  }

  private lost(e: HostEntry, err: unknown): void {
    if (this.closed) return;
    if (e.reachable) this.log.warn({ host: e.saved.name, err: asFerryError(err).message }, "host unreachable");
    e.reachable = false;
    e.streamAbort?.abort();
    e.streamAbort = undefined;
    if (e.reconnectTimer || this.hosts.get(e.saved.name) !== e) return;
    const wait = e.backoffMs;
    e.backoffMs = Math.min(30_000, e.backoffMs * 2);
    e.reconnectTimer = setTimeout(() => {
      e.reconnectTimer = undefined;
      if (this.closed || this.hosts.get(e.saved.name) !== e) return;
      this.connectEntry(e).then(
        () => this.log.info({ host: e.saved.name }, "host reconnected"),
        (err2: unknown) => this.lost(e, err2),
      );
    }, wait);
    e.reconnectTimer.unref?.();
  }

  private stop(e: HostEntry): void {
    e.streamAbort?.abort();
    e.streamAbort = undefined;
    clearTimeout(e.reconnectTimer);
    e.reconnectTimer = undefined;
  }

  private save(): Promise<void> {
    const dir = this.opts.stateDir;
    if (!dir || this.closed) return Promise.resolve();
    const body = JSON.stringify(
      [...this.hosts.values()].map((e) => e.saved),
      null,
      1,
    );
    this.saveChain = this.saveChain
      .catch(() => undefined)
      .then(async () => {
        await mkdir(dir, { recursive: true, mode: 0o700 });
        const tmp = join(dir, `hosts.json.tmp-${process.pid}-${randomBytes(3).toString("hex")}`);
        await writeFile(tmp, body, { mode: 0o600 });
        await rename(tmp, join(dir, "hosts.json"));
      });
    return this.saveChain;
  }
}

async function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, rej) => {
        timer = setTimeout(() => rej(new FerryError("DeadlineExceeded", `no answer within ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}
