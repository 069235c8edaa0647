import {
  AdmissionStrategy,
  Migration,
  MigrationMode,
  MigrationState,
  StepState,
  type StartMigrationRequest,
  type StepRecord,
  type WatchMigrationResponse,
} from "@ferry/api/controller";
import { FerryError, asFerryError, validateName, type Logger } from "@ferry/common";
import { randomBytes } from "node:crypto";
import { checkAdmission, checkCapabilities, NO_NEEDS, strategyName, type AdmissionReport, type StrategyName } from "./admission.js";
import type { ContainerService } from "./containers.js";
import type { HostRegistry } from "./hosts.js";
import type { ListMigrationsFilter, MigrationJournal } from "./journal.js";
import { containerLock, hostLock, type LockTable, type Release } from "./locks.js";
import {
  COMMIT_STEP,
  RETIRED_STEPS,
  outputsOfInspected,
  stopAndCopyPipeline,
  type MigrationCtx,
  type MigrationOutputs,
} from "./migration/steps.js";
import {
  UNFINISHED_STATES,
  isCommitted,
  isGroup,
  resumePipeline,
  runPipeline,
  type MigrationRecordSink,
  type PipelineOptions,
  type PipelineResult,
  type Stage,
  type Step,
} from "./pipeline/index.js";
import type { MigrationScheduler, Reservation } from "./scheduler.js";
import type { Sdn } from "./sdn/index.js";
import { EventQueue } from "./queue.js";

export interface MigrationServiceDeps {
  hosts: HostRegistry;
  containers: ContainerService;
  locks: LockTable;
  scheduler: MigrationScheduler;
  journal: MigrationJournal;
  sdn: Sdn;
  log: Logger;
  /** The controller's default admission strategy (for UNSPECIFIED). */
  strategy: () => StrategyName;
  /** The stages to run; `stopAndCopyPipeline()` by default (tests may shorten timeouts). */
  stages?: () => Stage<MigrationCtx>[];
  /** Engine knobs (sleep, abortGraceMs) for tests. */
  pipeline?: Partial<Pick<PipelineOptions, "sleep" | "abortGraceMs" | "now">>;
  /** Deadline of the pre-checks' agent calls; default 15 000. */
  callTimeoutMs?: number;
}

const STRATEGY_ENUM: Record<StrategyName, AdmissionStrategy> = {
  conservative: AdmissionStrategy.ADMISSION_STRATEGY_CONSERVATIVE,
  "semi-conservative": AdmissionStrategy.ADMISSION_STRATEGY_SEMI_CONSERVATIVE,
  live: AdmissionStrategy.ADMISSION_STRATEGY_LIVE,
};

/** `m-<yyyymmdd-hhmmss>-<4 hex>` (UTC): sorts by time, readable, unique enough with the random tail. */
export function newMigrationId(now = new Date()): string {
  const p = (n: number): string => String(n).padStart(2, "0");
  const d = `${now.getUTCFullYear()}${p(now.getUTCMonth() + 1)}${p(now.getUTCDate())}`;
  const t = `${p(now.getUTCHours())}${p(now.getUTCMinutes())}${p(now.getUTCSeconds())}`;
  return `m-${d}-${t}-${randomBytes(2).toString("hex")}`;
}

/**
 * Time not spent in the agents' own work (CRIU, runc, transfers, OVS, as they report it) nor on
 * the network: for each top-level stage, its duration minus its `work_ms` minus one network
 * round trip per agent call (for a parallel group, its longest step's), plus whatever the engine
 * spent between stages (journaling, scheduling). The network round trip is the migration's
 * fastest call's time beyond the agent's own, per host (`rpc_min_ms:<host>`): anything a call took beyond that
 * is counted as the controller's.
 */
