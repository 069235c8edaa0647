import { MigrationState, StepState } from "@ferry/api/controller";
import { FerryError, silentLogger } from "@ferry/common";
import { describe, expect, it } from "vitest";
import { backoffMs, runPipeline, validateStages } from "./engine.js";
import { MemorySink, barrier, fail, fakeStep, fastRetry, newMigration, untilAborted } from "./testkit.js";
import type { PipelineOptions, Stage, StepIo } from "./types.js";

const S = StepState;
const M = MigrationState;

function opts(sink: MemorySink, over: Partial<PipelineOptions> = {}): PipelineOptions {
  return { migration: newMigration(), record: sink, log: silentLogger, commitStep: "commit", sleep: async () => undefined, ...over };
}

describe("runPipeline: the happy path", () => {
  it("runs the steps in order, records each state change, and accounts time, bytes and downtime", async () => {
    const trace: string[] = [];
    let clock = 1_000_000;
    const keys: string[] = [];
    const tick = (ms: number) => (io: StepIo) => {
      keys.push(io.key);
      clock += ms;
    };
    const stages: Stage<unknown>[] = [
      fakeStep("prepare", trace, { run: tick(100) }),
      fakeStep("checkpoint", trace, {
        inDowntime: true,
        run: (io) => {
          tick(50)(io);
          io.addBytes(1000);
          io.detail("criu_frozen_ms", 42);
        },
      }),
      fakeStep("commit", trace, { inDowntime: true, run: tick(70) }),
      fakeStep("cleanup", trace, { run: tick(10) }),
    ];
    const sink = new MemorySink();
    const r = await runPipeline(stages, {}, opts(sink, { now: () => clock }));

    expect(trace).toEqual(["run:prepare", "run:checkpoint", "run:commit", "run:cleanup"]);
    expect(keys).toEqual(["m-1/prepare", "m-1/checkpoint", "m-1/commit", "m-1/cleanup"]);
    expect(r.error).toBeUndefined();
    const m = r.migration;
    expect(m.state).toBe(M.MIGRATION_STATE_SUCCEEDED);
    expect(m.steps.map((s) => [s.name, s.state, s.durationMs, s.attempts])).toEqual([
      ["prepare", S.STEP_STATE_DONE, 100, 1],
      ["checkpoint", S.STEP_STATE_DONE, 50, 1],
      ["commit", S.STEP_STATE_DONE, 70, 1],
      ["cleanup", S.STEP_STATE_DONE, 10, 1],
    ]);
    expect(m.steps[1]).toMatchObject({ bytes: 1000, inDowntime: true, details: { criu_frozen_ms: 42 } });
    expect(m.totalMs).toBe(230);
    expect(m.downtimeMs).toBe(120); // start of checkpoint → end of commit
    expect(m.bytesTransferred).toBe(1000);
    expect(m.finishedAt?.getTime()).toBe(clock);
    // Every step was saved RUNNING before DONE, and the sink got the changed step with it.
    expect(sink.stepStates("checkpoint")).toEqual([S.STEP_STATE_PENDING, S.STEP_STATE_RUNNING, S.STEP_STATE_DONE]);
    expect(sink.saves.some((s) => s.steps.some((r) => r.name === "commit" && r.state === S.STEP_STATE_RUNNING))).toBe(true);
    expect(sink.states()).toEqual([M.MIGRATION_STATE_RUNNING, M.MIGRATION_STATE_SUCCEEDED]);
    expect(sink.last).toEqual(m);
  });

  it("saves once per stage boundary: a step's DONE and the next stage's RUNNING go in one write", async () => {
    const trace: string[] = [];
    const stages: Stage<unknown>[] = [
      fakeStep("a", trace),
      { group: "g", steps: [fakeStep("b1", trace), fakeStep("b2", trace), fakeStep("b3", trace)] },
      fakeStep("commit", trace),
    ];
    // A sink as slow as an fsync: saves that arrive meanwhile must wait, and are merged.
    const sink = new MemorySink();
    const slow = { save: async (...a: Parameters<MemorySink["save"]>) => (sink.save(...a), new Promise<void>((r) => setTimeout(r, 5))) };
    const r = await runPipeline(stages, {}, opts(sink, { record: slow }));
    expect(r.migration.state).toBe(M.MIGRATION_STATE_SUCCEEDED);
    const changed = sink.saves.map((s) => s.steps.map((x) => `${x.name}:${S[x.state].slice(11)}`).sort());
    expect(changed).toEqual([
      ["a:RUNNING"], // the migration's RUNNING state rides with it
      ["a:DONE", "b1:RUNNING", "b2:RUNNING", "b3:RUNNING"],
      ...changed.slice(2, -2), // the group's DONEs, as they come
      expect.arrayContaining(["commit:RUNNING"]),
      ["commit:DONE"],
    ]);
    expect(sink.saves[0]!.m.state).toBe(M.MIGRATION_STATE_RUNNING);
    expect(sink.saves.length).toBeLessThanOrEqual(6);
    expect(sink.stepStates("b2")).toEqual([S.STEP_STATE_PENDING, S.STEP_STATE_RUNNING, S.STEP_STATE_DONE]);
  });

  it("write-ahead: a step with an undo waits for its RUNNING save; one without does not", async () => {
    const trace: string[] = [];
    const sink = new MemorySink();
    let release!: () => void;
    const held = new Promise<void>((r) => (release = r));
    // The first save is held: "look" (no undo) runs anyway; "act" may not until it is done.
    const gated = { save: async (...a: Parameters<MemorySink["save"]>) => (sink.save(...a), sink.saves.length === 1 ? held : undefined) };
    const stages: Stage<unknown>[] = [fakeStep("look", trace, { compensate: false }), fakeStep("act", trace), fakeStep("commit", trace)];
    const run = runPipeline(stages, {}, opts(sink, { record: gated }));
    await new Promise((r) => setTimeout(r, 30));
    expect(trace).toEqual(["run:look"]);
    release();
    const r = await run;
    expect(r.migration.state).toBe(M.MIGRATION_STATE_SUCCEEDED);
    expect(trace).toEqual(["run:look", "run:act", "run:commit"]);
    // "look" ran before any save ended; the held save is the one that carried "act" RUNNING.
    expect(sink.saves[0]!.steps.find((st) => st.name === "act")?.state).toBe(S.STEP_STATE_RUNNING);
  });

  it("runs a group's steps at the same time", async () => {
    const trace: string[] = [];
    const b = barrier(3);
    let running = 0;
    let maxRunning = 0;
    const par = (_io: StepIo) => {
      running++;
      maxRunning = Math.max(maxRunning, running);
      // Each waits for the other two: a sequential engine would deadlock here and time out.
      return b.arrive().finally(() => running--);
    };
    const stages: Stage<unknown>[] = [
      fakeStep("checkpoint", trace),
      {
        group: "transfer",
        steps: [
          fakeStep("transfer", trace, { run: par }),
          fakeStep("clear-src", trace, { run: par }),
          fakeStep("finish-dst", trace, { run: par }),
        ],
      },
      fakeStep("commit", trace),
    ];
    const r = await runPipeline(stages, {}, opts(new MemorySink()));
    expect(r.migration.state).toBe(M.MIGRATION_STATE_SUCCEEDED);
    expect(maxRunning).toBe(3);
    expect(trace[0]).toBe("run:checkpoint");
    expect(trace[4]).toBe("run:commit");
    expect(r.migration.steps.filter((s) => s.group === "transfer").map((s) => s.name)).toEqual(["transfer", "clear-src", "finish-dst"]);
  });

  it("refuses malformed pipelines before running anything", () => {
    const t: string[] = [];
    expect(() => validateStages([fakeStep("a", t)], "commit")).toThrow(/commit step "commit" is not one of the steps/);
    expect(() => validateStages([fakeStep("a", t), fakeStep("a", t)], "a")).toThrow(/used twice/);
    expect(() => validateStages([{ group: "g", steps: [fakeStep("commit", t)] }], "commit")).toThrow(/must not run in a parallel group/);
    // A group may be named like one of its steps.
    expect(() => validateStages([{ group: "transfer", steps: [fakeStep("transfer", t)] }, fakeStep("commit", t)], "commit")).not.toThrow();
  });
});

