import { Migration, MigrationState } from "@ferry/api/controller";
import { FerryError, asFerryError, silentLogger, type Logger } from "@ferry/common";
import { randomBytes } from "node:crypto";
import { mkdir, open, readdir, readFile, rename, rmdir, unlink, type FileHandle } from "node:fs/promises";
import { join } from "node:path";
import type { MigrationRecordSink } from "./pipeline/types.js";

/** Migration ids and file names: no separators, no "..", nothing a path could be built from. */
const ID_RE = /^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$/;
const TMP_MARK = ".tmp-";

/** States of a migration that has not ended: a restarted controller resumes these. */
const UNFINISHED: ReadonlySet<MigrationState> = new Set([
  MigrationState.MIGRATION_STATE_PENDING,
  MigrationState.MIGRATION_STATE_RUNNING,
  MigrationState.MIGRATION_STATE_CANCELLING,
  MigrationState.MIGRATION_STATE_ROLLING_BACK,
]);

export interface ListMigrationsFilter {
  container?: string;
  /** At most this many, newest first; all when 0 or absent. */
  limit?: number;
}

/** One migration as the journal holds it: the record, its step outputs, and its log file. */
interface Entry {
  /** Absent only while an entry is being loaded. */
  m?: Migration;
  /** The step outputs as JSON text: written into each line as they are, parsed only when read. */
  ctx?: string;
  /** The open log, between the first append and the compaction at the migration's end. */
  fh?: FileHandle;
  /** The log's directory entry is durable (the file was loaded or the directory fsynced since). */
  onDisk: boolean;
  /** The last write queued; the next one starts after it. */
  inFlight: Promise<void>;
  /** A write queued but not started: saves made now join it (group commit). */
  next?: Promise<void>;
}

/**
 * The controller's embedded store of migrations: no server, one append-only log per migration,
 * `<stateDir>/migrations/<id>.log`. Each line is the whole state after a save,
 * `{"migration": <Migration.toJSON form, timestamps as ISO strings>, "context": <step outputs>}`,
 * so the last whole line is the migration (a resumed migration needs both).
 *
 * A save appends one line and fdatasyncs it: about 0.4 ms on this machine's ext4, against 1.2 ms
 * for a temp file, fsync, rename and fsync of the directory, and the engine saves before every
 * step (write-ahead). Saves made while a line is being written join the next line (group commit):
 * a migration never has two writes in flight, and a burst of saves costs two syncs at most.
 * A line torn by a killed process is dropped at `open`. When a migration ends, its log is
 * compacted into one line by an atomic rewrite (temp file, fsync, rename, fsync of the directory)
 * and closed; `open` compacts what it loads the same way.
 *
 * Records written by earlier versions (`migrations/<id>.json` with `migration-context/<id>.json`)
 * are converted to logs at `open`. Everything is also kept in memory, so reads cost no IO.
 */
export class MigrationJournal implements MigrationRecordSink {
  private readonly entries = new Map<string, Entry>();

  private constructor(
    private readonly dir: string,
    private readonly log: Logger,
  ) {}

  /** Opens (creating if needed) the journal under `stateDir`, removes stale temp files, loads every migration. */
  static async open(stateDir: string, log: Logger = silentLogger): Promise<MigrationJournal> {
    const j = new MigrationJournal(join(stateDir, "migrations"), log);
    await mkdir(j.dir, { recursive: true, mode: 0o700 });
    for (const f of await readdir(j.dir)) {
      // Left by a process killed between write and rename: the previous version is intact.
      if (f.includes(TMP_MARK)) await unlink(join(j.dir, f)).catch(() => undefined);
    }
    for (const f of await readdir(j.dir)) {
      if (f.endsWith(".log")) await j.load(f.slice(0, -4));
    }
    await j.importLegacy(join(stateDir, "migration-context"));
    return j;
  }

  /** Stores the migration (replacing the previous version); resolves once it is durable. */
  save(m: Migration): Promise<void> {
    return this.saveState(m, undefined);
  }

