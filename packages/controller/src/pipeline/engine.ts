/*
 * The migration saga engine: an explicit list of named steps, each timed, retried and undoable.
 *
 * Migration states (MigrationState), as the engine drives them:
 *
 *   PENDING ──run──> RUNNING ──every step done──────────────────────────────> SUCCEEDED
 *                      │  │                                                    ^
 *                      │  └─commit step done; a later step fails (no undo)────┘ (error = warning)
 *                      │
 *                      ├─cancel (before the commit step starts)──> CANCELLING ─┐
 *                      │                                                      │
 *                      └─a step fails before the commit step is done──────────┤
 *                                                                             v
 *                              ROLLING_BACK: compensate every started step, in reverse
 *                                    │                           │
 *                                    │ all undos ok              │ some undo failed
 *                                    v                           v
 *                               ROLLED_BACK                   FAILED (error names the original
 *                                                                     failure and each failed undo)
 *
 * Step states (StepState):  PENDING ─> RUNNING ─> DONE ─(rollback)─> COMPENSATED
 *                                         │                  └─(undo fails)─> FAILED
 *                                         └─> FAILED ─(rollback)─> COMPENSATED | FAILED ("undo failed: ...")
 *                           PENDING ─(rollback)─> SKIPPED
 *
 * Resume after a controller restart (journal says PENDING/RUNNING/CANCELLING/ROLLING_BACK):
 *   commit step DONE                          -> roll forward: run the steps not DONE
 *   CANCELLING / ROLLING_BACK / a step FAILED -> finish the rollback (started steps not COMPENSATED)
 *   otherwise                                 -> onResume: "rollback" (default) | "continue"
 *   A step recorded RUNNING at the crash counts as started: it may have half-happened. A step
 *   with an undo is recorded RUNNING before it acts (write-ahead); one without may not be.
 */
import { MigrationState, StepState, type Migration, type StepRecord } from "@ferry/api/controller";
import { FerryError, RETRYABLE_CODES, asFerryError, type Logger } from "@ferry/common";
import { setTimeout as sleepTimer } from "node:timers/promises";
import {
  isGroup,
  type PipelineOptions,
  type PipelineResult,
  type ResumeOptions,
  type RetryPolicy,
  type Stage,
  type Step,
  type StepIo,
} from "./types.js";

/** Three attempts, 200 ms then 400 ms apart, on the codes of RETRYABLE_CODES. */
export const DEFAULT_RETRY: RetryPolicy = {
  maxAttempts: 3,
  initialBackoffMs: 200,
  maxBackoffMs: 2_000,
  retryable: RETRYABLE_CODES,
};

/** One attempt only: for steps that must never run twice on their own (rare: prefer operation keys). */
export const NO_RETRY: RetryPolicy = { ...DEFAULT_RETRY, maxAttempts: 1 };

/** A policy from DEFAULT_RETRY with some fields changed. */
export function retryPolicy(p: Partial<RetryPolicy>): RetryPolicy {
  return { ...DEFAULT_RETRY, ...p };
}

/** Wait before attempt `attempt + 1` (attempt ≥ 1): initial·2^(attempt-1), capped. */
export function backoffMs(policy: RetryPolicy, attempt: number): number {
  return Math.min(policy.maxBackoffMs, policy.initialBackoffMs * 2 ** (attempt - 1));
}

/** States of a migration that has not ended (the journal's `unfinished()` uses the same set). */
export const UNFINISHED_STATES: ReadonlySet<MigrationState> = new Set([
  MigrationState.MIGRATION_STATE_PENDING,
  MigrationState.MIGRATION_STATE_RUNNING,
  MigrationState.MIGRATION_STATE_CANCELLING,
  MigrationState.MIGRATION_STATE_ROLLING_BACK,
]);

/** True once the named commit step is DONE: cancel is refused and failures no longer roll back. */
export function isCommitted(m: Migration, commitStep: string): boolean {
  return m.steps.some((s) => s.name === commitStep && s.state === StepState.STEP_STATE_DONE);
}