describe("runPipeline: retries and timeouts", () => {
  it("retries Unavailable with exponential backoff until it succeeds", async () => {
    const trace: string[] = [];
    let calls = 0;
    const waits: number[] = [];
    const flaky = fakeStep("flaky", trace, {
      retry: fastRetry(4),
      run: () => {
        if (++calls < 3) throw new FerryError("Unavailable", "agent down");
      },
    });
    const r = await runPipeline(
      [flaky, fakeStep("commit", trace)],
      {},
      opts(new MemorySink(), { sleep: async (ms) => void waits.push(ms) }),
    );
    expect(r.migration.state).toBe(M.MIGRATION_STATE_SUCCEEDED);
    expect(calls).toBe(3);
    expect(r.migration.steps[0]!.attempts).toBe(3);
    expect(waits).toEqual([10, 20]);
    expect(backoffMs(fastRetry(9), 5)).toBe(40); // capped at maxBackoffMs
  });

  it("gives up on Unavailable after maxAttempts", async () => {
    const trace: string[] = [];
    const r = await runPipeline(
      [fakeStep("flaky", trace, { retry: fastRetry(3), run: fail("Unavailable", "agent down") }), fakeStep("commit", trace)],
      {},
      opts(new MemorySink()),
    );
    expect(trace.filter((t) => t === "run:flaky")).toHaveLength(3);
    expect(r.migration.steps[0]).toMatchObject({ state: S.STEP_STATE_COMPENSATED, attempts: 3, error: "agent down" });
    expect(r.error?.code).toBe("Unavailable");
  });

  it.each([
    ["InvalidArgument (not in the retry set)", () => fail("InvalidArgument", "bad spec")()],
    [
      "a plain Error (not a FerryError)",
      () => {
        throw new Error("TypeError-ish bug");
      },
    ],
  ])("does not retry %s", async (_label, thrower) => {
    const trace: string[] = [];
    const policy = { ...fastRetry(5), retryable: new Set(["Unavailable", "Internal"] as const) };
    const r = await runPipeline(
      [fakeStep("s", trace, { retry: policy, run: thrower }), fakeStep("commit", trace)],
      {},
      opts(new MemorySink()),
    );
    expect(trace.filter((t) => t === "run:s")).toHaveLength(1);
    expect(r.migration.state).toBe(M.MIGRATION_STATE_ROLLED_BACK);
  });

  it("aborts a step at its timeout, even one that ignores its signal, and reports DeadlineExceeded", async () => {
    const trace: string[] = [];
    let sawAbort: unknown;
    const stuck = fakeStep("stuck", trace, {
      timeoutMs: 30,
      retry: fastRetry(2),
      run: (io) => {
        io.signal.addEventListener("abort", () => {
          sawAbort = io.signal.reason as unknown;
        });
        return new Promise(() => undefined); // never settles
      },
    });
    const t0 = Date.now();
    // The engine waits up to abortGraceMs for a step to return after its abort, then leaves it behind.
    const r = await runPipeline([stuck, fakeStep("commit", trace)], {}, opts(new MemorySink(), { abortGraceMs: 50 }));
    expect(Date.now() - t0).toBeLessThan(1_000);
    expect(trace.filter((t) => t === "run:stuck")).toHaveLength(2); // DeadlineExceeded is retryable
    expect(sawAbort).toBeInstanceOf(FerryError);
    expect((sawAbort as FerryError).code).toBe("DeadlineExceeded");
    expect(r.error?.code).toBe("DeadlineExceeded");
    expect(r.error?.message).toMatch(/step "stuck" failed: step "stuck" timed out after 30 ms \(attempt 2\)/);
    expect(r.migration.state).toBe(M.MIGRATION_STATE_ROLLED_BACK);
  });
});