export function controlOverheadMs(m: Migration): number {
  // Each host's fastest round trip in this migration: the network's share of a call to it.
  const rtt = new Map<string, number>();
  for (const s of m.steps) {
    for (const [k, v] of Object.entries(s.details)) {
      if (k.startsWith("rpc_min_ms:")) rtt.set(k.slice(11), Math.min(rtt.get(k.slice(11)) ?? Infinity, v));
    }
  }
  const network = (s: Migration["steps"][number]): number =>
    Object.entries(s.details)
      .filter(([k]) => k.startsWith("rpc_calls:"))
      .reduce((sum, [k, calls]) => sum + calls * (rtt.get(k.slice(10)) ?? 0), 0);
  const accounted = (s: Migration["steps"][number]): number => (s.details["work_ms"] ?? 0) + network(s);
  let overhead = m.totalMs;
  const longest = new Map<string, Migration["steps"][number]>();
  for (const s of m.steps) {
    if (!s.group) overhead -= accounted(s);
    else if ((longest.get(s.group)?.durationMs ?? -1) < s.durationMs) longest.set(s.group, s);
  }
  // A group took as long as its longest step: the others' time is hidden behind it.
  for (const s of longest.values()) overhead -= accounted(s);
  return Math.max(0, Math.round(overhead));
}

interface Active {
  abort: AbortController;
  done: Promise<Migration>;
}

/**
 * Migrations: validated, locked, capability-checked and admitted before anything is recorded;
 * then run in the background by the saga engine, recorded in the journal and published to
 * WatchMigration streams; resumed (finished or rolled back) after a controller restart.
 */
export class MigrationService {
  private readonly active = new Map<string, Active>();
  private readonly watchers = new Map<string, Set<EventQueue<WatchMigrationResponse>>>();
  private closed = false;
  private readonly timeoutMs: number;
  private readonly log: Logger;

  constructor(private readonly d: MigrationServiceDeps) {
    this.timeoutMs = d.callTimeoutMs ?? 15_000;
    this.log = d.log.child({ component: "migrations" });
  }