/** Checks the stages once, before anything runs: a malformed pipeline is a programming error. */
export function validateStages<C>(stages: readonly Stage<C>[], commitStep: string): void {
  const seen = new Set<string>();
  const check = (s: Step<C>): void => {
    if (seen.has(s.name)) throw new FerryError("Internal", `pipeline: step name "${s.name}" is used twice`);
    seen.add(s.name);
    if (!(s.timeoutMs > 0)) throw new FerryError("Internal", `pipeline: step "${s.name}" needs timeoutMs > 0`);
    if (!(s.retry.maxAttempts >= 1)) throw new FerryError("Internal", `pipeline: step "${s.name}" needs retry.maxAttempts ≥ 1`);
  };
  const groups = new Set<string>();
  for (const st of stages) {
    if (isGroup(st)) {
      // A group may share its name with one of its steps (step 4's "transfer"); groups are distinct.
      if (groups.has(st.group)) throw new FerryError("Internal", `pipeline: group name "${st.group}" is used twice`);
      groups.add(st.group);
      for (const s of st.steps) {
        if (s.name === commitStep) {
          throw new FerryError("Internal", `pipeline: the commit step "${commitStep}" must not run in a parallel group`);
        }
        check(s);
      }
    } else check(st);
  }
  const top = stages.some((st) => !isGroup(st) && st.name === commitStep);
  if (!top) throw new FerryError("Internal", `pipeline: commit step "${commitStep}" is not one of the steps`);
}

/**
 * Runs a migration's stages in order and returns its final record; never throws for a step's
 * failure (the result's `error` and the record say what happened). Before the commit step is
 * done, a failure or a cancel compensates every started step in reverse → ROLLED_BACK, or FAILED
 * when an undo fails. After it, a failing step (retried first) is recorded, the remaining steps
 * still run (they are clean-ups), and the migration ends SUCCEEDED with the failures as warnings in
 * `error`: the container runs on the destination, nothing needs undoing.
 */
export async function runPipeline<C>(stages: readonly Stage<C>[], ctx: C, opts: PipelineOptions): Promise<PipelineResult> {
  validateStages(stages, opts.commitStep);
  const run = new PipelineRun(stages, ctx, opts, structuredClone(opts.migration), false);
  return run.start(async () => {
    const failure = await run.forward();
    return failure ? run.rollback(failure.error, failure.step) : run.succeed();
  });
}

/**
 * Continues a migration the journal recorded as unfinished, after a controller restart: steps
 * recorded DONE are never run again. See the diagram at the top of this file for the decision.
 * A migration already ended is returned as saved.
 */
export async function resumePipeline<C>(
  stages: readonly Stage<C>[],
  ctx: C,
  saved: Migration,
  opts: ResumeOptions,
): Promise<PipelineResult> {
  validateStages(stages, opts.commitStep);
  const run = new PipelineRun(stages, ctx, { ...opts, migration: saved }, structuredClone(saved), true);
  if (!UNFINISHED_STATES.has(saved.state)) return run.ended();
  return run.start(async () => {
    const m = run.record;
    const started = m.steps.filter((s) => s.state === StepState.STEP_STATE_RUNNING).map((s) => `"${s.name}"`);
    if (isCommitted(m, opts.commitStep)) {
      run.log.info({ decision: "roll-forward" }, "migration resumed");
      const failure = await run.forward();
      return failure ? run.rollback(failure.error, failure.step) : run.succeed();
    }
    const wasRollingBack =
      m.state === MigrationState.MIGRATION_STATE_ROLLING_BACK ||
      m.state === MigrationState.MIGRATION_STATE_CANCELLING ||
      m.steps.some((s) => s.state === StepState.STEP_STATE_FAILED || s.state === StepState.STEP_STATE_COMPENSATED);
    if (wasRollingBack) {
      run.log.info({ decision: "finish-rollback" }, "migration resumed");
      const code = m.state === MigrationState.MIGRATION_STATE_CANCELLING ? "Cancelled" : "Aborted";
      return run.rollback(new FerryError(code, m.error || "the migration was rolling back when the controller restarted"));
    }
    if (opts.onResume === "continue") {
      run.log.info({ decision: "continue" }, "migration resumed");
      const failure = await run.forward();
      return failure ? run.rollback(failure.error, failure.step) : run.succeed();
    }
    run.log.info({ decision: "rollback" }, "migration resumed");
    const during = started.length ? ` while step ${started.join(", ")} was running` : "";
    return run.rollback(new FerryError("Aborted", `the controller restarted${during}, before the commit (onResume: "rollback")`));
  });
}