describe("runPipeline: rollback", () => {
  const names = ["validate", "prepare", "checkpoint", "transfer", "commit", "cleanup"];
  const preCommit = names.indexOf("commit");

  it.each(names.slice(0, preCommit + 1).map((n, i) => [n, i] as const))(
    "a failure at %s compensates every started step in reverse, and skips the rest",
    async (failing, i) => {
      const trace: string[] = [];
      const stages = names.map((n) => fakeStep(n, trace, n === failing ? { run: fail("Internal", `${n} broke`) } : {}));
      const sink = new MemorySink();
      const r = await runPipeline(stages, {}, opts(sink));
      const ran = names.slice(0, i + 1);
      expect(trace).toEqual([...ran.map((n) => `run:${n}`), ...[...ran].reverse().map((n) => `undo:${n}`)]);
      expect(r.migration.state).toBe(M.MIGRATION_STATE_ROLLED_BACK);
      expect(r.migration.steps.map((s) => s.state)).toEqual(
        names.map((_, j) => (j <= i ? S.STEP_STATE_COMPENSATED : S.STEP_STATE_SKIPPED)),
      );
      expect(r.migration.steps[i]!.error).toBe(`${failing} broke`);
      expect(r.error?.message).toBe(`migration m-1 rolled back: step "${failing}" failed: ${failing} broke`);
      expect(r.error?.data).toMatchObject({ step: failing, rolledBack: true });
      expect(sink.states()).toEqual([M.MIGRATION_STATE_RUNNING, M.MIGRATION_STATE_ROLLING_BACK, M.MIGRATION_STATE_ROLLED_BACK]);
    },
  );

  it("keeps undoing past a failed undo and surfaces it with the original error → FAILED", async () => {
    const trace: string[] = [];
    const stages = [
      fakeStep("a", trace),
      fakeStep("b", trace, { compensate: fail("Unavailable", "edge-b unreachable"), retry: fastRetry(2) }),
      fakeStep("c", trace, { compensate: false }),
      fakeStep("d", trace, { run: fail("DataLoss", "checksum mismatch") }),
      fakeStep("commit", trace),
    ];
    const r = await runPipeline(stages, {}, opts(new MemorySink()));
    expect(trace).toEqual(["run:a", "run:b", "run:c", "run:d", "undo:d", "undo:b", "undo:b", "undo:a"]);
    expect(r.migration.state).toBe(M.MIGRATION_STATE_FAILED);
    expect(r.error?.code).toBe("DataLoss");
    expect(r.error?.message).toBe(
      'migration m-1 failed and its rollback is incomplete: step "d" failed: checksum mismatch; undo of "b" failed: edge-b unreachable',
    );
    expect(r.error?.fix).toMatch(/\(b\)/);
    expect(r.error?.data?.["undoFailures"]).toEqual([{ step: "b", code: "Unavailable", message: "edge-b unreachable" }]);
    const b = r.migration.steps.find((s) => s.name === "b")!;
    expect(b).toMatchObject({ state: S.STEP_STATE_FAILED, error: "undo failed: edge-b unreachable" });
    expect(b.details["undo_attempts"]).toBe(2);
    expect(r.migration.steps.map((s) => s.state)).toEqual([
      S.STEP_STATE_COMPENSATED,
      S.STEP_STATE_FAILED,
      S.STEP_STATE_DONE, // nothing to undo
      S.STEP_STATE_COMPENSATED,
      S.STEP_STATE_SKIPPED,
    ]);
    expect(r.migration.error).toBe(r.error?.message);
  });

  it("runs each undo on its own time budget", async () => {
    const trace: string[] = [];
    const slowUndo = fakeStep("a", trace, {
      timeoutMs: 20,
      compensate: (io) =>
        new Promise((res, rej) => {
          const t = setTimeout(res, 60);
          io.signal.addEventListener("abort", () => (clearTimeout(t), rej(io.signal.reason)));
        }),
    });
    const patient = { ...fakeStep("b", trace, { run: fail("Internal", "x") }), compensateTimeoutMs: 500 };
    const slowOk = { ...slowUndo, name: "c", compensateTimeoutMs: 500 };
    const r = await runPipeline([slowUndo, slowOk, patient, fakeStep("commit", trace)], {}, opts(new MemorySink()));
    expect(r.migration.steps.map((s) => s.state).slice(0, 3)).toEqual([
      S.STEP_STATE_FAILED,
      S.STEP_STATE_COMPENSATED,
      S.STEP_STATE_COMPENSATED,
    ]);
    expect(r.migration.steps[0]!.error).toMatch(/undo failed: undo of step "a" timed out after 20 ms/);
  });

  it("aborts the siblings of a failed step in a group, waits for them, and compensates the whole group", async () => {
    const trace: string[] = [];
    let siblingAborted: FerryError | undefined;
    let siblingReturned = false;
    const stages: Stage<unknown>[] = [
      fakeStep("checkpoint", trace),
      {
        group: "transfer",
        steps: [
          fakeStep("transfer", trace, {
            run: async (io) => {
              try {
                await untilAborted(io.signal);
              } finally {
                siblingAborted = io.signal.reason as FerryError;
                await new Promise((r) => setTimeout(r, 20));
                siblingReturned = true;
              }
            },
          }),
          fakeStep("clear-src", trace, {
            run: async () => {
              await new Promise((r) => setTimeout(r, 10));
              throw new FerryError("Internal", "netns busy");
            },
          }),
          fakeStep("finish-dst", trace),
        ],
      },
      fakeStep("commit", trace),
    ];
    const r = await runPipeline(stages, {}, opts(new MemorySink()));
    expect(siblingAborted?.code).toBe("Aborted");
    expect(siblingAborted?.message).toMatch(/step "clear-src" of group "transfer" failed/);
    expect(siblingReturned).toBe(true);
    expect(r.migration.state).toBe(M.MIGRATION_STATE_ROLLED_BACK);
    expect(r.error?.message).toBe('migration m-1 rolled back: step "clear-src" failed: netns busy');
    // Reverse of declaration order inside the group, then the steps before it.
    expect(trace.slice(4)).toEqual(["undo:finish-dst", "undo:clear-src", "undo:transfer", "undo:checkpoint"]);
    const byName = Object.fromEntries(r.migration.steps.map((s) => [s.name, s.state]));
    expect(byName).toEqual({
      checkpoint: S.STEP_STATE_COMPENSATED,
      transfer: S.STEP_STATE_COMPENSATED,
      "clear-src": S.STEP_STATE_COMPENSATED,
      "finish-dst": S.STEP_STATE_COMPENSATED,
      commit: S.STEP_STATE_SKIPPED,
    });
  });
});