  /** StartMigration: returns the PENDING record once it is in the journal; the migration runs on. */
  async start(req: StartMigrationRequest, reason = "manual"): Promise<Migration> {
    if (this.closed) throw new FerryError("Unavailable", "the controller is shutting down");
    const container = validateName("container", req.container);
    const destination = validateName("destination", req.destination);
    if (req.mode === MigrationMode.MIGRATION_MODE_PAGE_SERVER) {
      throw new FerryError("FailedPrecondition", "mode page-server is not supported yet", {
        field: "mode",
        fix: "use stop-and-copy (the default)",
      });
    }
    this.d.hosts.get(destination);
    const { host: source } = await this.d.containers.locate(container);
    if (source === destination) {
      throw new FerryError("FailedPrecondition", `container "${container}" already runs on ${destination}`, {
        field: "destination",
        fix: "pick another destination",
      });
    }
    this.d.hosts.requireReady("destination", destination, true);
    this.d.hosts.requireReady("source", source, false);
    const strategy = strategyName(req.strategy, this.d.strategy());
    const id = newMigrationId();
    const release = this.d.locks.tryAcquire(
      [containerLock(container), hostLock(source), hostLock(destination)],
      id,
      `migration ${id} (${source} → ${destination})`,
      { doing: "migrated" },
    );
    let reservation: Reservation | undefined;
    let partial = false;
    let seed: MigrationOutputs;
    const startDetails: Record<string, number> = {};
    try {
      const src = this.d.hosts.client(source);
      const dst = this.d.hosts.client(destination);
      const t = { timeoutMs: this.timeoutMs };
      const [srcCaps, dstCaps, dstRes, inspected] = await Promise.all([
        this.call(source, () => src.getCapabilities({}, t)),
        this.call(destination, () => dst.getCapabilities({}, t)),
        this.call(destination, () => dst.getResources({}, t)),
        this.call(source, () => src.inspectContainer({ name: container }, t)),
      ]);
      seed = outputsOfInspected(inspected.container, container, source);
      // Before any freeze: can a checkpoint from the source be restored on the destination at all?
      const caps = checkCapabilities(srcCaps, dstCaps);
      for (const w of caps.warnings) this.log.warn({ container, source, destination, warning: w }, "capability warning");
      if (req.mode === MigrationMode.MIGRATION_MODE_PRE_COPY) {
        // No pre-copy rounds in this build; without dirty tracking they are impossible anyway.
        const dirty = srcCaps.dirtyTracking && dstCaps.dirtyTracking;
        startDetails["precopy_requested"] = 1;
        startDetails["precopy_fallback"] = 1;
        startDetails["dirty_tracking"] = dirty ? 1 : 0;
        this.log.info({ container, dirtyTracking: dirty }, "pre-copy requested: falling back to stop-and-copy");
      }
      // Partial migration: what the destination already has does not travel (nor count for its disk).
      let imageBytes = 0;
      const digest = seed.imageDigest;
      if (digest) {
        const has = await this.call(destination, () => dst.hasBlobs({ digests: [digest] }, t));
        partial = has.present.includes(digest);
        if (!partial) {
          const imgs = await this.call(source, () => src.listImages({}, t));
          imageBytes = imgs.images.find((i) => i.digest === digest)?.sizeBytes ?? 0;
        }
      }
      seed.partial = partial;
      const spec = seed.spec!;
      reservation = this.d.scheduler.reserve({
        id,
        source,
        destination,
        admit: (reserved) =>
          checkAdmission({
            host: destination,
            resources: dstRes,
            strategy,
            reserved,
            incoming: {
              name: container,
              cpuMillicores: spec.cpuMillicores,
              memoryLimitBytes: spec.memoryLimitBytes,
              usage: inspected.container?.usage,
              imageBytes,
              upperBytes: 0,
            },
          }),
      });
      for (const w of reservation.report.warnings) this.log.warn({ container, destination, warning: w }, "admission warning");
    } catch (e) {
      reservation?.release();
      release();
      throw e;
    }

    const record = Migration.fromPartial({
      id,
      container,
      source,
      destination,
      strategy: STRATEGY_ENUM[strategy],
      mode: MigrationMode.MIGRATION_MODE_STOP_AND_COPY,
      state: MigrationState.MIGRATION_STATE_PENDING,
      createdAt: new Date(),
      partial,
      reason,
    });
    if (req.mode === MigrationMode.MIGRATION_MODE_PRE_COPY) record.mode = MigrationMode.MIGRATION_MODE_PRE_COPY;
    try {
      // With what the pre-checks learnt of the container: the pipeline need not ask again.
      await this.d.journal.saveState(record, seed);
    } catch (e) {
      reservation.release();
      release();
      throw new FerryError("Internal", `migration ${id} not recorded: ${asFerryError(e).message}`, { cause: e });
    }
    const ctx = this.context(record, seed);
    this.launch(record, ctx, withStartDetails(this.stages(), startDetails), () => {
      reservation.release();
      release();
    });
    this.log.info({ migrationId: id, container, source, destination, strategy, partial, reason }, "migration started");
    return Migration.fromPartial(record);
  }

  /** After a restart: every migration the journal has as unfinished is finished or rolled back. */
  async resumeAll(): Promise<string[]> {
    const ids: string[] = [];
    for (const m of await this.d.journal.unfinished()) {
      m.steps = m.steps.filter((s) => !RETIRED_STEPS.has(s.name));
      try {
        this.d.hosts.get(m.source);
        this.d.hosts.get(m.destination);
        const release = this.d.locks.tryAcquire(
          [containerLock(m.container), hostLock(m.source), hostLock(m.destination)],
          m.id,
          `migration ${m.id} (${m.source} → ${m.destination})`,
          { doing: "migrated" },
        );
        let reservation: Reservation | undefined;
        try {
          // A resumed migration takes a slot too; its needs were admitted before the restart.
          reservation = this.d.scheduler.reserve({
            id: m.id,
            source: m.source,
            destination: m.destination,
            admit: () => ({ ok: true, report: { needs: NO_NEEDS, warnings: [] } as unknown as AdmissionReport }),
          });
        } catch {
          reservation = undefined;
        }
        const out = (await this.d.journal.getContext<MigrationOutputs>(m.id)) ?? {};
        this.launch(
          m,
          this.context(m, out),
          this.stages(m),
          () => {
            reservation?.release();
            release();
          },
          m,
        );
        ids.push(m.id);
        this.log.info({ migrationId: m.id, state: MigrationState[m.state] }, "migration resumed after restart");
      } catch (e) {
        const fe = asFerryError(e);
        m.state = MigrationState.MIGRATION_STATE_FAILED;
        m.error = `cannot resume after a controller restart: ${fe.message}; check "${m.container}" on ${m.source} and ${m.destination} by hand`;
        m.finishedAt = new Date();
        await this.d.journal.save(m);
        this.log.error({ migrationId: m.id, err: fe.message }, "migration not resumed");
      }
    }
    return ids;
  }

