import { Migration, MigrationState, StepState } from "@ferry/api/controller";
import { spawn } from "node:child_process";
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { MigrationJournal } from "./journal.js";

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "ferry-journal-"));
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

function mig(id: string, over: Partial<Migration> = {}): Migration {
  return {
    ...Migration.fromJSON({ id, container: "web", source: "edge-a", destination: "edge-b" }),
    state: MigrationState.MIGRATION_STATE_RUNNING,
    createdAt: new Date("2025-01-01T00:00:00.123Z"),
    ...over,
  };
}

describe("MigrationJournal", () => {
  it("round-trips a migration with its steps, Dates and details, across a reopen", async () => {
    const j = await openJournal(dir);
    const m = mig("m-1", {
      finishedAt: new Date("2025-01-01T00:00:01.456Z"),
      totalMs: 1333,
      downtimeMs: 480,
      bytesTransferred: 5_000_000_000, // > 2^32: stored as a JSON number, not truncated
      steps: [
        {
          name: "checkpoint",
          state: StepState.STEP_STATE_DONE,
          startedAt: new Date("2025-01-01T00:00:00.500Z"),
          durationMs: 230,
          attempts: 2,
          bytes: 4096,
          error: "",
          inDowntime: true,
          group: "",
          details: { criu_frozen_ms: 38.5 },
        },
      ],
    });
    await j.save(m);
    expect(await j.get("m-1")).toEqual(m);
    const raw = JSON.parse(await readFile(join(dir, "migrations", "m-1.log"), "utf8")).migration;
    expect(raw.createdAt).toBe("2025-01-01T00:00:00.123Z");
    expect(raw.state).toBe("MIGRATION_STATE_RUNNING");

    const j2 = await openJournal(dir);
    const back = await j2.get("m-1");
    expect(back).toEqual(m);
    expect(back?.steps[0]?.startedAt).toBeInstanceOf(Date);
    expect(await j2.get("m-404")).toBeUndefined();
  });

  it("lists newest first, by container, with a limit; unfinished() finds what a restart must resume", async () => {
    const j = await openJournal(dir);
    const at = (s: number) => new Date(Date.UTC(2025, 0, 1, 0, 0, s));
    await j.save(mig("m-1", { createdAt: at(1), state: MigrationState.MIGRATION_STATE_SUCCEEDED }));
    await j.save(mig("m-2", { createdAt: at(2), container: "db", state: MigrationState.MIGRATION_STATE_ROLLING_BACK }));
    await j.save(mig("m-3", { createdAt: at(3), state: MigrationState.MIGRATION_STATE_RUNNING }));
    await j.save(mig("m-4", { createdAt: at(4), state: MigrationState.MIGRATION_STATE_FAILED }));
    await j.save(mig("m-5", { createdAt: at(5), state: MigrationState.MIGRATION_STATE_CANCELLING }));
    expect((await j.list()).map((m) => m.id)).toEqual(["m-5", "m-4", "m-3", "m-2", "m-1"]);
    expect((await j.list({ container: "web", limit: 2 })).map((m) => m.id)).toEqual(["m-5", "m-4"]);
    expect((await j.list({ container: "db" })).map((m) => m.id)).toEqual(["m-2"]);
    // Oldest first: resume in the order they began.
    expect((await j.unfinished()).map((m) => m.id)).toEqual(["m-2", "m-3", "m-5"]);
    // A returned record is a copy: changing it changes nothing stored.
    const got = (await j.get("m-3"))!;
    got.state = MigrationState.MIGRATION_STATE_FAILED;
    expect((await j.get("m-3"))?.state).toBe(MigrationState.MIGRATION_STATE_RUNNING);
  });

  it("keeps the last of many concurrent saves of one migration, in one line (group commit)", async () => {
    const j = await openJournal(dir);
    const log = join(dir, "migrations", "m-1.log");
    await j.save(mig("m-1", { totalMs: -1 }));
    // Saves made while a line is being written join the next line: 25 saves, at most 2 lines.
    await Promise.all(Array.from({ length: 25 }, (_, i) => j.save(mig("m-1", { totalMs: i }))));
    const lines = (await readFile(log, "utf8")).split("\n").filter(Boolean);
    expect(lines.length).toBeGreaterThanOrEqual(2);
    expect(lines.length).toBeLessThanOrEqual(3);
    expect(JSON.parse(lines[lines.length - 1]!).migration.totalMs).toBe(24);
    const j2 = await openJournal(dir);
    expect((await j2.get("m-1"))?.totalMs).toBe(24);
    expect((await readdir(join(dir, "migrations"))).sort()).toEqual(["m-1.log"]);
    // Loading compacts the log to its last line.
    expect((await readFile(log, "utf8")).split("\n").filter(Boolean)).toHaveLength(1);
  });

  it("compacts a migration's log into one line when it ends", async () => {
    const j = await openJournal(dir);
    const log = join(dir, "migrations", "m-1.log");
    for (let i = 0; i < 5; i++) await j.save(mig("m-1", { totalMs: i }));
    expect((await readFile(log, "utf8")).split("\n").filter(Boolean)).toHaveLength(5);
    await j.save(mig("m-1", { totalMs: 9, state: MigrationState.MIGRATION_STATE_SUCCEEDED }));
    const lines = (await readFile(log, "utf8")).split("\n").filter(Boolean);
    expect(lines).toHaveLength(1);
    expect(JSON.parse(lines[0]!).migration).toMatchObject({ totalMs: 9, state: "MIGRATION_STATE_SUCCEEDED" });
  });

  it("drops a line torn by a kill, and appends cleanly after it", async () => {
    const j = await openJournal(dir);
    const log = join(dir, "migrations", "m-1.log");
    await j.save(mig("m-1", { totalMs: 6 }));
    await j.saveState(mig("m-1", { totalMs: 7 }), { checkpointId: "ck-7" });
    await writeFile(log, '{"migration":{"id":"m-1","totalMs":8,"ste', { flag: "a" });
    await writeFile(join(dir, "migrations", "m-1.log.tmp-999-deadbeef"), '{"migration":{"id":"m-1","totalMs":9');
    await writeFile(join(dir, "migrations", "junk.log"), "{not json");
    const j2 = await openJournal(dir);
    expect((await j2.get("m-1"))?.totalMs).toBe(7);
    expect(await j2.getContext("m-1")).toEqual({ checkpointId: "ck-7" });
    expect((await j2.list()).map((m) => m.id)).toEqual(["m-1"]);
    expect(await readdir(join(dir, "migrations"))).not.toContain("m-1.log.tmp-999-deadbeef");
    await j2.save(mig("m-1", { totalMs: 10 }));
    await j2.close();
    const j3 = await openJournal(dir);
    expect((await j3.get("m-1"))?.totalMs).toBe(10);
    expect(await j3.getContext("m-1")).toEqual({ checkpointId: "ck-7" });
  });

  it("converts the JSON files of earlier versions to a log, context included", async () => {
    await mkdir(join(dir, "migrations"), { recursive: true });
    await mkdir(join(dir, "migration-context"), { recursive: true });
    const m = mig("m-old", { totalMs: 42 });
    await writeFile(join(dir, "migrations", "m-old.json"), JSON.stringify(Migration.toJSON(m)));
    await writeFile(join(dir, "migration-context", "m-old.json"), JSON.stringify({ checkpointId: "ck-old" }));
    const j = await openJournal(dir);
    expect(await j.get("m-old")).toEqual(m);
    expect(await j.getContext("m-old")).toEqual({ checkpointId: "ck-old" });
    expect(await readdir(join(dir, "migrations"))).toEqual(["m-old.log"]);
    await expect(readdir(join(dir, "migration-context"))).rejects.toMatchObject({ code: "ENOENT" });
    expect((await (await openJournal(dir)).unfinished()).map((x) => x.id)).toEqual(["m-old"]);
  });

  it("survives a process killed with SIGKILL in the middle of a stream of writes", async () => {
    const script = join(dir, "writer.mts");
    const journalPath = fileURLToPath(new URL("./journal.ts", import.meta.url));
    const apiPath = fileURLToPath(new URL("../../api/src/gen/ferry/controller/v1/controller.ts", import.meta.url));
    await writeFile(
      script,
      `import { MigrationJournal } from ${JSON.stringify(journalPath)};
       import { Migration } from ${JSON.stringify(apiPath)};
       const j = await MigrationJournal.open(process.argv[2]);
       for (let i = 0; ; i++) {
         const m = Migration.fromJSON({ id: "m-k", container: "web", state: "MIGRATION_STATE_RUNNING", totalMs: i,
           steps: Array.from({ length: 50 }, (_, k) => ({ name: "s" + k, error: "x".repeat(200) })) });
         await j.saveState(m, { i, pad: "y".repeat(5000) });
         if (i === 5) process.stdout.write("ready\\n");
       }`,
    );
    const state = join(dir, "state");
    const child = spawn(process.execPath, ["--conditions=source", "--import", "tsx", script, state], {
      cwd: fileURLToPath(new URL("../../..", import.meta.url)),
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stderr = "";
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    try {
      await new Promise<void>((resolve, reject) => {
        child.stdout.on("data", (d: Buffer) => d.toString().includes("ready") && resolve());
        child.on("exit", (code) => reject(new Error(`writer exited early (${code}): ${stderr}`)));
      });
      await new Promise((r) => setTimeout(r, 150 + Math.random() * 100));
    } finally {
      child.kill("SIGKILL");
    }
    await new Promise((r) => child.once("exit", r));
    const j = await openJournal(state);
    const m = await j.get("m-k");
    expect(m?.steps).toHaveLength(50);
    expect(m!.totalMs).toBeGreaterThanOrEqual(5);
    const ctx = await j.getContext<{ i: number }>("m-k");
    // One line holds both: the record and its outputs are never from different saves.
    expect(ctx!.i).toBe(m!.totalMs);
    expect((await readdir(join(state, "migrations"))).filter((f) => f.includes(".tmp-"))).toEqual([]);
  });

  it("stores a migration's step outputs with it; a save without outputs keeps the last ones", async () => {
    const j = await openJournal(dir);
    expect(await j.getContext("m-1")).toBeUndefined();
    await j.saveState(mig("m-1"), { checkpointId: "ck-1", digests: ["sha256:ab"], connections: [{ port: 80 }] });
    await j.saveState(mig("m-1", { totalMs: 5 }), { checkpointId: "ck-2" });
    await j.save(mig("m-1", { totalMs: 6 }));
    const j2 = await openJournal(dir);
    expect(await j2.getContext("m-1")).toEqual({ checkpointId: "ck-2" });
    expect((await j2.get("m-1"))?.totalMs).toBe(6);
    // A copy: changing it changes nothing stored.
    ((await j2.getContext("m-1")) as { checkpointId: string }).checkpointId = "x";
    expect(await j2.getContext("m-1")).toEqual({ checkpointId: "ck-2" });
  });

  it("refuses ids that could escape the directory", async () => {
    const j = await openJournal(dir);
    await expect(j.save(mig("../etc/passwd"))).rejects.toThrow(/id: "..\/etc\/passwd" is not a valid migration id/);
    await expect(j.getContext("a/b")).rejects.toMatchObject({ code: "InvalidArgument" });
    await expect(j.saveState(mig("a b"), {})).rejects.toMatchObject({ code: "InvalidArgument" });
    await expect(j.get("")).rejects.toMatchObject({ code: "InvalidArgument" });
  });
});