describe("runPipeline: cancel and the commit point", () => {
  it("cancel mid-way aborts the running step and rolls back → ROLLED_BACK", async () => {
    const trace: string[] = [];
    const cancel = new AbortController();
    const stages = [
      fakeStep("a", trace),
      fakeStep("b", trace, {
        retry: fastRetry(5),
        run: (io) => {
          setTimeout(() => cancel.abort(), 10);
          return untilAborted(io.signal);
        },
      }),
      fakeStep("commit", trace),
    ];
    const sink = new MemorySink();
    const r = await runPipeline(stages, {}, opts(sink, { signal: cancel.signal }));
    expect(trace).toEqual(["run:a", "run:b", "undo:b", "undo:a"]); // not retried
    expect(r.migration.state).toBe(M.MIGRATION_STATE_ROLLED_BACK);
    expect(r.error?.code).toBe("Cancelled");
    expect(r.error?.message).toBe('migration m-1 rolled back: cancelled by request during step "b"');
    expect(sink.states()).toEqual([
      M.MIGRATION_STATE_RUNNING,
      M.MIGRATION_STATE_CANCELLING,
      M.MIGRATION_STATE_ROLLING_BACK,
      M.MIGRATION_STATE_ROLLED_BACK,
    ]);
    expect(r.migration.steps.map((s) => s.state)).toEqual([S.STEP_STATE_COMPENSATED, S.STEP_STATE_COMPENSATED, S.STEP_STATE_SKIPPED]);
  });

  it("cancel during a retry backoff stops the retries", async () => {
    const trace: string[] = [];
    const cancel = new AbortController();
    const r = await runPipeline(
      [
        fakeStep("a", trace, {
          retry: { ...fastRetry(5), initialBackoffMs: 5_000, maxBackoffMs: 5_000 },
          run: () => {
            setTimeout(() => cancel.abort(), 10);
            throw new FerryError("Unavailable", "down");
          },
        }),
        fakeStep("commit", trace),
      ],
      {},
      opts(new MemorySink(), { signal: cancel.signal, sleep: undefined }),
    );
    expect(trace).toEqual(["run:a", "undo:a"]);
    expect(r.error?.code).toBe("Cancelled");
  });

  it("an already-cancelled migration runs nothing", async () => {
    const trace: string[] = [];
    const r = await runPipeline(
      [fakeStep("a", trace), fakeStep("commit", trace)],
      {},
      opts(new MemorySink(), { signal: AbortSignal.abort() }),
    );
    expect(trace).toEqual([]);
    expect(r.migration.state).toBe(M.MIGRATION_STATE_ROLLED_BACK);
    expect(r.migration.steps.every((s) => s.state === S.STEP_STATE_SKIPPED)).toBe(true);
  });

  it("ignores cancel once the commit step has started", async () => {
    const trace: string[] = [];
    const cancel = new AbortController();
    let commitSignal: AbortSignal | undefined;
    const stages = [
      fakeStep("a", trace),
      fakeStep("commit", trace, {
        run: async (io) => {
          commitSignal = io.signal;
          cancel.abort();
          await new Promise((r) => setTimeout(r, 10));
        },
      }),
      fakeStep("cleanup", trace),
    ];
    const r = await runPipeline(stages, {}, opts(new MemorySink(), { signal: cancel.signal }));
    expect(commitSignal?.aborted).toBe(false);
    expect(trace).toEqual(["run:a", "run:commit", "run:cleanup"]);
    expect(r.migration.state).toBe(M.MIGRATION_STATE_SUCCEEDED);
  });

  it("after the commit, a failing step is retried, recorded, not undone; the rest still run → SUCCEEDED with a warning", async () => {
    const trace: string[] = [];
    const stages = [
      fakeStep("a", trace),
      fakeStep("commit", trace),
      fakeStep("delete-source", trace, { retry: fastRetry(2), run: fail("Unavailable", "edge-a unreachable") }),
      fakeStep("release", trace),
    ];
    const r = await runPipeline(stages, {}, opts(new MemorySink()));
    expect(trace).toEqual(["run:a", "run:commit", "run:delete-source", "run:delete-source", "run:release"]);
    expect(r.migration.state).toBe(M.MIGRATION_STATE_SUCCEEDED);
    expect(r.error).toBeUndefined();
    expect(r.warnings).toEqual(['step "delete-source" failed after the commit: edge-a unreachable']);
    expect(r.migration.error).toBe('committed, with warnings: step "delete-source" failed after the commit: edge-a unreachable');
    expect(r.migration.steps.map((s) => s.state)).toEqual([S.STEP_STATE_DONE, S.STEP_STATE_DONE, S.STEP_STATE_FAILED, S.STEP_STATE_DONE]);
  });

  it("a failure of the commit step itself still rolls back, the commit step included", async () => {
    const trace: string[] = [];
    const r = await runPipeline(
      [fakeStep("a", trace), fakeStep("commit", trace, { run: fail("Internal", "restore failed") }), fakeStep("cleanup", trace)],
      {},
      opts(new MemorySink()),
    );
    expect(trace).toEqual(["run:a", "run:commit", "undo:commit", "undo:a"]);
    expect(r.migration.state).toBe(M.MIGRATION_STATE_ROLLED_BACK);
  });
});