  async get(id: string): Promise<Migration> {
    const m = await this.d.journal.get(id);
    if (!m) throw FerryError.notFound("migration", id, "list migrations with `ferry migrations`");
    return m;
  }

  list(filter: ListMigrationsFilter): Promise<Migration[]> {
    return this.d.journal.list(filter);
  }

  /** The migration as it stands, then every change, until it ends (or the caller goes). */
  async *watch(id: string, signal: AbortSignal): AsyncIterable<WatchMigrationResponse> {
    // Subscribe before reading the snapshot so that no change falls between the two.
    const q = new EventQueue<WatchMigrationResponse>();
    let set = this.watchers.get(id);
    if (!set) this.watchers.set(id, (set = new Set()));
    set.add(q);
    try {
      const m = await this.get(id);
      yield { migration: m, step: undefined };
      if (!UNFINISHED_STATES.has(m.state) || !this.active.has(id)) return;
      yield* q.drain(signal);
    } finally {
      set.delete(q);
      if (set.size === 0 && this.watchers.get(id) === set) this.watchers.delete(id);
    }
  }

  /** CancelMigration: before the commit the migration rolls back; from the commit on it is refused. */
  async cancel(id: string): Promise<Migration> {
    const m = await this.get(id);
    if (!UNFINISHED_STATES.has(m.state)) {
      throw new FerryError("FailedPrecondition", `migration ${id} has already ended (${MigrationState[m.state]})`, {
        fix: "nothing to cancel; migrate the container back if needed",
      });
    }
    const commit = m.steps.find((s) => s.name === COMMIT_STEP);
    if (isCommitted(m, COMMIT_STEP) || commit?.state === StepState.STEP_STATE_RUNNING) {
      throw new FerryError("FailedPrecondition", `migration ${id} is past its commit point (step "${COMMIT_STEP}" has started)`, {
        fix: "let it finish, then migrate the container back",
      });
    }
    const a = this.active.get(id);
    if (!a) throw new FerryError("FailedPrecondition", `migration ${id} is not running in this controller`, { fix: "retry in a moment" });
    a.abort.abort(new FerryError("Cancelled", "cancelled by request"));
    if (m.state === MigrationState.MIGRATION_STATE_RUNNING || m.state === MigrationState.MIGRATION_STATE_PENDING) {
      m.state = MigrationState.MIGRATION_STATE_CANCELLING;
    }
    return m;
  }

  /** The final record of a migration (tests, drain): waits while it runs here. */
  async wait(id: string): Promise<Migration> {
    const a = this.active.get(id);
    return a ? a.done : this.get(id);
  }

  /** Ids of migrations running in this controller. */
  running(): string[] {
    return [...this.active.keys()];
  }

  /** Stops publishing and recording: a closed controller leaves the journal to its successor. */
  close(): void {
    this.closed = true;
    for (const set of this.watchers.values()) for (const q of set) q.end();
    this.watchers.clear();
  }

  // ------------------------------------------------------------------------------------------

  /** The stages of a new migration, or of `m` when resumed. */
  private stages(m?: Migration): Stage<MigrationCtx>[] {
    return this.d.stages ? this.d.stages() : stopAndCopyPipeline(m?.steps.map((s) => s.name));
  }

  private context(m: Migration, out: MigrationOutputs): MigrationCtx {
    const ctx: MigrationCtx = {
      id: m.id,
      container: m.container,
      source: this.d.hosts.handle(m.source),
      dest: this.d.hosts.handle(m.destination),
      sdn: this.d.sdn,
      out,
    };
    return ctx;
  }