  /** Stores the migration and, unless undefined, its step outputs: one durable write for both. */
  saveState(m: Migration, ctx: unknown): Promise<void> {
    try {
      checkId(m.id);
    } catch (e) {
      return Promise.reject(asFerryError(e));
    }
    const body = ctx === undefined ? undefined : JSON.stringify(ctx);
    if (ctx !== undefined && body === undefined) {
      return Promise.reject(FerryError.invalid("context", "is not JSON-serialisable", "pass a plain object"));
    }
    const e = this.entry(m.id);
    e.m = Migration.fromJSON(Migration.toJSON(m));
    if (body !== undefined) e.ctx = body;
    return this.commit(m.id, e);
  }

  /** A copy of the migration, or undefined. */
  get(id: string): Promise<Migration | undefined> {
    try {
      checkId(id);
    } catch (e) {
      return Promise.reject(asFerryError(e));
    }
    const m = this.entries.get(id)?.m;
    return Promise.resolve(m ? Migration.fromJSON(Migration.toJSON(m)) : undefined);
  }

  /** Newest first (by createdAt, then id). */
  list(filter: ListMigrationsFilter = {}): Promise<Migration[]> {
    let all = [...this.entries.values()].flatMap((e) => (e.m ? [e.m] : []));
    if (filter.container) all = all.filter((m) => m.container === filter.container);
    all.sort((a, b) => (b.createdAt?.getTime() ?? 0) - (a.createdAt?.getTime() ?? 0) || (a.id < b.id ? 1 : a.id > b.id ? -1 : 0));
    if (filter.limit) all = all.slice(0, filter.limit);
    return Promise.resolve(all.map((m) => Migration.fromJSON(Migration.toJSON(m))));
  }

  /** Migrations in PENDING, RUNNING, CANCELLING or ROLLING_BACK: what a restarted controller must resume. */
  async unfinished(): Promise<Migration[]> {
    return (await this.list()).filter((m) => UNFINISHED.has(m.state)).reverse();
  }

  /** A copy of the context saved last for the migration, or undefined. */
  getContext<T = unknown>(id: string): Promise<T | undefined> {
    try {
      checkId(id);
    } catch (e) {
      return Promise.reject(asFerryError(e));
    }
    const ctx = this.entries.get(id)?.ctx;
    return Promise.resolve(ctx === undefined ? undefined : (JSON.parse(ctx) as T));
  }

  /** Waits for every queued write (tests, shutdown). */
  async flush(): Promise<void> {
    await Promise.all([...this.entries.values()].map((e) => e.inFlight));
  }

  /** Waits for every queued write and closes the open logs. */
  async close(): Promise<void> {
    await this.flush();
    for (const e of this.entries.values()) {
      await e.fh?.close().catch(() => undefined);
      e.fh = undefined;
    }
  }

  private entry(id: string): Entry {
    let e = this.entries.get(id);
    if (!e) this.entries.set(id, (e = { onDisk: false, inFlight: Promise.resolve() }));
    return e;
  }

  /** Queues a line with the entry's state as it is when the line is written, or joins the one queued. */
  private commit(id: string, e: Entry): Promise<void> {
    if (e.next) return e.next;
    const next = e.inFlight.then(async () => {
      e.next = undefined;
      const line = lineOf(e);
      try {
        if (e.m && !UNFINISHED.has(e.m.state)) await this.compact(id, e, line);
        else await this.append(id, e, line);
      } catch (err) {
        // The file may hold a partial line: the next write starts a fresh, compacted file.
        await e.fh?.close().catch(() => undefined);
        e.fh = undefined;
        e.onDisk = false;
        throw err;
      }
    });
    e.next = next;
    e.inFlight = next.catch(() => undefined);
    return next;
  }

  private async append(id: string, e: Entry, line: string): Promise<void> {
    if (!e.onDisk) return this.compact(id, e, line);
    e.fh ??= await open(join(this.dir, `${id}.log`), "a", 0o600);
    await e.fh.appendFile(line, "utf8");
    await e.fh.datasync();
  }