interface Failure {
  step: string;
  error: FerryError;
}

type Outcome = { ok: true } | { ok: false; error: FerryError; retriable: boolean };

const RUN_STATES_STARTED: ReadonlySet<StepState> = new Set([
  StepState.STEP_STATE_RUNNING,
  StepState.STEP_STATE_DONE,
  StepState.STEP_STATE_FAILED,
]);

/** One execution of a pipeline (a fresh run or a resume): owns the record and its saves. */
class PipelineRun<C> {
  readonly log: Logger;
  private readonly now: () => number;
  private readonly sleep: (ms: number, signal?: AbortSignal) => Promise<void>;
  private readonly steps = new Map<string, { step: Step<C>; group: string }>();
  private readonly recs = new Map<string, StepRecord>();
  /** Aborted on cancel, while the commit step has not started; steps before it listen to it. */
  private readonly cancelCtl = new AbortController();
  private commitStarted = false;
  /** The save last queued (the next one starts after it), and the one not yet started, if any. */
  private saving: Promise<void> = Promise.resolve();
  private pending: { done: Promise<void>; kick: () => void; steps: Set<string> } | undefined;
  private readonly t0: number;
  private readonly baseTotalMs: number;
  private readonly warnings: string[] = [];
  private readonly abortGraceMs: number;

  constructor(
    private readonly stages: readonly Stage<C>[],
    private readonly ctx: C,
    private readonly opts: PipelineOptions,
    readonly record: Migration,
    resuming: boolean,
  ) {
    this.now = opts.now ?? Date.now;
    this.sleep = opts.sleep ?? ((ms, signal) => sleepTimer(ms, undefined, signal ? { signal } : {}));
    this.abortGraceMs = opts.abortGraceMs ?? 2_000;
    this.log = opts.log.child({ migrationId: record.id, container: record.container });
    this.t0 = this.now();
    this.baseTotalMs = resuming ? record.totalMs : 0;
    this.record.createdAt ??= new Date(this.t0);
    // Records in declaration order; a saved record keeps its state (resume), unknown ones go last.
    const old = new Map(record.steps.map((r) => [r.name, r]));
    const steps: StepRecord[] = [];
    const add = (s: Step<C>, group: string): void => {
      this.steps.set(s.name, { step: s, group });
      const r = old.get(s.name) ?? newRecord(s, group);
      old.delete(s.name);
      this.recs.set(s.name, r);
      steps.push(r);
    };
    for (const st of stages) {
      if (isGroup(st)) for (const s of st.steps) add(s, st.group);
      else add(st, "");
    }
    for (const r of old.values()) {
      this.recs.set(r.name, r);
      steps.push(r);
    }
    this.record.steps = steps;
    this.commitStarted = this.recs.get(opts.commitStep)?.state === StepState.STEP_STATE_DONE;
  }

  /** Wires cancel, marks the migration RUNNING, runs `body`, and always detaches the listener. */
  async start(body: () => Promise<PipelineResult>): Promise<PipelineResult> {
    const outer = this.opts.signal;
    const onCancel = (): void => this.onCancel();
    outer?.addEventListener("abort", onCancel, { once: true });
    try {
      if (
        this.record.state === MigrationState.MIGRATION_STATE_PENDING ||
        this.record.state === MigrationState.MIGRATION_STATE_UNSPECIFIED
      ) {
        this.record.state = MigrationState.MIGRATION_STATE_RUNNING;
      }
      // The first step's RUNNING save (awaited) carries it.
      void this.persist(undefined, true);
      if (outer?.aborted) this.onCancel();
      return await body();
    } finally {
      outer?.removeEventListener("abort", onCancel);
    }
  }

