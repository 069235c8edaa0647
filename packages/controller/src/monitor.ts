// MIRA's monitoring module: thresholds on CPU, memory or disk, per host or per container, evaluated
// on node-cron schedules against the metrics the agents stream; a sustained breach migrates a
// container to the least loaded host that passes admission, with a cool-down against ping-pong.
import { ContainerState, type ContainerResources, type GetResourcesResponse, type StreamMetricsResponse } from "@ferry/api/agent";
import { MigrationMode, Resource, type Policy, type WatchMetricsResponse } from "@ferry/api/controller";
import { FerryError, asFerryError, type Logger } from "@ferry/common";
import { createTask, type ScheduledTask } from "node-cron";
import { checkAdmission, strategyName, type StrategyName } from "./admission.js";
import type { HostRegistry } from "./hosts.js";
import type { MigrationJournal } from "./journal.js";
import { containerLock, type LockTable } from "./locks.js";
import type { MigrationService } from "./migrations.js";
import type { PolicyStore } from "./policies.js";
import { EventQueue } from "./queue.js";
import type { MigrationScheduler } from "./scheduler.js";

export interface MonitorDeps {
  hosts: HostRegistry;
  migrations: MigrationService;
  journal: MigrationJournal;
  locks: LockTable;
  scheduler: MigrationScheduler;
  policies: PolicyStore;
  log: Logger;
  strategy: () => StrategyName;
  /** Milliseconds clock; Date.now by default. */
  now?: () => number;
  /** A latest sample older than this is not evaluated; default 30 000. */
  staleMs?: number;
  callTimeoutMs?: number;
}

/** What one evaluation of a policy on one host decided. */
export interface Evaluation {
  policy: string;
  host: string;
  breached: boolean;
  /** Set when a migration was started. */
  migrationId?: string;
  container?: string;
  destination?: string;
  /** Why nothing (or what) happened, for the log and tests. */
  note: string;
}

export interface EvaluateOptions {
  now?: number;
  /** Samples per host, oldest first; the registry's history by default. */
  samples?: (host: string) => StreamMetricsResponse[];
}

type Key = "cpuMillicores" | "memoryBytes" | "diskBytes";
const KEY: Record<number, Key> = {
  [Resource.RESOURCE_CPU]: "cpuMillicores",
  [Resource.RESOURCE_MEMORY]: "memoryBytes",
  [Resource.RESOURCE_DISK]: "diskBytes",
};

function capacityOf(cap: { cpuCores: number; memoryBytes: number; diskBytes: number } | undefined, k: Key): number {
  if (!cap) return 0;
  return k === "cpuMillicores" ? cap.cpuCores * 1000 : cap[k];
}

/** used / capacity of a host for the resource; undefined when the sample lacks them. */
export function hostShare(s: Pick<StreamMetricsResponse, "capacity" | "used">, resource: Resource): number | undefined {
  const k = KEY[resource];
  const cap = capacityOf(s.capacity, k!);
  if (!k || !s.used || cap <= 0) return undefined;
  return s.used[k] / cap;
}

/** A container's use over its limit (over the host's capacity when it has no limit, and for disk). */
export function containerShare(c: ContainerResources, capacity: StreamMetricsResponse["capacity"], resource: Resource): number | undefined {
  const k = KEY[resource];
  if (!k || !c.usage) return undefined;
  const limit = k === "cpuMillicores" ? c.cpuMillicores : k === "memoryBytes" ? c.memoryLimitBytes : 0;
  const base = limit > 0 ? limit : capacityOf(capacity, k);
  return base > 0 ? c.usage[k] / base : undefined;
}

export class Monitor {
  private readonly tasks = new Map<string, ScheduledTask>();
  /** container → when a policy last migrated it (ms, monitor clock). */
  private readonly lastMoved = new Map<string, number>();
  private readonly now: () => number;
  private readonly log: Logger;
  private closed = false;

  constructor(private readonly d: MonitorDeps) {
    this.now = d.now ?? Date.now;
    this.log = d.log.child({ component: "monitor" });
  }

