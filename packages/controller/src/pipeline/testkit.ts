// Fakes for the engine's tests (not exported from the package): scripted steps and a sink.
import { Migration, type MigrationState, type StepState, type StepRecord } from "@ferry/api/controller";
import { FerryError, RETRYABLE_CODES } from "@ferry/common";
import type { MigrationRecordSink, RetryPolicy, Step, StepIo } from "./types.js";

export const fastRetry = (maxAttempts = 3): RetryPolicy => ({
  maxAttempts,
  initialBackoffMs: 10,
  maxBackoffMs: 40,
  retryable: RETRYABLE_CODES,
});

export interface FakeStepOptions {
  run?: (io: StepIo) => Promise<void> | void;
  compensate?: ((io: StepIo) => Promise<void> | void) | false;
  retry?: RetryPolicy;
  timeoutMs?: number;
  inDowntime?: boolean;
}

/** A step that appends "run:<name>" / "undo:<name>" to `trace` and then does what it is told. */
export function fakeStep(name: string, trace: string[], o: FakeStepOptions = {}): Step<unknown> {
  const s: Step<unknown> = {
    name,
    timeoutMs: o.timeoutMs ?? 2_000,
    retry: o.retry ?? fastRetry(1),
    ...(o.inDowntime ? { inDowntime: true } : {}),
    async run(_ctx, io) {
      trace.push(`run:${name}`);
      await o.run?.(io);
    },
  };
  if (o.compensate !== false) {
    const undo = o.compensate;
    s.compensate = async (_ctx, io) => {
      trace.push(`undo:${name}`);
      await undo?.(io);
    };
  }
  return s;
}

export const fail = (code: FerryError["code"], msg: string) => (): never => {
  throw new FerryError(code, msg);
};

/** Keeps every snapshot the engine saved, in order. */
export class MemorySink implements MigrationRecordSink {
  readonly saves: { m: Migration; steps: StepRecord[] }[] = [];
  save(m: Migration, steps: StepRecord[]): void {
    this.saves.push({ m, steps });
  }
  get last(): Migration {
    return this.saves[this.saves.length - 1]!.m;
  }
  states(): MigrationState[] {
    const out: MigrationState[] = [];
    for (const s of this.saves) if (out[out.length - 1] !== s.m.state) out.push(s.m.state);
    return out;
  }
  stepStates(name: string): StepState[] {
    const out: StepState[] = [];
    for (const s of this.saves) {
      const r = s.m.steps.find((x) => x.name === name);
      if (r && out[out.length - 1] !== r.state) out.push(r.state);
    }
    return out;
  }
}

export function newMigration(id = "m-1"): Migration {
  return Migration.fromJSON({ id, container: "web", source: "edge-a", destination: "edge-b", state: "MIGRATION_STATE_PENDING" });
}

/** Resolves once `n` parties have called `arrive()`; fails loudly if they never do. */
export function barrier(n: number, timeoutMs = 1_000): { arrive(): Promise<void> } {
  let count = 0;
  let open!: () => void;
  const opened = new Promise<void>((r) => (open = r));
  return {
    async arrive() {
      if (++count === n) open();
      let timer: NodeJS.Timeout | undefined;
      try {
        await Promise.race([
          opened,
          new Promise<never>((_, rej) => {
            timer = setTimeout(() => rej(new FerryError("Internal", `barrier: only ${count} of ${n} arrived`)), timeoutMs);
          }),
        ]);
      } finally {
        clearTimeout(timer);
      }
    },
  };
}

/** A promise that settles only when `signal` aborts (a step that waits for cancel). */
export function untilAborted(signal: AbortSignal): Promise<void> {
  return new Promise((_, reject) => {
    if (signal.aborted) reject(signal.reason);
    signal.addEventListener("abort", () => reject(signal.reason), { once: true });
  });
}