  private onCancel(): void {
    if (this.commitStarted) {
      this.log.warn({ commitStep: this.opts.commitStep }, "cancel ignored: the commit step has started");
      return;
    }
    if (this.cancelCtl.signal.aborted) return;
    this.log.info("migration cancelling");
    if (this.record.state === MigrationState.MIGRATION_STATE_RUNNING) {
      this.record.state = MigrationState.MIGRATION_STATE_CANCELLING;
      void this.persist();
    }
    this.cancelCtl.abort(new FerryError("Cancelled", "cancelled by request"));
  }

  /** Runs every stage not yet done; returns the first failure before the commit, if any. */
  async forward(): Promise<Failure | undefined> {
    for (const st of this.stages) {
      const todo = (isGroup(st) ? st.steps : [st]).filter((s) => this.rec(s.name).state !== StepState.STEP_STATE_DONE);
      if (todo.length === 0) continue;
      const postCommit = this.commitStarted;
      if (!postCommit && this.cancelCtl.signal.aborted) {
        return { step: todo[0]!.name, error: this.cancelCtl.signal.reason as FerryError };
      }
      if (!isGroup(st) && st.name === this.opts.commitStep) this.commitStarted = true;
      // From the commit step on, cancel no longer reaches the steps: a signal that never aborts.
      const parent = this.commitStarted ? new AbortController().signal : this.cancelCtl.signal;
      const failure = isGroup(st) ? await this.runGroup(st.group, todo, parent) : await this.runStep(st, parent);
      if (!failure) continue;
      if (postCommit) {
        const w = `step "${failure.step}" failed after the commit: ${failure.error.message}`;
        this.warnings.push(w);
        this.log.warn({ step: failure.step, err: failure.error.message }, "post-commit step failed");
        continue;
      }
      return failure;
    }
    return undefined;
  }

  private async runGroup(group: string, steps: readonly Step<C>[], parent: AbortSignal): Promise<Failure | undefined> {
    const gc = new AbortController();
    const onParent = (): void => gc.abort(parent.reason);
    parent.addEventListener("abort", onParent, { once: true });
    if (parent.aborted) onParent();
    let first: Failure | undefined;
    try {
      await Promise.all(
        steps.map(async (s) => {
          const f = await this.runStep(s, gc.signal);
          if (f && !first) {
            first = f;
            // Siblings stop at once: their signals abort, then we wait for them to return.
            gc.abort(new FerryError("Aborted", `stopped because step "${s.name}" of group "${group}" failed`));
          }
        }),
      );
    } finally {
      parent.removeEventListener("abort", onParent);
    }
    return first;
  }

  private async runStep(step: Step<C>, parent: AbortSignal): Promise<Failure | undefined> {
    const rec = this.rec(step.name);
    const log = this.log.child({ step: step.name });
    const t = this.now();
    rec.state = StepState.STEP_STATE_RUNNING;
    rec.startedAt = new Date(t);
    rec.attempts = 0;
    rec.error = "";
    rec.durationMs = 0;
    rec.bytes = 0;
    rec.details = {};
    log.info({ inDowntime: !!step.inDowntime }, "step started");
    const outcome = await this.retrying(step, "run", step.timeoutMs, parent, log, rec, async () => {
      // Write-ahead: RUNNING is durable before a step with an undo acts, so that a restarted
      // controller knows to undo it. A step without one leaves nothing to undo (a resume runs it
      // again or not at all): its RUNNING save goes with the next one.
      if (step.compensate) await this.persist(rec);
      else void this.persist(rec, true);
    });
    rec.durationMs = Math.round(this.now() - t);
    if (outcome.ok) {
      rec.state = StepState.STEP_STATE_DONE;
      log.info({ durationMs: rec.durationMs, attempts: rec.attempts, bytes: rec.bytes, details: rec.details }, "step done");
      // Not awaited, and lazy: the next step's RUNNING save (awaited) carries it, or the end's
      // final save does, so DONE is durable before anything depends on it, and a step boundary
      // costs one durable write on the downtime's critical path.
      void this.persist(rec, true);
      return undefined;
    }
    rec.state = StepState.STEP_STATE_FAILED;
    rec.error = outcome.error.message;
    log.warn({ durationMs: rec.durationMs, attempts: rec.attempts, code: outcome.error.code, err: outcome.error.message }, "step failed");
    await this.persist(rec);
    return { step: step.name, error: outcome.error };
  }