  private launch(record: Migration, ctx: MigrationCtx, stages: Stage<MigrationCtx>[], release: Release, resumeFrom?: Migration): void {
    const abort = new AbortController();
    const sink: MigrationRecordSink = {
      save: async (m: Migration, steps: StepRecord[]) => {
        if (this.closed) return;
        m.controlOverheadMs = controlOverheadMs(m);
        m.partial = ctx.out.partial ?? m.partial;
        // The step outputs go with the record: a step's DONE and what it learnt land together.
        await this.d.journal.saveState(m, ctx.out);
        if (steps.length === 0) this.publish(m, undefined);
        for (const step of steps) this.publish(m, step);
      },
    };
    const log = this.d.log;
    const opts = { ...this.d.pipeline, record: sink, log, commitStep: COMMIT_STEP, signal: abort.signal };
    const run: Promise<PipelineResult> = resumeFrom
      ? resumePipeline(stages, ctx, resumeFrom, opts)
      : runPipeline(stages, ctx, { ...opts, migration: record });
    const done = run
      .catch((e: unknown): PipelineResult => {
        // The engine never throws for a step; only a bug gets here. Record it, never lose the migration.
        const error = asFerryError(e);
        log.error({ migrationId: record.id, err: error.message }, "migration engine failed");
        return { migration: { ...record, state: MigrationState.MIGRATION_STATE_FAILED, error: error.message }, error, warnings: [] };
      })
      .then(async (res) => {
        const m = res.migration;
        if (!this.closed) {
          m.controlOverheadMs = controlOverheadMs(m);
          m.partial = ctx.out.partial ?? m.partial;
          await this.d.journal.save(m).catch(() => undefined);
        }
        release();
        const ok = m.state === MigrationState.MIGRATION_STATE_SUCCEEDED;
        const where = ok ? m.destination : m.source;
        if (!this.closed) {
          const client = this.d.hosts.client(where);
          const info = await client
            .inspectContainer({ name: m.container }, { timeoutMs: this.timeoutMs })
            .then((r) => r.container)
            .catch(() => undefined);
          this.d.containers.placed(m.container, where, info);
        }
        this.active.delete(record.id);
        this.publish(m, undefined, true);
        log.info(
          { migrationId: m.id, state: MigrationState[m.state], totalMs: m.totalMs, overheadMs: m.controlOverheadMs },
          "migration finished",
        );
        return m;
      });
    this.active.set(record.id, { abort, done });
  }

  /**
   * Tells the migration's watchers, in order, once the current turn of the event loop is over:
   * after the next agent call is on its way, not before it.
   */
  private publish(m: Migration, step: StepRecord | undefined, end = false): void {
    setImmediate(() => {
      const set = this.watchers.get(m.id);
      if (!set) return;
      for (const q of set) {
        q.push({ migration: Migration.fromPartial(m), step });
        if (end) q.end();
      }
    });
  }

  private async call<T>(host: string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      const fe = asFerryError(e);
      if (fe.code === "Unavailable") this.d.hosts.markUnreachable(host, fe);
      throw fe;
    }
  }
}

/** The first step also records `details` (e.g. that pre-copy fell back to stop-and-copy). */
function withStartDetails(stages: Stage<MigrationCtx>[], details: Record<string, number>): Stage<MigrationCtx>[] {
  if (Object.keys(details).length === 0) return stages;
  const wrap = (s: Step<MigrationCtx>): Step<MigrationCtx> => ({
    ...s,
    run: async (ctx, io) => {
      for (const [k, v] of Object.entries(details)) io.detail(k, v);
      await s.run(ctx, io);
    },
  });
  const [first, ...rest] = stages;
  if (!first) return stages;
  if (!isGroup(first)) return [wrap(first), ...rest];
  const [s0, ...others] = first.steps;
  return s0 ? [{ ...first, steps: [wrap(s0), ...others] }, ...rest] : stages;
}
