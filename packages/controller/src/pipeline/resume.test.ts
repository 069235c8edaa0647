// Resume after a simulated controller crash: the first engine's journal writes stop at the crash
// point (what a killed process leaves on disk); a new journal instance reads the directory and a
// new engine, with fresh step instances, resumes from it.
import { MigrationState, StepState, type Migration, type StepRecord } from "@ferry/api/controller";
import { silentLogger } from "@ferry/common";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { MigrationJournal } from "../journal.js";
import { resumePipeline, runPipeline } from "./engine.js";
import { fail, fakeStep, newMigration, untilAborted } from "./testkit.js";
import type { MigrationRecordSink, ResumeOptions, Stage } from "./types.js";

const S = StepState;
const M = MigrationState;
const NAMES = ["validate", "prepare", "checkpoint", "transfer", "restore", "cleanup"];
const COMMIT = "restore";

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "ferry-resume-"));
});
afterEach(async () => {
  await Promise.all(opened.splice(0).map((j) => j.close()));
  await rm(dir, { recursive: true, force: true });
});

/** Journals opened by a test, closed after it (a journal keeps its unfinished migrations' logs open). */
const opened: MigrationJournal[] = [];
async function openJournal(stateDir: string): Promise<MigrationJournal> {
  const j = await MigrationJournal.open(stateDir);
  opened.push(j);
  return j;
}

/** Forwards saves to the journal until `crashAfter` matches a save; drops every later one. */
class CrashingSink implements MigrationRecordSink {
  private dead = false;
  constructor(
    private readonly journal: MigrationJournal,
    private readonly crashAfter: (m: Migration, step: StepRecord) => boolean,
  ) {}
  async save(m: Migration, steps: StepRecord[]): Promise<void> {
    if (this.dead) return;
    await this.journal.save(m);
    if (steps.some((s) => this.crashAfter(m, s))) this.dead = true;
  }
}

type Overrides = Record<string, Parameters<typeof fakeStep>[2]>;
const pipeline = (trace: string[], o: Overrides = {}): Stage<unknown>[] => NAMES.map((n) => fakeStep(n, trace, o[n] ?? {}));

/** Runs a first engine until the crash point, then returns what a restarted controller reads. */
async function crashAt(
  crashAfter: (m: Migration, step: StepRecord) => boolean,
  o: Overrides = {},
): Promise<{ saved: Migration; before: string[] }> {
  const j1 = await openJournal(dir);
  const before: string[] = [];
  // The first engine runs to its end in memory; only the journal (the disk) stopped at the crash.
  await runPipeline(
    pipeline(before, o),
    {},
    {
      migration: newMigration("m-7"),
      record: new CrashingSink(j1, crashAfter),
      log: silentLogger,
      commitStep: COMMIT,
      sleep: async () => undefined,
    },
  );
  await j1.flush();
  const j2 = await openJournal(dir);
  const unfinished = await j2.unfinished();
  expect(unfinished.map((m) => m.id)).toEqual(["m-7"]);
  return { saved: unfinished[0]!, before };
}

async function resume(saved: Migration, trace: string[], over: Partial<ResumeOptions> = {}, o: Overrides = {}) {
  const j = await openJournal(dir);
  const r = await resumePipeline(pipeline(trace, o), {}, saved, {
    record: j,
    log: silentLogger,
    commitStep: COMMIT,
    sleep: async () => undefined,
    ...over,
  });
  const reread = await (await openJournal(dir)).get("m-7");
  expect(reread).toEqual(r.migration);
  expect(await (await openJournal(dir)).unfinished()).toEqual([]);
  return r;
}

const runningStep = (name: string) => (_m: Migration, step: StepRecord) => step.name === name && step.state === S.STEP_STATE_RUNNING;
const states = (m: Migration) => Object.fromEntries(m.steps.map((s) => [s.name, s.state]));