  /**
   * Attempts `run` or `compensate` until it succeeds, fails with a code not in the retry set (or
   * with a non-FerryError), runs out of attempts, or `parent` aborts (cancel / a sibling failed).
   */
  private async retrying(
    step: Step<C>,
    kind: "run" | "undo",
    timeoutMs: number,
    parent: AbortSignal,
    log: Logger,
    rec: StepRecord,
    beforeAttempt: () => Promise<void>,
  ): Promise<Outcome> {
    const fn = kind === "run" ? step.run.bind(step) : step.compensate!.bind(step);
    const policy = step.retry;
    let last: Outcome = { ok: false, error: new FerryError("Internal", "no attempt made"), retriable: false };
    for (let attempt = 1; attempt <= policy.maxAttempts; attempt++) {
      if (kind === "run") rec.attempts = attempt;
      else rec.details["undo_attempts"] = attempt;
      await beforeAttempt();
      if (parent.aborted) return { ok: false, error: asFerryError(parent.reason), retriable: false };
      if (kind === "run") rec.bytes = 0;
      let bytes = 0;
      const io: Omit<StepIo, "signal"> = {
        attempt,
        key: `${this.record.id}/${step.name}${kind === "undo" ? "/undo" : ""}`,
        migrationId: this.record.id,
        log,
        addBytes: (n) => {
          bytes += n;
          if (kind === "run") rec.bytes = bytes;
          else rec.details["undo_bytes"] = bytes;
        },
        detail: (k, v) => {
          rec.details[k] = v;
        },
      };
      last = await this.attempt(step.name, kind, attempt, timeoutMs, parent, (signal) => fn(this.ctx, { ...io, signal }));
      if (last.ok) return last;
      if (parent.aborted) return { ok: false, error: asFerryError(parent.reason), retriable: false };
      if (!last.retriable || !policy.retryable.has(last.error.code) || attempt === policy.maxAttempts) return last;
      const wait = backoffMs(policy, attempt);
      log.warn({ attempt, code: last.error.code, err: last.error.message, backoffMs: wait, kind }, "step attempt failed, retrying");
      try {
        await this.sleep(wait, parent);
      } catch {
        return { ok: false, error: asFerryError(parent.reason ?? last.error), retriable: false };
      }
    }
    return last;
  }

  /** One attempt with its own deadline; resolves as soon as the signal aborts, even if `fn` ignores it. */
  private async attempt(
    name: string,
    kind: "run" | "undo",
    attempt: number,
    timeoutMs: number,
    parent: AbortSignal,
    fn: (signal: AbortSignal) => Promise<void>,
  ): Promise<Outcome> {
    const ac = new AbortController();
    const onParent = (): void => ac.abort(parent.reason);
    parent.addEventListener("abort", onParent, { once: true });
    const what = kind === "run" ? `step "${name}"` : `undo of step "${name}"`;
    const timer = setTimeout(
      () => ac.abort(new FerryError("DeadlineExceeded", `${what} timed out after ${timeoutMs} ms (attempt ${attempt})`)),
      timeoutMs,
    );
    // A step that throws synchronously is caught the same way as one that rejects.
    const work = Promise.resolve().then(() => fn(ac.signal));
    const aborted = new Promise<never>((_, reject) => {
      ac.signal.addEventListener("abort", () => reject(asFerryError(ac.signal.reason)), { once: true });
    });
    aborted.catch(() => undefined);
    try {
      await Promise.race([work, aborted]);
      return { ok: true };
    } catch (e) {
      if (ac.signal.aborted) {
        // Let the step wind down (bounded), so a retry, a sibling's failure or an undo never
        // overlaps with the attempt it replaces; a step that ignores its signal is left behind.
        await settledWithin(work, this.abortGraceMs);
        const reason: unknown = ac.signal.reason;
        return { ok: false, error: asFerryError(reason), retriable: reason instanceof FerryError };
      }
      // Only a FerryError may be retried: an unknown error is a bug or an unclassified failure.
      return { ok: false, error: asFerryError(e), retriable: e instanceof FerryError };
    } finally {
      clearTimeout(timer);
      parent.removeEventListener("abort", onParent);
    }
  }