  /** Replaces the log by the one line, atomically; the next append reopens it. */
  private async compact(id: string, e: Entry, line: string): Promise<void> {
    await e.fh?.close();
    e.fh = undefined;
    await writeAtomic(this.dir, `${id}.log`, line);
    e.onDisk = true;
  }

  /** Loads a log's last whole line; compacts the log when it had more (or a torn tail). */
  private async load(id: string): Promise<void> {
    const path = join(this.dir, `${id}.log`);
    try {
      checkId(id);
      const lines = (await readFile(path, "utf8")).split("\n");
      for (let i = lines.length - 1; i >= 0; i--) {
        let state: LogLine;
        try {
          state = JSON.parse(lines[i]!) as LogLine;
        } catch {
          continue; // torn by a kill mid-append, or the empty string after the last newline
        }
        if (state.migration === undefined) continue;
        const e = this.entry(id);
        e.m = Migration.fromJSON(state.migration);
        if (e.m.id !== id) throw new Error(`holds migration "${e.m.id}"`);
        if (state.context !== undefined) e.ctx = JSON.stringify(state.context);
        e.onDisk = true;
        if (lines.length !== 2 || i !== 0) await this.compact(id, e, lineOf(e));
        return;
      }
      throw new Error("no whole line");
    } catch (e) {
      // Only a hand edit (or a log killed during its very first write) gets here: keep going, say which file.
      this.entries.delete(id);
      this.log.error({ path, err: e instanceof Error ? e.message : String(e) }, "migration log unreadable, skipped");
    }
  }

  /** Converts the JSON files of earlier versions to logs, then removes them. */
  private async importLegacy(contextDir: string): Promise<void> {
    for (const f of await readdir(this.dir)) {
      if (!f.endsWith(".json")) continue;
      const id = f.slice(0, -5);
      const files = [join(this.dir, f), join(contextDir, f)];
      // A log already written from these files (killed before they were removed) wins.
      const hadLog = this.entries.has(id);
      try {
        checkId(id);
        if (!hadLog) {
          const [m, ctx] = await Promise.all(files.map((p) => readFile(p, "utf8").then((b) => JSON.parse(b) as unknown, ignoreMissing)));
          const e = this.entry(id);
          e.m = Migration.fromJSON(m);
          if (ctx !== undefined) e.ctx = JSON.stringify(ctx);
          await this.compact(id, e, lineOf(e));
        }
        for (const p of files) await unlink(p).catch(ignoreMissing);
      } catch (e) {
        if (!hadLog) this.entries.delete(id);
        this.log.error(
          { id, err: e instanceof Error ? e.message : String(e) },
          "migration record of an earlier version unreadable, skipped",
        );
      }
    }
    await rmdir(contextDir).catch(() => undefined); // gone once empty
  }
}

interface LogLine {
  migration?: unknown;
  context?: unknown;
}

function lineOf(e: Entry): string {
  const fields: string[] = [];
  if (e.m) fields.push(`"migration":${JSON.stringify(Migration.toJSON(e.m))}`);
  if (e.ctx !== undefined) fields.push(`"context":${e.ctx}`);
  return `{${fields.join(",")}}\n`;
}

function ignoreMissing(e: unknown): undefined {
  if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
  throw e;
}

function checkId(id: string): void {
  if (!ID_RE.test(id)) {
    throw FerryError.invalid("id", `"${id}" is not a valid migration id`, "use 1-128 letters, digits, '-' or '_'");
  }
}

/** temp file + fsync + rename + fsync(dir): the file is either the old or the new version. */
async function writeAtomic(dir: string, name: string, body: string): Promise<void> {
  const final = join(dir, name);
  const tmp = join(dir, `${name}${TMP_MARK}${process.pid}-${randomBytes(4).toString("hex")}`);
  const fh = await open(tmp, "w", 0o600);
  try {
    await fh.writeFile(body, "utf8");
    await fh.sync();
  } finally {
    await fh.close();
  }
  try {
    await rename(tmp, final);
  } catch (e) {
    await unlink(tmp).catch(() => undefined);
    throw e;
  }
  const d = await open(dir, "r");
  try {
    await d.sync();
  } finally {
    await d.close();
  }
}