  /** Schedules every enabled policy. */
  start(): void {
    for (const p of this.d.policies.list()) this.schedule(p);
  }

  /** (Re)schedules a policy after SetPolicy; a disabled one is only unscheduled. */
  schedule(p: Policy): void {
    this.unschedule(p.name);
    if (!p.enabled || this.closed) return;
    // createTask starts stopped (node-cron 4.6): start it explicitly, once it is in the map.
    const task = createTask(p.schedule, () => this.tick(p.name), { name: `policy-${p.name}`, noOverlap: true });
    this.tasks.set(p.name, task);
    void task.start();
  }

  unschedule(name: string): void {
    const t = this.tasks.get(name);
    if (!t) return;
    this.tasks.delete(name);
    void t.destroy();
  }

  scheduled(): string[] {
    return [...this.tasks.keys()];
  }

  close(): void {
    this.closed = true;
    for (const name of [...this.tasks.keys()]) this.unschedule(name);
  }

  /** One scheduled run of a policy: never throws (a cron callback has nobody to report to). */
  async tick(name: string): Promise<Evaluation[]> {
    const p = this.d.policies.get(name);
    if (!p || !p.enabled || this.closed) return [];
    try {
      const out = await this.evaluate(p);
      for (const e of out) if (e.breached) this.log.info({ ...e }, "policy evaluated");
      return out;
    } catch (e) {
      this.log.warn({ policy: name, err: asFerryError(e).message }, "policy evaluation failed");
      return [];
    }
  }

  /**
   * Evaluates a policy now on each host it watches: a breach on N consecutive samples (the
   * latest fresh) picks a container (the policy's, or the busiest not cooling down nor migrating)
   * and a destination (reachable, not cordoned, admitted under the policy's strategy, least loaded),
   * and starts a migration with reason `policy:<name>`. At most one migration per host per run.
   */
  async evaluate(p: Policy, o: EvaluateOptions = {}): Promise<Evaluation[]> {
    const now = o.now ?? this.now();
    const samplesOf = o.samples ?? ((h: string) => this.d.hosts.history(h));
    const hosts = p.host ? [p.host] : this.d.hosts.names();
    const out: Evaluation[] = [];
    for (const host of hosts) {
      const ev = (breached: boolean, note: string, extra: Partial<Evaluation> = {}): Evaluation => ({
        policy: p.name,
        host,
        breached,
        note,
        ...extra,
      });
      if (!this.d.hosts.has(host) || !this.d.hosts.isReachable(host)) {
        out.push(ev(false, "host unreachable or unknown"));
        continue;
      }
      const n = Math.max(1, p.sustainedSamples || 3);
      const samples = samplesOf(host).slice(-n);
      if (samples.length < n) {
        out.push(ev(false, `${samples.length} of ${n} samples`));
        continue;
      }
      const latest = samples[samples.length - 1]!;
      const age = now - (latest.sampledAt?.getTime() ?? 0);
      if (age > (this.d.staleMs ?? 30_000)) {
        out.push(ev(false, `latest sample is ${Math.round(age / 1000)} s old`));
        continue;
      }
      const share = (s: StreamMetricsResponse): number | undefined => {
        if (!p.container) return hostShare(s, p.resource);
        const c = s.containers.find((x) => x.name === p.container);
        return c ? containerShare(c, s.capacity, p.resource) : undefined;
      };
      const shares = samples.map(share);
      if (!shares.every((x) => x !== undefined && x > p.threshold)) {
        out.push(
          ev(false, `not above ${p.threshold} for ${n} samples (${shares.map((x) => (x === undefined ? "-" : x.toFixed(2))).join(", ")})`),
        );
        continue;
      }
      const k = KEY[p.resource]!;
      const candidates = latest.containers
        .filter((c) => c.state === ContainerState.CONTAINER_STATE_RUNNING && (!p.container || c.name === p.container))
        .sort((a, b) => (b.usage?.[k] ?? 0) - (a.usage?.[k] ?? 0));
      let pick: ContainerResources | undefined;
      for (const c of candidates) {
        if (this.d.locks.holder(containerLock(c.name).key) || (await this.coolingDown(c.name, p, now))) continue;
        pick = c;
        break;
      }
      if (!pick) {
        out.push(
          ev(
            true,
            candidates.length
              ? "breach, but every candidate is cooling down or being migrated"
              : "breach, but no running container to move",
          ),
        );
        continue;
      }
      try {
        const destination = await this.pickDestination(host, pick, p);
        const m = await this.d.migrations.start(
          { container: pick.name, destination, strategy: p.strategy, mode: MigrationMode.MIGRATION_MODE_UNSPECIFIED },
          `policy:${p.name}`,
        );
        this.lastMoved.set(pick.name, now);
        out.push(ev(true, "migration started", { migrationId: m.id, container: pick.name, destination }));
      } catch (e) {
        out.push(ev(true, `breach, but no migration: ${asFerryError(e).message}`, { container: pick.name }));
      }
    }
    return out;
  }