  /**
   * Compensates every started step not yet compensated, last first, each on its own time budget
   * (never the cancel signal), going on past a failed undo; then ends ROLLED_BACK or FAILED.
   */
  async rollback(cause: FerryError, failedStep?: string): Promise<PipelineResult> {
    const m = this.record;
    const origin =
      cause.code === "Cancelled" && failedStep
        ? `${cause.message} during step "${failedStep}"`
        : failedStep
          ? `step "${failedStep}" failed: ${cause.message}`
          : cause.message;
    m.state = MigrationState.MIGRATION_STATE_ROLLING_BACK;
    m.error = origin;
    this.log.warn({ code: cause.code, err: origin }, "migration rolling back");
    await this.persist();

    const undoFailures: { step: string; code: string; message: string }[] = [];
    const never = new AbortController().signal;
    for (const rec of [...m.steps].reverse()) {
      if (!RUN_STATES_STARTED.has(rec.state)) continue;
      const entry = this.steps.get(rec.name);
      if (!entry) {
        // Saved by another version of the controller: nothing here knows how to undo it.
        const message = `step "${rec.name}" is unknown to this controller version; undo it by hand`;
        undoFailures.push({ step: rec.name, code: "Internal", message });
        continue;
      }
      const { step } = entry;
      if (!step.compensate) continue;
      const log = this.log.child({ step: step.name });
      const t = this.now();
      log.info("undo started");
      const outcome = await this.retrying(step, "undo", step.compensateTimeoutMs ?? step.timeoutMs, never, log, rec, async () => {
        await this.persist(rec);
      });
      rec.details["undo_ms"] = Math.round(this.now() - t);
      if (outcome.ok) {
        rec.state = StepState.STEP_STATE_COMPENSATED;
        log.info({ undoMs: rec.details["undo_ms"] }, "undo done");
      } else {
        rec.state = StepState.STEP_STATE_FAILED;
        const prefix = rec.error && !rec.error.startsWith("undo failed") ? `${rec.error}; ` : "";
        rec.error = `${prefix}undo failed: ${outcome.error.message}`;
        undoFailures.push({ step: step.name, code: outcome.error.code, message: outcome.error.message });
        log.error({ code: outcome.error.code, err: outcome.error.message }, "undo failed");
      }
      await this.persist(rec);
    }
    for (const rec of m.steps) if (rec.state === StepState.STEP_STATE_PENDING) rec.state = StepState.STEP_STATE_SKIPPED;

    let error: FerryError;
    if (undoFailures.length === 0) {
      m.state = MigrationState.MIGRATION_STATE_ROLLED_BACK;
      error = new FerryError(cause.code, `migration ${m.id} rolled back: ${origin}`, {
        cause,
        data: { ...(failedStep ? { step: failedStep } : {}), rolledBack: true },
        ...(cause.fix ? { fix: cause.fix } : {}),
      });
    } else {
      m.state = MigrationState.MIGRATION_STATE_FAILED;
      const undos = undoFailures.map((u) => `undo of "${u.step}" failed: ${u.message}`).join("; ");
      error = new FerryError(cause.code, `migration ${m.id} failed and its rollback is incomplete: ${origin}; ${undos}`, {
        cause,
        fix: `clean up what the failed undo steps left (${undoFailures.map((u) => u.step).join(", ")}) by hand`,
        data: { ...(failedStep ? { step: failedStep } : {}), rolledBack: false, undoFailures },
      });
    }
    m.error = error.message;
    return this.finish(error);
  }

  async succeed(): Promise<PipelineResult> {
    const m = this.record;
    m.state = MigrationState.MIGRATION_STATE_SUCCEEDED;
    m.error = this.warnings.length ? `committed, with warnings: ${this.warnings.join("; ")}` : "";
    return this.finish(undefined);
  }

