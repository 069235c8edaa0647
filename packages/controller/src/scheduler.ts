import { FerryError } from "@ferry/common";
import { NO_NEEDS, type AdmissionReport, type ResourceNeeds } from "./admission.js";

export interface SchedulerOptions {
  /** Migrations running at once, controller-wide (MIRA's parallel migrations); default 4. */
  maxParallel?: number;
  /** Migrations touching one host (as source or destination) at once; unlimited by default. */
  maxPerHost?: number;
}

export interface ReserveRequest {
  /** The migration id. */
  id: string;
  source: string;
  destination: string;
  /**
   * The admission check, run synchronously with what in-flight migrations to `destination`
   * already reserved; throws to refuse (e.g. `(reserved) => checkAdmission({ ..., reserved })`).
   * Its report's `needs` are what this migration reserves.
   */
  admit: (reserved: ResourceNeeds) => { ok: true; report: AdmissionReport };
}

/** A migration's slot and its reservation on the destination; `release` is idempotent. */
export interface Reservation {
  readonly id: string;
  readonly destination: string;
  readonly needs: ResourceNeeds;
  readonly report: AdmissionReport;
  release(): void;
}

/**
 * Bounded parallelism for migrations, with per-destination admission accounting: two parallel
 * migrations to one host are each admitted against its capacity minus what the other reserved.
 *
 * Refuses rather than queues: at the limit, `reserve` throws ResourceExhausted at once. A queue
 * would hide the wait inside StartMigration (or a policy's tick) and keep locks taken meanwhile;
 * a clear refusal lets the admin or the monitor retry, which they already do for other refusals.
 *
 * Everything is synchronous: between the admission check and the reservation nothing else runs,
 * so two concurrent requests cannot both take the last free memory. Gather the destination's
 * resource report (async) first, then call `reserve`.
 */
export class MigrationScheduler {
  private readonly maxParallel: number;
  private readonly maxPerHost: number;
  private readonly active = new Map<string, Reservation & { source: string }>();

  constructor(opts: SchedulerOptions = {}) {
    this.maxParallel = opts.maxParallel ?? 4;
    this.maxPerHost = opts.maxPerHost ?? Infinity;
    if (!(this.maxParallel >= 1)) throw FerryError.invalid("maxParallel", `must be ≥ 1, got ${this.maxParallel}`);
    if (!(this.maxPerHost >= 1)) throw FerryError.invalid("maxPerHost", `must be ≥ 1, got ${this.maxPerHost}`);
  }

  /** Takes a slot and reserves the admitted needs on the destination, or throws (ResourceExhausted, or what `admit` threw). */
  reserve(req: ReserveRequest): Reservation {
    if (this.active.has(req.id)) throw new FerryError("AlreadyExists", `migration ${req.id} already holds a scheduler slot`);
    if (this.active.size >= this.maxParallel) {
      const ids = [...this.active.keys()].join(", ");
      throw new FerryError("ResourceExhausted", `${this.active.size} migrations are running (${ids}), the limit is ${this.maxParallel}`, {
        fix: "retry when one of them ends, or raise the controller's parallel-migration limit",
        data: { resource: "migration-slots", running: this.active.size, limit: this.maxParallel },
      });
    }
    for (const host of new Set([req.source, req.destination])) {
      const n = this.countOn(host);
      if (n >= this.maxPerHost) {
        throw new FerryError("ResourceExhausted", `${n} migrations are using host ${host}, the per-host limit is ${this.maxPerHost}`, {
          fix: `retry when a migration through ${host} ends`,
          data: { resource: "host-migration-slots", host, running: n, limit: this.maxPerHost },
        });
      }
    }
    const { report } = req.admit(this.reserved(req.destination));
    const needs = { ...report.needs };
    let released = false;
    const r = {
      id: req.id,
      source: req.source,
      destination: req.destination,
      needs,
      report,
      release: () => {
        if (released) return;
        released = true;
        if (this.active.get(req.id) === r) this.active.delete(req.id);
      },
    };
    this.active.set(req.id, r);
    return r;
  }

  /** The sum of what in-flight migrations reserved on `host` (as their destination). */
  reserved(host: string): ResourceNeeds {
    const total = { ...NO_NEEDS };
    for (const r of this.active.values()) {
      if (r.destination !== host) continue;
      total.cpuMillicores += r.needs.cpuMillicores;
      total.memoryBytes += r.needs.memoryBytes;
      total.diskBytes += r.needs.diskBytes;
    }
    return total;
  }

  /** Migrations holding a slot now. */
  running(): number {
    return this.active.size;
  }

  /** Ids of the migrations holding a slot. */
  ids(): string[] {
    return [...this.active.keys()];
  }

  private countOn(host: string): number {
    let n = 0;
    for (const r of this.active.values()) if (r.source === host || r.destination === host) n++;
    return n;
  }
}
