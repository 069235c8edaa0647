import { Migration, MigrationState } from "@ferry/api/controller";
import { FerryError, asFerryError, silentLogger, type Logger } from "@ferry/common";
import { randomBytes } from "node:crypto";
import { mkdir, open, readdir, readFile, rename, unlink } from "node:fs/promises";
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

/**
 * The controller's embedded store of migrations: no server, one JSON file per migration under
 * `<stateDir>/migrations/<id>.json` (the generated `Migration.toJSON` form, timestamps as ISO
 * strings), plus an opaque per-migration context under `<stateDir>/migration-context/<id>.json`
 * (the step outputs a resumed migration needs).
 *
 * Every write goes to a unique temp file, is fsynced, renamed over the old file, and the directory
 * is fsynced: a process killed at any point leaves either the old or the new version, never a torn
 * one. Writes to one id are serialised so an older snapshot can never land after a newer one.
 * All migrations are also kept in memory (read once at `open`), so reads cost no IO.
 */
export class MigrationJournal implements MigrationRecordSink {
  private readonly cache = new Map<string, Migration>();
  private readonly chains = new Map<string, Promise<void>>();

  private constructor(
    private readonly migrationsDir: string,
    private readonly contextDir: string,
    private readonly log: Logger,
  ) {}

  /** Opens (creating if needed) the journal under `stateDir`, removes stale temp files, loads every migration. */
  static async open(stateDir: string, log: Logger = silentLogger): Promise<MigrationJournal> {
    const j = new MigrationJournal(join(stateDir, "migrations"), join(stateDir, "migration-context"), log);
    await mkdir(j.migrationsDir, { recursive: true, mode: 0o700 });
    await mkdir(j.contextDir, { recursive: true, mode: 0o700 });
    for (const dir of [j.migrationsDir, j.contextDir]) {
      for (const f of await readdir(dir)) {
        // Left by a process killed between write and rename: the previous version is intact.
        if (f.includes(TMP_MARK)) await unlink(join(dir, f)).catch(() => undefined);
      }
    }
    for (const f of await readdir(j.migrationsDir)) {
      if (!f.endsWith(".json")) continue;
      const path = join(j.migrationsDir, f);
      try {
        const m = Migration.fromJSON(JSON.parse(await readFile(path, "utf8")));
        if (!m.id) throw new Error("no id");
        j.cache.set(m.id, m);
      } catch (e) {
        // Only a hand edit can get here (writes are atomic): keep going, say which file.
        log.error({ path, err: e instanceof Error ? e.message : String(e) }, "migration record unreadable, skipped");
      }
    }
    return j;
  }

  /** Stores the migration (replacing the previous version); resolves once it is durable. */
  async save(m: Migration): Promise<void> {
    checkId(m.id);
    const snapshot = Migration.fromJSON(Migration.toJSON(m));
    this.cache.set(m.id, snapshot);
    const body = JSON.stringify(Migration.toJSON(snapshot), null, 1);
    await this.serialised(`m:${m.id}`, () => writeAtomic(this.migrationsDir, `${m.id}.json`, body));
  }

  /** A copy of the migration, or undefined. */
  get(id: string): Promise<Migration | undefined> {
    try {
      checkId(id);
    } catch (e) {
      return Promise.reject(asFerryError(e));
    }
    const m = this.cache.get(id);
    return Promise.resolve(m ? Migration.fromJSON(Migration.toJSON(m)) : undefined);
  }

  /** Newest first (by createdAt, then id). */
  list(filter: ListMigrationsFilter = {}): Promise<Migration[]> {
    let all = [...this.cache.values()];
    if (filter.container) all = all.filter((m) => m.container === filter.container);
    all.sort((a, b) => (b.createdAt?.getTime() ?? 0) - (a.createdAt?.getTime() ?? 0) || (a.id < b.id ? 1 : a.id > b.id ? -1 : 0));
    if (filter.limit) all = all.slice(0, filter.limit);
    return Promise.resolve(all.map((m) => Migration.fromJSON(Migration.toJSON(m))));
  }

  /** Migrations in PENDING, RUNNING, CANCELLING or ROLLING_BACK: what a restarted controller must resume. */
  async unfinished(): Promise<Migration[]> {
    return (await this.list()).filter((m) => UNFINISHED.has(m.state)).reverse();
  }

  /** Stores the migration's step outputs (any JSON value), atomically like `save`. */
  async saveContext(id: string, ctx: unknown): Promise<void> {
    checkId(id);
    const body = JSON.stringify(ctx);
    if (body === undefined) throw FerryError.invalid("context", "is not JSON-serialisable", "pass a plain object");
    await this.serialised(`c:${id}`, () => writeAtomic(this.contextDir, `${id}.json`, body));
  }

  /** The context saved last for the migration, or undefined. */
  async getContext<T = unknown>(id: string): Promise<T | undefined> {
    checkId(id);
    await this.chains.get(`c:${id}`);
    try {
      return JSON.parse(await readFile(join(this.contextDir, `${id}.json`), "utf8")) as T;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw new FerryError("DataLoss", `migration ${id}: context file unreadable: ${(e as Error).message}`, { cause: e });
    }
  }

  /** Waits for every queued write (tests, shutdown). */
  async flush(): Promise<void> {
    await Promise.all(this.chains.values());
  }

  private serialised(key: string, write: () => Promise<void>): Promise<void> {
    const prev = this.chains.get(key) ?? Promise.resolve();
    const next = prev.catch(() => undefined).then(write);
    this.chains.set(key, next);
    const cleanup = (): void => {
      if (this.chains.get(key) === next) this.chains.delete(key);
    };
    next.then(cleanup, cleanup);
    return next;
  }
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