  /** A migration the journal already has as ended. */
  ended(): PipelineResult {
    const m = this.record;
    const ok = m.state === MigrationState.MIGRATION_STATE_SUCCEEDED;
    const code = m.state === MigrationState.MIGRATION_STATE_ROLLED_BACK ? "Aborted" : "Internal";
    return { migration: m, warnings: [], ...(ok || !m.error ? {} : { error: new FerryError(code, m.error) }) };
  }

  private async finish(error: FerryError | undefined): Promise<PipelineResult> {
    const m = this.record;
    m.finishedAt = new Date(this.now());
    await this.persist();
    this.log.info(
      { state: MigrationState[m.state], totalMs: m.totalMs, downtimeMs: m.downtimeMs, bytes: m.bytesTransferred },
      "migration ended",
    );
    return { migration: structuredClone(m), warnings: [...this.warnings], ...(error ? { error } : {}) };
  }

  private rec(name: string): StepRecord {
    const r = this.recs.get(name);
    if (!r) throw new FerryError("Internal", `pipeline: no record for step "${name}"`);
    return r;
  }

  private updateTotals(): void {
    const m = this.record;
    const now = this.now();
    m.totalMs = Math.round(this.baseTotalMs + (now - this.t0));
    m.bytesTransferred = m.steps.reduce((a, s) => a + s.bytes, 0);
    // Downtime: from the start of the first in-downtime step to the end of the last one.
    let from = Infinity;
    let to = -Infinity;
    for (const s of m.steps) {
      if (!s.inDowntime || !s.startedAt) continue;
      const start = s.startedAt.getTime();
      const end = s.state === StepState.STEP_STATE_RUNNING ? now : start + s.durationMs;
      from = Math.min(from, start);
      to = Math.max(to, end);
    }
    m.downtimeMs = to > from ? Math.round(to - from) : 0;
  }

  /**
   * Saves the record to the sink, with `step` among the steps that changed. Saves happen one at a
   * time, in order, each with the record as it is when it starts; persists made while a save is
   * waiting join it (group commit), so a group's steps starting together cost one durable write.
   * `lazy` (a step done): the save waits one turn of the event loop, for the next step's RUNNING
   * save to join it, so a step boundary costs one write, not two. The returned promise resolves
   * once a save including this change is done. A sink failure is logged, not fatal: the
   * migration's safety does not depend on the journal unless the controller also dies (then the
   * last good version is what resume sees).
   */
  private persist(step?: StepRecord, lazy = false): Promise<void> {
    this.updateTotals();
    let p = this.pending;
    if (!p) {
      let kick!: () => void;
      const kicked = new Promise<void>((resolve) => (kick = resolve));
      const steps = new Set<string>();
      const done = Promise.all([kicked, this.saving])
        .then(async () => {
          // From here on, changes go to the next save.
          this.pending = undefined;
          const changed = [...steps].map((n) => structuredClone(this.rec(n)));
          await this.opts.record.save(structuredClone(this.record), changed);
        })
        .catch((e: unknown) => {
          this.log.error({ err: asFerryError(e).message }, "migration record not saved");
        });
      this.saving = done;
      p = this.pending = { done, kick, steps };
      if (lazy) setImmediate(kick);
      else kick();
    } else if (!lazy) p.kick();
    if (step) p.steps.add(step.name);
    return p.done;
  }
}

/** Waits for `p` to settle, at most `ms`; never rejects. */
async function settledWithin(p: Promise<unknown>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([
    p.then(
      () => undefined,
      () => undefined,
    ),
    new Promise<void>((r) => {
      timer = setTimeout(r, ms);
    }),
  ]);
  clearTimeout(timer);
}

function newRecord<C>(s: Step<C>, group: string): StepRecord {
  return {
    name: s.name,
    state: StepState.STEP_STATE_PENDING,
    startedAt: undefined,
    durationMs: 0,
    attempts: 0,
    bytes: 0,
    error: "",
    inDowntime: !!s.inDowntime,
    group,
    details: {},
  };
}
