import type { Migration, StepRecord } from "@ferry/api/controller";
import type { ErrorCode, FerryError, Logger } from "@ferry/common";

/** How a step's failures are retried (STYLE.md point 6: only codes known to be retryable). */
export interface RetryPolicy {
  /** Attempts in all, the first one included; 1 = never retry. */
  readonly maxAttempts: number;
  /** Wait before the 2nd attempt; doubled for each later one, up to `maxBackoffMs`. */
  readonly initialBackoffMs: number;
  readonly maxBackoffMs: number;
  /** FerryError codes worth another attempt; anything else (and any non-FerryError) fails at once. */
  readonly retryable: ReadonlySet<ErrorCode>;
}

/** What the engine hands a step's `run` / `compensate` for one attempt. */
export interface StepIo {
  /** Aborts on the attempt's timeout, on cancel (before the commit step), or when a sibling in the group failed. */
  readonly signal: AbortSignal;
  /** 1 for the first attempt. */
  readonly attempt: number;
  /**
   * `${migrationId}/${stepName}` for `run`, `${migrationId}/${stepName}/undo` for `compensate`: the
   * operation key every agent call made by the step must carry, so that a retried call (or a call
   * repeated after a controller restart) is answered from the agent's record instead of done twice.
   */
  readonly key: string;
  readonly migrationId: string;
  /** Child logger carrying migrationId and step. */
  readonly log: Logger;
  /** Count bytes moved by this attempt (the record keeps the last attempt's total). */
  addBytes(n: number): void;
  /** A step-specific number for the record, e.g. `detail("criu_freeze_ms", 38)`, `detail("mb_per_s", 412)`. */
  detail(key: string, value: number): void;
}

/** One named, timed, retried unit of a migration, with an optional undo (STYLE.md point 7). */
export interface Step<C> {
  /** Stable: stored in the journal and part of the operation key. Unique within a pipeline. */
  readonly name: string;
  /** Per attempt. */
  readonly timeoutMs: number;
  readonly retry: RetryPolicy;
  /** Inside the service's downtime window (from the freeze to the end of the restore). */
  readonly inDowntime?: boolean;
  /** Per attempt of `compensate`; `timeoutMs` when absent. */
  readonly compensateTimeoutMs?: number;
  run(ctx: C, io: StepIo): Promise<void>;
  /**
   * Undo whatever `run` did, including a `run` that failed or was aborted half-way (it may have
   * half-happened). Must be safe to repeat and to call when `run` did nothing. Retried with `retry`.
   */
  compensate?(ctx: C, io: StepIo): Promise<void>;
}

/** Steps that run in parallel (step 4: transfer ‖ clear source netns ‖ finish destination netns). */
export interface StepGroup<C> {
  readonly group: string;
  readonly steps: readonly Step<C>[];
}

export type Stage<C> = Step<C> | StepGroup<C>;

export function isGroup<C>(s: Stage<C>): s is StepGroup<C> {
  return (s as StepGroup<C>).group !== undefined && Array.isArray((s as StepGroup<C>).steps);
}

/**
 * Where the engine records state changes. It receives a private snapshot each time (safe to keep
 * or serialise later); calls are made one at a time, in order. Changes made while a save is
 * waiting are saved together: `steps` are the step records that changed since the last save
 * (none when only the migration's own state did). `MigrationJournal` implements it; wrap it to
 * also publish to WatchMigration streams.
 */
export interface MigrationRecordSink {
  save(m: Migration, steps: StepRecord[]): Promise<void> | void;
}

export interface PipelineOptions {
  /** The migration's record: id, container, hosts... Its `steps` are (re)built by the engine. */
  migration: Migration;
  record: MigrationRecordSink;
  /** Cancel: honoured until the commit step starts; ignored from then on (point of no return). */
  signal?: AbortSignal;
  log: Logger;
  /** Name of the top-level step after whose success a failure no longer rolls back. */
  commitStep: string;
  /** Milliseconds clock for durations; Date.now by default. */
  now?: () => number;
  /** Backoff sleep; rejects when `signal` aborts. Injectable for tests. */
  sleep?: (ms: number, signal?: AbortSignal) => Promise<void>;
  /**
   * After a step's signal aborts (timeout, cancel, a sibling failed), how long to wait for its
   * `run` to return before moving on (retry, undo) without it; default 2000.
   */
  abortGraceMs?: number;
}

export interface ResumeOptions extends Omit<PipelineOptions, "migration"> {
  /**
   * What to do with a migration that was running normally (no failure, commit not done) when the
   * controller died. "rollback" (default): the step running at the crash may have half-happened;
   * compensations are idempotent, so undoing is the safe choice. "continue": re-run that step (its
   * operation key makes agents answer a repeat from their record) and go on.
   */
  onResume?: "rollback" | "continue";
}

export interface PipelineResult {
  /** The final record, as last saved to the sink. */
  migration: Migration;
  /** Set unless SUCCEEDED without warnings: the original failure (and any failed undo), or the post-commit failures. */
  error?: FerryError;
  /** Post-commit step failures (the migration still SUCCEEDED). */
  warnings: string[];
}