  /** WatchMetrics: samples as they arrive, for one host or all, until the caller goes. */
  async *watch(host: string, signal: AbortSignal): AsyncIterable<WatchMetricsResponse> {
    if (host) this.d.hosts.get(host);
    const q = new EventQueue<WatchMetricsResponse>(1000);
    const off = this.d.hosts.onMetrics((h, s) => {
      if (!host || h === host) q.push({ host: h, metrics: s });
    });
    try {
      yield* q.drain(signal);
    } finally {
      off();
    }
  }

  private async coolingDown(container: string, p: Policy, now: number): Promise<boolean> {
    const ms = (p.cooldownSeconds || 300) * 1000;
    const last = this.lastMoved.get(container);
    if (last !== undefined && now - last < ms) return true;
    // Also across restarts: the journal remembers policy migrations.
    return (await this.d.journal.list({ container })).some(
      (m) => m.reason.startsWith("policy:") && m.createdAt !== undefined && now - m.createdAt.getTime() < ms,
    );
  }

  /** The least loaded host (share of the policy's resource) that admits the container. */
  private async pickDestination(source: string, c: ContainerResources, p: Policy): Promise<string> {
    const strategy = strategyName(p.strategy, this.d.strategy());
    const k = KEY[p.resource]!;
    const names = this.d.hosts.names().filter((h) => h !== source && this.d.hosts.isReachable(h) && !this.d.hosts.isCordoned(h));
    const refusals: string[] = [];
    const admitted: { host: string; load: number }[] = [];
    await Promise.all(
      names.map(async (h) => {
        let r: GetResourcesResponse;
        try {
          r = await this.d.hosts.client(h).getResources({}, { timeoutMs: this.d.callTimeoutMs ?? 10_000 });
        } catch (e) {
          refusals.push(`${h}: ${asFerryError(e).message}`);
          return;
        }
        try {
          checkAdmission({
            host: h,
            resources: r,
            strategy,
            reserved: this.d.scheduler.reserved(h),
            incoming: {
              name: c.name,
              cpuMillicores: c.cpuMillicores,
              memoryLimitBytes: c.memoryLimitBytes,
              usage: c.usage,
              imageBytes: 0,
              upperBytes: 0,
            },
          });
        } catch (e) {
          refusals.push(asFerryError(e).message);
          return;
        }
        const cap = capacityOf(r.capacity, k);
        admitted.push({ host: h, load: cap > 0 ? (r.used?.[k] ?? 0) / cap : 1 });
      }),
    );
    admitted.sort((a, b) => a.load - b.load || a.host.localeCompare(b.host));
    const best = admitted[0];
    if (!best) {
      throw new FerryError(
        "ResourceExhausted",
        `no host can take "${c.name}"${refusals.length ? `: ${refusals.join("; ")}` : " (no other reachable, uncordoned host)"}`,
        {
          fix: "add a host or free resources",
        },
      );
    }
    return best.host;
  }
}