describe("resumePipeline after a controller crash", () => {
  it("crash before the commit → rolls back: undoes the started steps (the one running too), skips the others, re-runs nothing", async () => {
    const { saved } = await crashAt(runningStep("checkpoint"));
    expect(saved.state).toBe(M.MIGRATION_STATE_RUNNING);
    expect(states(saved)).toMatchObject({
      validate: S.STEP_STATE_DONE,
      prepare: S.STEP_STATE_DONE,
      checkpoint: S.STEP_STATE_RUNNING,
      transfer: S.STEP_STATE_PENDING,
    });

    const trace: string[] = [];
    const r = await resume(saved, trace);
    expect(trace).toEqual(["undo:checkpoint", "undo:prepare", "undo:validate"]);
    expect(r.migration.state).toBe(M.MIGRATION_STATE_ROLLED_BACK);
    expect(r.error?.code).toBe("Aborted");
    expect(r.error?.message).toMatch(/the controller restarted while step "checkpoint" was running, before the commit/);
    expect(states(r.migration)).toEqual({
      validate: S.STEP_STATE_COMPENSATED,
      prepare: S.STEP_STATE_COMPENSATED,
      checkpoint: S.STEP_STATE_COMPENSATED,
      transfer: S.STEP_STATE_SKIPPED,
      restore: S.STEP_STATE_SKIPPED,
      cleanup: S.STEP_STATE_SKIPPED,
    });
    // Work done before the crash keeps its record.
    expect(r.migration.steps[0]!.attempts).toBe(1);
    expect(r.migration.steps[0]!.startedAt).toEqual(saved.steps[0]!.startedAt);
  });

  it('crash before the commit with onResume "continue" → re-runs the interrupted step and goes on', async () => {
    const { saved } = await crashAt(runningStep("checkpoint"));
    const trace: string[] = [];
    const r = await resume(saved, trace, { onResume: "continue" });
    expect(trace).toEqual(["run:checkpoint", "run:transfer", "run:restore", "run:cleanup"]);
    expect(r.migration.state).toBe(M.MIGRATION_STATE_SUCCEEDED);
  });

  it("crash after the commit → rolls forward: runs only the steps not done, undoes nothing", async () => {
    const { saved } = await crashAt(runningStep("cleanup"));
    expect(states(saved)[COMMIT]).toBe(S.STEP_STATE_DONE);
    const trace: string[] = [];
    const r = await resume(saved, trace);
    expect(trace).toEqual(["run:cleanup"]);
    expect(r.migration.state).toBe(M.MIGRATION_STATE_SUCCEEDED);
    expect(r.migration.steps.every((s) => s.state === S.STEP_STATE_DONE)).toBe(true);
    expect(r.migration.totalMs).toBeGreaterThanOrEqual(saved.totalMs);
  });

  it("crash mid-rollback → finishes the rollback, never undoing a step twice", async () => {
    // transfer fails; its undo completes; the controller dies while undoing checkpoint.
    const crashed = (_m: Migration, step: StepRecord) => step.name === "checkpoint" && step.details["undo_attempts"] === 1;
    const { saved, before } = await crashAt(crashed, { transfer: { run: fail("DataLoss", "checksum mismatch") } });
    expect(before.slice(0, 5)).toEqual(["run:validate", "run:prepare", "run:checkpoint", "run:transfer", "undo:transfer"]);
    expect(saved.state).toBe(M.MIGRATION_STATE_ROLLING_BACK);
    expect(states(saved)).toMatchObject({ transfer: S.STEP_STATE_COMPENSATED, checkpoint: S.STEP_STATE_DONE });

    const trace: string[] = [];
    const r = await resume(saved, trace);
    expect(trace).toEqual(["undo:checkpoint", "undo:prepare", "undo:validate"]);
    expect(r.migration.state).toBe(M.MIGRATION_STATE_ROLLED_BACK);
    // The original failure survives the restart.
    expect(r.error?.message).toBe('migration m-7 rolled back: step "transfer" failed: checksum mismatch');
    expect(r.migration.steps.find((s) => s.name === "transfer")?.error).toBe("checksum mismatch");
  });

  it("crash right after a step failed (before the rollback began) → rolls back", async () => {
    const crashed = (_m: Migration, step: StepRecord) => step.name === "transfer" && step.state === S.STEP_STATE_FAILED;
    const { saved } = await crashAt(crashed, { transfer: { run: fail("Internal", "boom") } });
    expect(saved.state).toBe(M.MIGRATION_STATE_RUNNING);
    const trace: string[] = [];
    const r = await resume(saved, trace, { onResume: "continue" }); // a FAILED step wins over "continue"
    expect(trace).toEqual(["undo:transfer", "undo:checkpoint", "undo:prepare", "undo:validate"]);
    expect(r.migration.state).toBe(M.MIGRATION_STATE_ROLLED_BACK);
  });

  it("a resumed migration can still be cancelled before the commit", async () => {
    const { saved } = await crashAt(runningStep("transfer"));
    const cancel = new AbortController();
    const trace: string[] = [];
    const r = await resume(
      saved,
      trace,
      { onResume: "continue", signal: cancel.signal },
      {
        transfer: { run: (io) => (setTimeout(() => cancel.abort(), 5), untilAborted(io.signal)) },
      },
    );
    expect(trace).toEqual(["run:transfer", "undo:transfer", "undo:checkpoint", "undo:prepare", "undo:validate"]);
    expect(r.error?.code).toBe("Cancelled");
  });

  it("returns an ended migration as it was saved, running nothing", async () => {
    const j = await openJournal(dir);
    const done = { ...newMigration("m-7"), state: M.MIGRATION_STATE_SUCCEEDED };
    const trace: string[] = [];
    const r = await resumePipeline(pipeline(trace), {}, done, { record: j, log: silentLogger, commitStep: COMMIT });
    expect(trace).toEqual([]);
    expect(r.migration.state).toBe(M.MIGRATION_STATE_SUCCEEDED);
  });
});
