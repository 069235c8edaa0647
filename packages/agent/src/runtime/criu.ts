import { createServer } from "node:net";
import { copyFile, mkdtemp, readFile, rename, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { exec, ExecError, FerryError, type Logger, silentLogger } from "@ferry/common";
import { parseCriuStats, type StatsEntry } from "./criu-stats.js";

/** Features asked with `criu check --feature X`; "lazy_pages" is derived (uffd + uffd-noncoop). */
export const DEFAULT_CRIU_FEATURES = [
  "mem_dirty_track",
  "uffd",
  "uffd-noncoop",
  "tcp_half_closed",
  "external_net_ns",
  "network_lock_nftables",
  "timens",
] as const;

export interface PageServerHandle {
  address: string;
  port: number;
  pid: number;
  pidFile: string;
  imagesDir: string;
}

/** CRIU, for what runc does not do: capabilities, page servers, stats, the kdat cache. */
export interface CriuApi {
  readonly path: string;
  version(): Promise<string>;
  check(): Promise<{ ok: boolean; output: string }>;
  features(names?: readonly string[]): Promise<string[]>;
  startPageServer(opts: { address: string; port: number; imagesDir: string; pidFile: string }): Promise<PageServerHandle>;
  stopPageServer(handle: Pick<PageServerHandle, "pid" | "pidFile">): Promise<void>;
  readStats(dir: string, kind: "dump" | "restore"): Promise<StatsEntry | undefined>;
  primeKdatCache(): Promise<{ path: string; durationMs: number }>;
}

/** The criu binary (Ferry's is /opt/ferry/bin/criu or /usr/local/sbin/criu, CRIU 4.2.1). */
export class Criu implements CriuApi {
  readonly path: string;
  private readonly log: Logger;

  constructor(opts: { path?: string; log?: Logger } = {}) {
    this.path = opts.path ?? "criu";
    this.log = opts.log ?? silentLogger;
  }

  async version(): Promise<string> {
    const { stdout } = await exec(this.path, ["--version"], { timeoutMs: 10_000 });
    const m = /Version:\s*(\S+)/.exec(stdout);
    if (!m) throw new FerryError("Internal", `cannot read the CRIU version from "${stdout.trim()}"`);
    return m[1]!;
  }

  async check(): Promise<{ ok: boolean; output: string }> {
    try {
      const r = await exec(this.path, ["check"], { timeoutMs: 30_000 });
      return { ok: true, output: (r.stdout + r.stderr).trim() };
    } catch (e) {
      if (e instanceof ExecError) return { ok: false, output: (e.stdout + e.stderr).trim() };
      throw e;
    }
  }

  /** The subset of `names` this kernel+CRIU support; "lazy_pages" is added when both uffd checks pass. */
  async features(names: readonly string[] = DEFAULT_CRIU_FEATURES): Promise<string[]> {
    const results = await Promise.all(
      names.map(async (f) => {
        const r = await exec(this.path, ["check", "--feature", f], { timeoutMs: 30_000, okCodes: [0, 1] });
        return r.exitCode === 0 ? f : undefined;
      }),
    );
    const have = results.filter((f): f is string => f !== undefined);
    if (have.includes("uffd") && have.includes("uffd-noncoop")) have.push("lazy_pages");
    return have;
  }

  /**
   * `criu page-server -d`: receives one dump's pages into `imagesDir`, then exits by itself.
   * CRIU refuses port 0, so port 0 here means "pick a free one" (probed with a throwaway socket;
   * a lost race is retried).
   */
  async startPageServer(opts: { address: string; port: number; imagesDir: string; pidFile: string }): Promise<PageServerHandle> {
    for (let attempt = 0; ; attempt++) {
      const port = opts.port || (await freePort(opts.address));
      await rm(opts.pidFile, { force: true });
      try {
        // Through a shell that points stdio at a log first: the daemon (-d) keeps the fds it was
        // given, and with ours it would hold our pipes open and exec would never return.
        const logFile = path.join(path.dirname(opts.pidFile), "page-server.log");
        await exec(
          "sh",
          [
            "-c",
            'log=$1; shift; exec "$@" </dev/null >>"$log" 2>&1',
            "sh",
            logFile,
            this.path,
            "page-server",
            "--address",
            opts.address,
            "--port",
            String(port),
            "--images-dir",
            opts.imagesDir,
            "-d",
            "--pidfile",
            opts.pidFile,
          ],
          { timeoutMs: 30_000 },
        );
      } catch (e) {
        const log = await readFile(path.join(path.dirname(opts.pidFile), "page-server.log"), "utf8").catch(() => "");
        if (opts.port === 0 && attempt < 3 && /in use/i.test(log)) continue;
        throw new FerryError(
          "Internal",
          `criu page-server on ${opts.address}:${port} failed: ${tail(e)} ${log.trim().split("\n").slice(-3).join(" | ")}`,
          { cause: e },
        );
      }
      const pid = Number((await readFile(opts.pidFile, "utf8")).trim());
      this.log.info({ address: opts.address, port, pid, imagesDir: opts.imagesDir }, "page server started");
      return { address: opts.address, port, pid, pidFile: opts.pidFile, imagesDir: opts.imagesDir };
    }
  }

  /** Kill a page server this agent started; a pid that is no longer a criu page-server is left alone. */
  async stopPageServer(handle: Pick<PageServerHandle, "pid" | "pidFile">): Promise<void> {
    let cmdline: string;
    try {
      cmdline = (await readFile(`/proc/${handle.pid}/cmdline`, "utf8")).replaceAll("\0", " ");
    } catch {
      return; // already gone
    }
    // the pid may have been reused since: only a criu page-server is ours to kill
    if (!cmdline.includes("page-server")) return;
    try {
      process.kill(handle.pid, "SIGTERM");
    } catch {
      /* exited meanwhile */
    }
    await rm(handle.pidFile, { force: true });
  }

  /** `stats-dump` / `stats-restore` from a CRIU images or work dir, undefined when absent. */
  async readStats(dir: string, kind: "dump" | "restore"): Promise<StatsEntry | undefined> {
    const file = path.join(dir, `stats-${kind}`);
    let buf: Buffer;
    try {
      buf = await readFile(file);
    } catch {
      return undefined;
    }
    return parseCriuStats(buf, file);
  }

  /**
   * Make CRIU's kernel-feature cache persist on a host whose /run is not tmpfs.
   *
   * CRIU 4.2 loads its kdat cache from /run/criu.kdat (KDAT_RUNDIR, compiled in) without checking
   * the file system, but only SAVES it when /run/criu.kdat.tmp is on tmpfs; otherwise every call
   * re-probes the kernel (20-40 ms, inside the freeze window). So: run `criu check` once in a
   * private mount namespace with a tmpfs on /run, and install the file it saves as the real
   * /run/criu.kdat (atomic rename). Call at agent start: the cache is per boot and per kernel,
   * and a stale one from an older kernel is replaced.
   */
  async primeKdatCache(): Promise<{ path: string; durationMs: number }> {
    const started = performance.now();
    const target = "/run/criu.kdat";
    const dir = await mkdtemp(path.join(tmpdir(), "ferry-kdat-"));
    try {
      const out = path.join(dir, "criu.kdat");
      // the criu path goes in as $1 so the script never interpolates it
      await exec(
        "unshare",
        [
          "--mount",
          "--propagation",
          "private",
          "sh",
          "-c",
          'mount -t tmpfs ferry-kdat /run && "$1" check >/dev/null 2>&1; cp /run/criu.kdat "$2"',
          "ferry-kdat",
          this.path,
          out,
        ],
        { timeoutMs: 30_000 },
      );
      const st = await stat(out);
      if (st.size === 0) throw new FerryError("Internal", "criu saved an empty kdat cache");
      const tmp = `${target}.ferry-${process.pid}`;
      await copyFile(out, tmp);
      await rename(tmp, target);
      const durationMs = performance.now() - started;
      this.log.info({ path: target, bytes: st.size, durationMs }, "criu kdat cache primed");
      return { path: target, durationMs };
    } catch (e) {
      throw e instanceof FerryError
        ? e
        : new FerryError("Internal", `cannot prime the CRIU kdat cache: ${tail(e)}`, {
            cause: e,
            fix: "run the agent as root with util-linux unshare; CRIU still works without the cache, 20-40 ms slower per call",
          });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }
}

/** A free TCP port on `address` right now. */
export function freePort(address: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, address, () => {
      const a = srv.address();
      const port = typeof a === "object" && a ? a.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

function tail(e: unknown): string {
  if (e instanceof ExecError) return e.stderr.trim().split("\n").slice(-5).join(" | ") || e.message;
  return e instanceof Error ? e.message : String(e);
}
