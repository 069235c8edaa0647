import { randomBytes } from "node:crypto";
import { constants } from "node:fs";
import { access, mkdir, open, readdir, readFile, rename, rm, stat, writeFile, lstat } from "node:fs/promises";
import path from "node:path";
import { ContainerState, type ContainerInfo, type ContainerSpec, type TcpConnection } from "@ferry/api/agent";
import { exec, ExecError, FerryError, type Logger, silentLogger, validateName } from "@ferry/common";
import { CRIU_NETWORK_SCRIPT, unlockNetns } from "../net/lock.js";
import type { CriuApi } from "./criu.js";
import type { DumpStats, RestoreStats } from "./criu-stats.js";
import { KeyedMutex } from "./keyed-mutex.js";
import { buildOciConfig } from "./oci.js";
import { openTcpTables } from "./proc-net.js";
import { readPidFile, type RuncApi, type RuncState } from "./runc.js";

/** Configuration of a {@link ContainerRuntime}. */
export interface ContainerRuntimeConfig {
  /** The agent's state dir: containers/, checkpoints/, exports/ live under it. */
  stateDir: string;
  runc: RuncApi;
  criu: CriuApi;
  log?: Logger;
  /** Part of every cgroup path ("/ferry-<agentId>-<name>"): agents share this machine. */
  agentId: string;
}

/** Where a container's root filesystem and network come from, per call. */
export interface ContainerPlacement {
  /** The image's unpacked root filesystem (overlay lower dir), from the image store. */
  lowerDir: string;
  /** The container's network namespace, e.g. /run/netns/ferry-<name>, created by the net module. */
  netnsPath: string;
  /** Digest of the image blob, recorded for inspect and partial migration. */
  imageDigest?: string;
}

export interface CheckpointOptions {
  tcpEstablished: boolean;
  leaveRunning?: boolean;
  pageServer?: { address: string; port: number };
  /** Chosen by the caller (e.g. the migration), else generated. */
  checkpointId?: string;
}

/** Checkpoint timings and sizes, from CRIU's stats-dump and the agent's clock. */
export interface CheckpointStats {
  freezingMs: number;
  frozenMs: number;
  memdumpMs: number;
  memwriteMs: number;
  pagesWritten: number;
  pagesScanned: number;
  imageBytes: number;
  totalMs: number;
  /** The raw decoded entry (µs), when CRIU wrote one. */
  raw?: DumpStats;
}

export interface CheckpointResult {
  checkpointId: string;
  stats: CheckpointStats;
  /** Established TCP connections in the container's namespace just before the dump (/proc/<pid>/net/tcp{,6}). */
  connections: TcpConnection[];
  /** The CRIU images (stateDir/checkpoints/<id>/images). */
  imagesDir: string;
  checkpointDir: string;
  /** CRIU's dump.log. */
  criuLog: string;
  spec: ContainerSpec;
  imageDigest: string;
}

export interface RestoreOptions extends ContainerPlacement {
  /** A checkpoint dir (holding images/ or the images themselves); see {@link ContainerRuntime.checkpointDir}. */
  checkpointDir: string;
  tcpEstablished: boolean;
}

export interface RestoreResult {
  pid: number;
  stats: { restoreMs: number; forkingMs: number; runcMs: number; totalMs: number; raw?: RestoreStats };
  container: ContainerInfo;
  /** CRIU's restore.log. */
  criuLog: string;
}

export interface UsageSample {
  cpuMillicores: number;
  memoryBytes: number;
  diskBytes: number;
}

/** What is kept on disk per container (stateDir/containers/<name>/container.json). */
interface ContainerRecord {
  version: 1;
  spec: ContainerSpec;
  lowerDir: string;
  netnsPath: string;
  imageDigest: string;
  createdAt: string;
  /** The last checkpoint taken or restored from. */
  checkpointId: string;
  /** Dumped (runc no longer knows it) and not restored since. */
  checkpointed: boolean;
  /** -1 when unknown: the agent is not the container's parent (see README.md here). */
  exitCode: number;
}

interface CheckpointMeta {
  checkpointId: string;
  name: string;
  spec: ContainerSpec;
  imageDigest: string;
  createdAt: string;
  tcpEstablished: boolean;
  leaveRunning: boolean;
  connections: TcpConnection[];
  stats: CheckpointStats;
}

const CHECKPOINT_ID = /^[a-z0-9][a-z0-9._-]{0,79}$/;
const SAFE_PATH = /^\/[^,:\s\0]*$/;

/** A checkpoint id: also a directory name. */
export function validateCheckpointId(field: string, value: string): string {
  if (!CHECKPOINT_ID.test(value) || value.includes("..")) {
    throw FerryError.invalid(
      field,
      `"${value}" is not a valid checkpoint id`,
      "use 1-80 characters: lowercase letters, digits, '.', '_' and '-'",
    );
  }
  return value;
}

/**
 * The container runtime behind the agent's container and checkpoint RPCs: OCI bundles over an
 * overlayfs, driven by runc and CRIU. All state lives under `stateDir` (plus runc's own --root),
 * so a restarted agent finds everything again with {@link rediscover}.
 *
 *   stateDir/containers/<name>/ container.json  bundle/config.json  bundle/rootfs (overlay mount)
 *                               upper/ work/  container.log  runc.log  container.pid
 *   stateDir/checkpoints/<id>/  images/ (CRIU)  work/ (dump.log, stats)  restore-<t>/  meta.json
 *   stateDir/exports/           tars of upper dirs and checkpoints
 *
 * Operations on one container are serialised; different containers run in parallel.
 */
export class ContainerRuntime {
  readonly stateDir: string;
  private readonly runc: RuncApi;
  private readonly criu: CriuApi;
  private readonly log: Logger;
  private readonly agentId: string;
  private readonly locks = new KeyedMutex();
  /** CRIU's configuration for this agent's containers (stateDir/criu.conf): see {@link writeCriuConfig}. */
  readonly criuConfig: string;
  private criuConfigWritten: Promise<void> | undefined;

  constructor(cfg: ContainerRuntimeConfig) {
    if (!path.isAbsolute(cfg.stateDir) || !SAFE_PATH.test(cfg.stateDir)) {
      throw FerryError.invalid(
        "stateDir",
        `"${cfg.stateDir}" must be an absolute path without ',', ':' or spaces`,
        "pick e.g. /var/lib/ferry/agent",
      );
    }
    this.stateDir = cfg.stateDir;
    this.criuConfig = path.join(cfg.stateDir, "criu.conf");
    this.runc = cfg.runc;
    this.criu = cfg.criu;
    this.log = (cfg.log ?? silentLogger).child({ module: "runtime" });
    this.agentId = validateName("agentId", cfg.agentId);
  }

  // ---- paths ------------------------------------------------------------------------------------

  private dir(name: string): string {
    return path.join(this.stateDir, "containers", name);
  }
  private recordPath(name: string): string {
    return path.join(this.dir(name), "container.json");
  }
  private bundle(name: string): string {
    return path.join(this.dir(name), "bundle");
  }
  private rootfs(name: string): string {
    return path.join(this.bundle(name), "rootfs");
  }
  /** The container's own files (overlay upper dir). */
  upperDir(name: string): string {
    return path.join(this.dir(name), "upper");
  }
  /** The container's stdout+stderr. */
  logPath(name: string): string {
    return path.join(this.dir(name), "container.log");
  }
  /** The directory of a checkpoint held here. */
  checkpointDir(id: string): string {
    return path.join(this.stateDir, "checkpoints", validateCheckpointId("checkpoint_id", id));
  }
  private cgroupsPath(name: string): string {
    return `/ferry-${this.agentId}-${name}`;
  }

  // ---- records ----------------------------------------------------------------------------------

  private async readRecord(name: string): Promise<ContainerRecord | undefined> {
    try {
      return JSON.parse(await readFile(this.recordPath(name), "utf8")) as ContainerRecord;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw new FerryError("DataLoss", `container record ${this.recordPath(name)} is unreadable: ${(e as Error).message}`, { cause: e });
    }
  }

  private async mustRecord(name: string): Promise<ContainerRecord> {
    const rec = await this.readRecord(name);
    if (!rec) throw FerryError.notFound("container", name, "list containers with ListContainers");
    return rec;
  }

  private async writeRecord(rec: ContainerRecord): Promise<void> {
    const p = this.recordPath(rec.spec.name);
    // write-then-rename: a crash never leaves half a record
    await writeFile(`${p}.tmp`, JSON.stringify(rec, null, 2));
    await rename(`${p}.tmp`, p);
  }

  // ---- lifecycle --------------------------------------------------------------------------------

  /** Write the bundle (overlay rootfs + config.json) and `runc create` the container (not started). */
  async create(spec: ContainerSpec, placement: ContainerPlacement): Promise<ContainerInfo> {
    const name = validateName("spec.name", spec.name);
    if (spec.args.length === 0)
      throw FerryError.invalid("spec.args", "no command given", 'set args, e.g. ["/usr/local/bin/ferry-echo", "7000"]');
    await this.checkPlacement(placement);
    return this.locks.run(name, async () => {
      if ((await this.readRecord(name)) || (await this.runc.state(name))) {
        throw new FerryError("AlreadyExists", `container "${name}" already exists`, { fix: "delete it first or pick another name" });
      }
      const rec: ContainerRecord = {
        version: 1,
        spec,
        lowerDir: placement.lowerDir,
        netnsPath: placement.netnsPath,
        imageDigest: placement.imageDigest ?? "",
        createdAt: new Date().toISOString(),
        checkpointId: "",
        checkpointed: false,
        exitCode: -1,
      };
      try {
        await this.prepareBundle(rec);
        await this.writeRecord(rec);
        await this.launch(rec, "create");
      } catch (e) {
        // undo in reverse: nothing of a failed create stays behind
        await this.unmountRootfs(name).catch(() => undefined);
        await rm(this.dir(name), { recursive: true, force: true }).catch(() => undefined);
        throw this.runcFailure(e, `create container "${name}"`, path.join(this.dir(name), "runc.log"));
      }
      this.log.info({ container: name }, "container created");
      return this.info(rec, await this.runc.state(name));
    });
  }

  /** Start a created container; a stopped one is re-created from its bundle first. */
  async start(name: string): Promise<ContainerInfo> {
    validateName("name", name);
    return this.locks.run(name, async () => {
      const rec = await this.mustRecord(name);
      if (rec.checkpointed) {
        throw new FerryError("FailedPrecondition", `container "${name}" is checkpointed`, {
          fix: "restore it from its checkpoint instead",
        });
      }
      let st = await this.runc.state(name);
      if (st?.status === "running") return this.info(rec, st);
      if (!st || st.status === "stopped") {
        if (st) await this.runc.delete(name, true);
        await this.prepareBundle(rec);
        try {
          await this.launch(rec, "create");
        } catch (e) {
          throw this.runcFailure(e, `create container "${name}"`, path.join(this.dir(name), "runc.log"));
        }
      }
      try {
        await this.runc.start(name);
      } catch (e) {
        throw this.runcFailure(e, `start container "${name}"`);
      }
      rec.exitCode = -1;
      await this.writeRecord(rec);
      st = await this.runc.state(name);
      this.log.info({ container: name, pid: st?.pid }, "container started");
      return this.info(rec, st);
    });
  }

  /** SIGTERM, then SIGKILL (all processes) after `timeoutMs`. Stopping a stopped container is a no-op. */
  async stop(name: string, timeoutMs = 5000): Promise<ContainerInfo> {
    validateName("name", name);
    return this.locks.run(name, async () => {
      const rec = await this.mustRecord(name);
      let st = await this.runc.state(name);
      if (!st || st.status === "stopped") return this.info(rec, st);
      if (st.status === "created") {
        // never started: nothing to signal gracefully
        await this.runc.delete(name, true);
        return this.info(rec, await this.runc.state(name));
      }
      await this.runc.kill(name, "SIGTERM").catch(() => undefined);
      let signal = 15;
      if (!(await this.waitStopped(name, timeoutMs))) {
        signal = 9;
        await this.runc.kill(name, "SIGKILL", true).catch(() => undefined);
        if (!(await this.waitStopped(name, 5000))) {
          throw new FerryError("Internal", `container "${name}" survived SIGKILL for 5 s`, {
            fix: "check for a process stuck in the kernel (D state)",
          });
        }
      }
      // the agent is not the container's parent, so the real status is not ours to read: record the signal we sent
      rec.exitCode = 128 + signal;
      await this.writeRecord(rec);
      st = await this.runc.state(name);
      this.log.info({ container: name, signal }, "container stopped");
      return this.info(rec, st);
    });
  }

  /** Remove the container (runc state, overlay, its dir). Checkpoints are kept. */
  async delete(name: string, opts: { force?: boolean } = {}): Promise<void> {
    validateName("name", name);
    await this.locks.run(name, async () => {
      const rec = await this.readRecord(name);
      const st = await this.runc.state(name);
      if (!rec && !st) throw FerryError.notFound("container", name);
      if (st && (st.status === "running" || st.status === "paused") && !opts.force) {
        throw new FerryError("FailedPrecondition", `container "${name}" is ${st.status}`, { fix: "stop it first, or delete with force" });
      }
      if (st) {
        try {
          await this.runc.delete(name, true);
        } catch (e) {
          throw this.runcFailure(e, `delete container "${name}"`);
        }
      }
      await this.unmountRootfs(name);
      await rm(this.dir(name), { recursive: true, force: true });
      this.log.info({ container: name }, "container deleted");
    });
  }

  async inspect(name: string): Promise<ContainerInfo> {
    validateName("name", name);
    const rec = await this.mustRecord(name);
    return this.info(rec, await this.runc.state(name));
  }

  async list(): Promise<ContainerInfo[]> {
    const names = await this.recordNames();
    const states = new Map((await this.runc.list()).map((s) => [s.id, s]));
    const out: ContainerInfo[] = [];
    for (const n of names) {
      const rec = await this.readRecord(n);
      if (rec) out.push(this.info(rec, states.get(n)));
    }
    return out;
  }

  /**
   * After an agent restart: reconcile records with `runc list`. Containers keep running without
   * the agent (their stdio relays are in their own sessions), so nothing is restarted here.
   * Returns the containers and the runc containers under this root that have no record.
   */
  async rediscover(): Promise<{ containers: ContainerInfo[]; orphans: string[] }> {
    // Ferry pauses a container only for a checkpoint (see freeze): one still paused is what an
    // agent that stopped between its freeze and the dump left behind. It runs again.
    let containers = await this.list();
    const frozen = containers.filter((c) => c.state === ContainerState.CONTAINER_STATE_PAUSED && c.spec);
    for (const c of frozen) {
      await this.thaw(c.spec!.name);
      this.log.warn({ container: c.spec!.name }, "container was left frozen by an interrupted checkpoint; thawed");
    }
    if (frozen.length) containers = await this.list();
    const known = new Set(containers.map((c) => c.spec?.name));
    const orphans = (await this.runc.list()).map((s) => s.id).filter((id) => !known.has(id));
    if (orphans.length) this.log.warn({ orphans }, "runc containers without a record");
    this.log.info({ containers: containers.length }, "containers rediscovered");
    return { containers, orphans };
  }

  /** Read the container's log from `offset` (at most `maxBytes`). */
  async logs(name: string, opts: { offset?: number; maxBytes?: number } = {}): Promise<{ data: Buffer; nextOffset: number }> {
    validateName("name", name);
    await this.mustRecord(name);
    const offset = opts.offset ?? 0;
    const fh = await open(this.logPath(name), "r").catch(() => undefined);
    if (!fh) return { data: Buffer.alloc(0), nextOffset: offset };
    try {
      const size = (await fh.stat()).size;
      const len = Math.max(0, Math.min(size - offset, opts.maxBytes ?? 1 << 20));
      const data = Buffer.alloc(len);
      if (len > 0) await fh.read(data, 0, len, offset);
      return { data, nextOffset: offset + len };
    } finally {
      await fh.close();
    }
  }

  /** CPU (millicores over `intervalMs`), memory and upper-dir disk use, from cgroup v1 (v2 as fallback). */
  async usage(name: string, intervalMs = 250): Promise<UsageSample> {
    validateName("name", name);
    await this.mustRecord(name);
    const cg = this.cgroupsPath(name);
    const cpu = await firstReadable([`/sys/fs/cgroup/cpuacct${cg}/cpuacct.usage`, `/sys/fs/cgroup/cpu,cpuacct${cg}/cpuacct.usage`]);
    const mem = await firstReadable([`/sys/fs/cgroup/memory${cg}/memory.usage_in_bytes`, `/sys/fs/cgroup${cg}/memory.current`]);
    let cpuMillicores = 0;
    if (cpu) {
      const t0 = performance.now();
      const u0 = Number(await readFile(cpu, "utf8"));
      await new Promise((r) => setTimeout(r, intervalMs));
      const u1 = Number(await readFile(cpu, "utf8"));
      const ns = (performance.now() - t0) * 1e6;
      cpuMillicores = Math.max(0, Math.round(((u1 - u0) / ns) * 1000));
    } else {
      const v2 = await readFile(`/sys/fs/cgroup${cg}/cpu.stat`, "utf8").catch(() => "");
      const us = (s: string): number => Number(/usage_usec (\d+)/.exec(s)?.[1] ?? 0);
      if (v2) {
        const t0 = performance.now();
        await new Promise((r) => setTimeout(r, intervalMs));
        const v2b = await readFile(`/sys/fs/cgroup${cg}/cpu.stat`, "utf8").catch(() => v2);
        cpuMillicores = Math.round(((us(v2b) - us(v2)) * 1000) / ((performance.now() - t0) * 1000));
      }
    }
    const memoryBytes = mem ? Number(await readFile(mem, "utf8")) : 0;
    return { cpuMillicores, memoryBytes, diskBytes: await dirBytes(this.upperDir(name)) };
  }

  // ---- checkpoint / restore ---------------------------------------------------------------------

  /**
   * Dump a running container with CRIU (through runc) into stateDir/checkpoints/<id>/. The TCP
   * 4-tuples are read from /proc/<pid>/net/tcp{,6} before the freeze. Without `leaveRunning` the
   * container is gone afterwards (state CHECKPOINTED) and its overlay stays mounted for a local
   * restore.
   * A failed checkpoint leaves the container running (CRIU resumes it) and removes the partial
   * images; the CRIU log is moved to stateDir/failed/ and named in the error.
   */
  async checkpoint(name: string, opts: CheckpointOptions): Promise<CheckpointResult> {
    validateName("name", name);
    const id = opts.checkpointId
      ? validateCheckpointId("checkpoint_id", opts.checkpointId)
      : `${name}-${Date.now().toString(36)}-${randomBytes(3).toString("hex")}`;
    if (opts.pageServer && (!opts.pageServer.address || !(opts.pageServer.port > 0 && opts.pageServer.port < 65536))) {
      throw FerryError.invalid(
        "page_server",
        "needs an address and a port in 1..65535",
        "start one with StartPageServer and pass what it returned",
      );
    }
    return this.locks.run(name, async () => {
      const started = performance.now();
      const rec = await this.mustRecord(name);
      const st = await this.runc.state(name);
      if (st?.status !== "running") {
        throw new FerryError(
          "FailedPrecondition",
          `container "${name}" is ${st?.status ?? (rec.checkpointed ? "checkpointed" : "stopped")}, not running`,
          {
            fix: "only a running container can be checkpointed",
          },
        );
      }
      const cpDir = this.checkpointDir(id);
      if (await exists(cpDir))
        throw new FerryError("AlreadyExists", `checkpoint "${id}" already exists`, { fix: "delete it or pick another id" });
      const imagesDir = path.join(cpDir, "images");
      const workDir = path.join(cpDir, "work");
      await mkdir(imagesDir, { recursive: true });
      await mkdir(workDir, { recursive: true });

      // The TCP tables are walked (~8 ms) while the cgroup freezes, and read in full before CRIU
      // starts: a frozen container's sockets are all still there, a dumped one's are gone.
      const reading = opts.tcpEstablished ? (await openTcpTables(st.pid)).read() : Promise.resolve([]);
      reading.catch(() => undefined); // awaited below; never an unhandled rejection
      await this.freeze(name);
      const connections = await reading.catch(async (e: unknown) => {
        await this.thaw(name);
        throw e;
      });
      try {
        await this.runc.checkpoint(name, {
          imagePath: imagesDir,
          workPath: workDir,
          tcpEstablished: opts.tcpEstablished,
          leaveRunning: opts.leaveRunning ?? false,
          ...(opts.pageServer ? { pageServer: `${opts.pageServer.address}:${opts.pageServer.port}` } : {}),
        });
        // CRIU leaves the cgroup as it found it: frozen, by us
        if (opts.leaveRunning) await this.thaw(name);
      } catch (e) {
        await this.thaw(name);
        const failedDir = path.join(this.stateDir, "failed", `${id}-${Date.now()}`);
        await mkdir(path.dirname(failedDir), { recursive: true });
        await rename(workDir, failedDir).catch(() => undefined);
        await rm(cpDir, { recursive: true, force: true });
        const after = await this.runc.state(name).catch(() => undefined);
        this.log.error(
          { container: name, checkpointId: id, state: after?.status, criuLog: path.join(failedDir, "dump.log") },
          "checkpoint failed",
        );
        throw this.runcFailure(e, `checkpoint container "${name}"`, path.join(failedDir, "dump.log"), {
          containerState: after?.status ?? "unknown",
        });
      }
      const dump = (await this.criu.readStats(workDir, "dump")) ?? (await this.criu.readStats(imagesDir, "dump"));
      const stats: CheckpointStats = {
        freezingMs: usToMs(dump?.dump?.freezingTimeUs),
        frozenMs: usToMs(dump?.dump?.frozenTimeUs),
        memdumpMs: usToMs(dump?.dump?.memdumpTimeUs),
        memwriteMs: usToMs(dump?.dump?.memwriteTimeUs),
        pagesWritten: dump?.dump?.pagesWritten ?? 0,
        pagesScanned: dump?.dump?.pagesScanned ?? 0,
        imageBytes: await dirBytes(imagesDir),
        totalMs: Math.round(performance.now() - started),
        ...(dump?.dump ? { raw: dump.dump } : {}),
      };
      const meta: CheckpointMeta = {
        checkpointId: id,
        name,
        spec: rec.spec,
        imageDigest: rec.imageDigest,
        createdAt: new Date().toISOString(),
        tcpEstablished: opts.tcpEstablished,
        leaveRunning: opts.leaveRunning ?? false,
        connections,
        stats,
      };
      await writeFile(path.join(cpDir, "meta.json"), JSON.stringify(meta, null, 2));
      rec.checkpointId = id;
      rec.checkpointed = !(opts.leaveRunning ?? false);
      await this.writeRecord(rec);
      this.log.info({ container: name, checkpointId: id, totalMs: stats.totalMs, frozenMs: stats.frozenMs }, "container checkpointed");
      return {
        checkpointId: id,
        stats,
        connections,
        imagesDir,
        checkpointDir: cpDir,
        criuLog: path.join(workDir, "dump.log"),
        spec: rec.spec,
        imageDigest: rec.imageDigest,
      };
    });
  }

  /**
   * Restore a container from a checkpoint dir into its (re-created) network namespace: the record
   * and bundle are created from `spec` when this host does not know the container (migration
   * destination; its upper dir may have been unpacked before with {@link unpackUpper}), the overlay
   * is (re)mounted, then `runc restore -d`; the process must be running afterwards.
   */
  async restore(spec: ContainerSpec, opts: RestoreOptions): Promise<RestoreResult> {
    const name = validateName("spec.name", spec.name);
    await this.checkPlacement(opts);
    const imagesDir = (await exists(path.join(opts.checkpointDir, "images")))
      ? path.join(opts.checkpointDir, "images")
      : opts.checkpointDir;
    if (!(await exists(path.join(imagesDir, "inventory.img")))) {
      throw new FerryError("FailedPrecondition", `no CRIU images in ${opts.checkpointDir}`, {
        field: "checkpoint_dir",
        fix: "checkpoint first, or unpack the checkpoint blob",
      });
    }
    // CRIU's unlock only opened the network lock (net/lock.ts OPEN_RULES); it is taken away right
    // after, still under the container's mutex (a checkpoint after it must not meet a lock half
    // removed), but once the caller has its answer: the grace periods the removal waits for are
    // out of the downtime.
    let answer!: (r: RestoreResult) => void;
    const answered = new Promise<RestoreResult>((resolve) => (answer = resolve));
    const locked = this.locks.run(name, async () => {
      const started = performance.now();
      const st = await this.runc.state(name);
      if (st && st.status !== "stopped") {
        throw new FerryError("AlreadyExists", `container "${name}" is ${st.status} here`, { fix: "stop and delete it before restoring" });
      }
      if (st) await this.runc.delete(name, true);
      const old = await this.readRecord(name);
      const rec: ContainerRecord = {
        version: 1,
        spec,
        lowerDir: opts.lowerDir,
        netnsPath: opts.netnsPath,
        imageDigest: opts.imageDigest ?? old?.imageDigest ?? "",
        createdAt: old?.createdAt ?? new Date().toISOString(),
        checkpointId: path.basename(opts.checkpointDir),
        checkpointed: true,
        exitCode: -1,
      };
      await this.prepareBundle(rec);
      await this.writeRecord(rec);
      const workDir = path.join(opts.checkpointDir, `restore-${Date.now()}`);
      await mkdir(workDir, { recursive: true });
      const runcStarted = performance.now();
      try {
        await this.runc.restore(name, {
          bundle: this.bundle(name),
          pidFile: path.join(this.dir(name), "container.pid"),
          logFile: this.logPath(name),
          runcLogFile: path.join(this.dir(name), "runc.log"),
          imagePath: imagesDir,
          workPath: workDir,
          tcpEstablished: opts.tcpEstablished,
          // CRIU's network unlock (Ferry's action script) only opens the lock; removed below.
          env: { FERRY_UNLOCK: "open" },
        });
      } catch (e) {
        this.log.error({ container: name, criuLog: path.join(workDir, "restore.log") }, "restore failed");
        throw this.runcFailure(e, `restore container "${name}"`, path.join(workDir, "restore.log"));
      }
      const runcMs = Math.round(performance.now() - runcStarted);
      const after = await this.runc.state(name);
      // runc reads "running" only while its init process lives
      if (after?.status !== "running") {
        const pid = await readPidFile(path.join(this.dir(name), "container.pid")).catch(() => 0);
        throw new FerryError("Internal", `container "${name}" is ${after?.status ?? "unknown"} right after restore (pid ${pid})`, {
          data: { criuLog: path.join(workDir, "restore.log") },
          fix: `read ${path.join(workDir, "restore.log")} and the container log ${this.logPath(name)}`,
        });
      }
      // runc's pid of a running container is its init's, the one runc wrote to the pid file
      const { pid } = after;
      rec.checkpointed = false;
      await this.writeRecord(rec);
      const rs = (await this.criu.readStats(workDir, "restore")) ?? (await this.criu.readStats(imagesDir, "restore"));
      const stats = {
        restoreMs: usToMs(rs?.restore?.restoreTimeUs),
        forkingMs: usToMs(rs?.restore?.forkingTimeUs),
        runcMs,
        totalMs: Math.round(performance.now() - started),
        ...(rs?.restore ? { raw: rs.restore } : {}),
      };
      this.log.info({ container: name, pid, totalMs: stats.totalMs }, "container restored");
      answer({ pid, stats, container: this.info(rec, after), criuLog: path.join(workDir, "restore.log") });
      await unlockNetns(opts.netnsPath).catch((e: unknown) =>
        this.log.warn({ err: e, container: name }, "the restored container's network lock is open but not removed"),
      );
    });
    return Promise.race([answered, locked.then(() => answered)]);
  }

  /** Resolves once what a restore left to do after its answer (removing the opened network lock) is done. */
  async settled(name: string): Promise<void> {
    await this.locks.run(name, () => Promise.resolve());
  }

  /**
   * Freeze the container's cgroup and wait until it is frozen, polling every millisecond. CRIU
   * freezes it itself, but reads the state back once and, still FREEZING, sleeps 100 ms before
   * the next read; a cgroup found FROZEN is dumped at once. Without a v1 freezer (or if it does
   * not settle in 1 s) CRIU is left to freeze as before; a later `thaw` is harmless either way.
   */
  private async freeze(name: string): Promise<void> {
    const state = this.freezerState(name);
    try {
      await writeFile(state, "FROZEN");
    } catch {
      return;
    }
    const end = performance.now() + 1000;
    while (performance.now() < end) {
      if ((await readFile(state, "utf8")).trim() === "FROZEN") return;
      await new Promise((r) => setTimeout(r, 1));
    }
    await this.thaw(name);
  }

  private freezerState(name: string): string {
    return path.join("/sys/fs/cgroup/freezer", this.cgroupsPath(name), "freezer.state");
  }

  private async thaw(name: string): Promise<void> {
    await writeFile(this.freezerState(name), "THAWED").catch(() => undefined);
  }

  /** Remove a checkpoint held here. */
  async deleteCheckpoint(id: string): Promise<void> {
    const dir = this.checkpointDir(id);
    if (!(await exists(dir))) throw FerryError.notFound("checkpoint", id);
    await rm(dir, { recursive: true, force: true });
  }

  /**
   * A CRIU page server receiving a checkpoint's pages into checkpoints/<id>/images; port 0 picks
   * a free port. The server exits by itself after one dump.
   */
  async startPageServer(id: string, opts: { address: string; port: number }): Promise<{ address: string; port: number; pid: number }> {
    const dir = this.checkpointDir(id);
    await mkdir(path.join(dir, "images"), { recursive: true });
    const h = await this.criu.startPageServer({
      address: opts.address,
      port: opts.port,
      imagesDir: path.join(dir, "images"),
      pidFile: path.join(dir, "page-server.pid"),
    });
    return { address: h.address, port: h.port, pid: h.pid };
  }

  async stopPageServer(id: string): Promise<void> {
    const pidFile = path.join(this.checkpointDir(id), "page-server.pid");
    const pid = Number((await readFile(pidFile, "utf8").catch(() => "")).trim());
    if (pid > 0) await this.criu.stopPageServer({ pid, pidFile });
  }

  // ---- packing for cross-host restore -----------------------------------------------------------

  /** Tar the container's upper dir (with overlay whiteouts and xattrs) into stateDir/exports/. */
  async packUpper(name: string): Promise<string> {
    validateName("name", name);
    return this.locks.run(name, async () => {
      await this.mustRecord(name);
      const st = await this.runc.state(name);
      if (st && st.status !== "stopped") {
        throw new FerryError("FailedPrecondition", `container "${name}" is ${st.status}: its upper dir is still changing`, {
          fix: "checkpoint or stop it first",
        });
      }
      return this.tarDir(this.upperDir(name), `${name}-upper`);
    });
  }

  /** Replace the container's upper dir with a tar from {@link packUpper} (before a restore). */
  async unpackUpper(name: string, tarPath: string): Promise<void> {
    validateName("name", name);
    await this.locks.run(name, async () => {
      if (await this.isMounted(this.rootfs(name))) {
        throw new FerryError("FailedPrecondition", `container "${name}" has its root filesystem mounted here`, {
          fix: "unpack the upper dir only on a host where the container does not exist yet",
        });
      }
      const upper = this.upperDir(name);
      await rm(upper, { recursive: true, force: true });
      await mkdir(upper, { recursive: true });
      await this.untar(tarPath, upper);
    });
  }

  /** Tar a checkpoint dir into stateDir/exports/. */
  async packCheckpoint(id: string): Promise<string> {
    const dir = this.checkpointDir(id);
    if (!(await exists(dir))) throw FerryError.notFound("checkpoint", id);
    return this.tarDir(dir, `${id}-checkpoint`);
  }

  /**
   * Unpack a checkpoint tar over checkpoints/<id>, which a page server has filled with the memory
   * pages: the tar holds the rest of the dump (the source's images without pages). Returns its dir.
   */
  async mergeCheckpoint(id: string, tarPath: string): Promise<string> {
    const dir = this.checkpointDir(id);
    if (!(await exists(path.join(dir, "images")))) {
      throw FerryError.notFound("checkpoint", id, "start a page server for it (StartPageServer) and dump to it first");
    }
    await this.untar(tarPath, dir);
    return dir;
  }

  /** Unpack a checkpoint tar as checkpoints/<id>; returns its dir. */
  async unpackCheckpoint(id: string, tarPath: string): Promise<string> {
    const dir = this.checkpointDir(id);
    if (await exists(dir)) throw new FerryError("AlreadyExists", `checkpoint "${id}" already exists here`, { fix: "delete it first" });
    await mkdir(dir, { recursive: true });
    try {
      await this.untar(tarPath, dir);
    } catch (e) {
      await rm(dir, { recursive: true, force: true });
      throw e;
    }
    return dir;
  }

  // ---- internals --------------------------------------------------------------------------------

  private async checkPlacement(p: ContainerPlacement): Promise<void> {
    if (!path.isAbsolute(p.lowerDir) || !SAFE_PATH.test(p.lowerDir)) {
      throw FerryError.invalid(
        "lowerDir",
        `"${p.lowerDir}" must be an absolute path without ',', ':' or spaces`,
        "pass the image store's unpacked root filesystem",
      );
    }
    if (!(await isDir(p.lowerDir))) {
      throw new FerryError("FailedPrecondition", `image root filesystem ${p.lowerDir} does not exist`, {
        field: "lowerDir",
        fix: "pull and unpack the image first",
      });
    }
    if (!path.isAbsolute(p.netnsPath) || !(await exists(p.netnsPath))) {
      throw new FerryError("FailedPrecondition", `network namespace ${p.netnsPath} does not exist`, {
        field: "netnsPath",
        fix: "create it first (CreateNetns)",
      });
    }
  }

  /** Dirs, overlay mount (idempotent) and config.json. */
  private async prepareBundle(rec: ContainerRecord): Promise<void> {
    const name = rec.spec.name;
    for (const d of [this.upperDir(name), path.join(this.dir(name), "work"), this.rootfs(name)]) await mkdir(d, { recursive: true });
    const rootfs = this.rootfs(name);
    if (!(await this.isMounted(rootfs))) {
      const o = `lowerdir=${rec.lowerDir},upperdir=${this.upperDir(name)},workdir=${path.join(this.dir(name), "work")}`;
      await exec("mount", ["-t", "overlay", `ferry-${name}`, "-o", o, rootfs], { timeoutMs: 30_000 }).catch((e: unknown) => {
        throw new FerryError("Internal", `cannot mount the overlay of "${name}": ${e instanceof Error ? e.message : String(e)}`, {
          cause: e,
        });
      });
    }
    await this.writeCriuConfig();
    const config = buildOciConfig(rec.spec, { netnsPath: rec.netnsPath, cgroupsPath: this.cgroupsPath(name), criuConfig: this.criuConfig });
    await writeFile(path.join(this.bundle(name), "config.json"), JSON.stringify(config, null, 2));
  }

  /**
   * The CRIU configuration every container's bundle names (runc hands it to CRIU on checkpoint and
   * restore): CRIU's network lock is Ferry's script (net/lock.ts), which CRIU runs where it would
   * lock and unlock. Written once per process, before the first bundle that names it.
   */
  private writeCriuConfig(): Promise<void> {
    const script = path.join(this.stateDir, "criu-network.sh");
    this.criuConfigWritten ??= (async () => {
      await mkdir(this.stateDir, { recursive: true });
      // write-then-rename: a CRIU of another agent process may be reading them
      const put = async (p: string, text: string, mode: number): Promise<void> => {
        await writeFile(`${p}.tmp`, text, { mode });
        await rename(`${p}.tmp`, p);
      };
      await put(script, CRIU_NETWORK_SCRIPT, 0o755);
      await put(
        this.criuConfig,
        "# Written by ferry-agent; runc passes it to CRIU (the org.criu.config annotation of every container).\n" +
          `network-lock skip\naction-script ${script}\n`,
        0o644,
      );
    })().catch((e: unknown) => {
      this.criuConfigWritten = undefined;
      throw e;
    });
    return this.criuConfigWritten;
  }

  private async launch(rec: ContainerRecord, how: "create"): Promise<void> {
    const name = rec.spec.name;
    await this.runc[how](name, {
      bundle: this.bundle(name),
      pidFile: path.join(this.dir(name), "container.pid"),
      logFile: this.logPath(name),
      runcLogFile: path.join(this.dir(name), "runc.log"),
    });
  }

  private async unmountRootfs(name: string): Promise<void> {
    const rootfs = this.rootfs(name);
    for (let i = 0; i < 20 && (await this.isMounted(rootfs)); i++) {
      try {
        await exec("umount", [rootfs], { timeoutMs: 10_000 });
      } catch (e) {
        // EBUSY right after a kill: the last process may still be exiting
        if (i === 19) throw new FerryError("Internal", `cannot unmount ${rootfs}: ${(e as Error).message}`, { cause: e });
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  private async isMounted(dir: string): Promise<boolean> {
    const info = await readFile("/proc/self/mountinfo", "utf8");
    return info.split("\n").some((l) => unescapeMount(l.split(" ")[4] ?? "") === dir);
  }

  private async waitStopped(name: string, timeoutMs: number): Promise<boolean> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      const st = await this.runc.state(name);
      if (!st || st.status === "stopped") return true;
      if (Date.now() >= end) return false;
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  private async recordNames(): Promise<string[]> {
    const entries = await readdir(path.join(this.stateDir, "containers")).catch(() => [] as string[]);
    return entries.filter((n) => /^[a-z0-9][a-z0-9-]{0,30}$/.test(n)).sort();
  }

  private info(rec: ContainerRecord, st?: RuncState): ContainerInfo {
    let state: ContainerState;
    if (!st) state = rec.checkpointed ? ContainerState.CONTAINER_STATE_CHECKPOINTED : ContainerState.CONTAINER_STATE_STOPPED;
    else if (st.status === "created") state = ContainerState.CONTAINER_STATE_CREATED;
    else if (st.status === "running") state = ContainerState.CONTAINER_STATE_RUNNING;
    else if (st.status === "paused") state = ContainerState.CONTAINER_STATE_PAUSED;
    else state = ContainerState.CONTAINER_STATE_STOPPED;
    const running = state === ContainerState.CONTAINER_STATE_RUNNING || state === ContainerState.CONTAINER_STATE_PAUSED;
    return {
      spec: rec.spec,
      state,
      pid: running || state === ContainerState.CONTAINER_STATE_CREATED ? (st?.pid ?? 0) : 0,
      imageDigest: rec.imageDigest,
      createdAt: new Date(rec.createdAt),
      checkpointId: rec.checkpointId,
      exitCode: state === ContainerState.CONTAINER_STATE_STOPPED ? rec.exitCode : 0,
    };
  }

  private async tarDir(dir: string, base: string): Promise<string> {
    const outDir = path.join(this.stateDir, "exports");
    await mkdir(outDir, { recursive: true });
    const out = path.join(outDir, `${base}-${Date.now()}-${randomBytes(2).toString("hex")}.tar`);
    // overlay whiteouts are 0/0 char devices and opaque dirs carry trusted.overlay.* xattrs
    await exec("tar", ["--xattrs", "--xattrs-include=trusted.overlay.*", "--numeric-owner", "-C", dir, "-cf", out, "."], {
      timeoutMs: 600_000,
    });
    return out;
  }

  private async untar(tarPath: string, dir: string): Promise<void> {
    if (!path.isAbsolute(tarPath)) throw FerryError.invalid("tarPath", `"${tarPath}" is not absolute`, "pass an absolute path");
    await exec("tar", ["--xattrs", "--xattrs-include=trusted.overlay.*", "--numeric-owner", "-p", "-C", dir, "-xf", tarPath], {
      timeoutMs: 600_000,
    });
  }

  /** runc/CRIU failures as FerryError: the stderr tail and where CRIU's log is. */
  private runcFailure(e: unknown, what: string, logPath?: string, extra: Record<string, unknown> = {}): FerryError {
    if (e instanceof FerryError) return e;
    const stderr = e instanceof ExecError ? e.stderr.trim().split("\n").slice(-8).join(" | ") : e instanceof Error ? e.message : String(e);
    const code = e instanceof ExecError && e.reason === "timeout" ? "DeadlineExceeded" : "Internal";
    return new FerryError(code, `${what} failed: ${stderr}${logPath ? ` (log: ${logPath})` : ""}`, {
      cause: e,
      data: { stderr, ...(logPath ? { log: logPath } : {}), ...extra },
      ...(logPath ? { fix: `read ${logPath}` } : {}),
    });
  }
}

// ---- small helpers ----------------------------------------------------------------------------

function usToMs(us: number | undefined): number {
  return us ? Math.round(us / 1000) : 0;
}

async function exists(p: string): Promise<boolean> {
  try {
    await access(p, constants.F_OK);
    return true;
  } catch {
    return false;
  }
}

async function isDir(p: string): Promise<boolean> {
  return (await stat(p).catch(() => undefined))?.isDirectory() ?? false;
}

async function firstReadable(paths: string[]): Promise<string | undefined> {
  for (const p of paths) if (await exists(p)) return p;
  return undefined;
}

/** Bytes of regular files under `dir` (apparent size), 0 when absent. */
async function dirBytes(dir: string): Promise<number> {
  let total = 0;
  const entries = await readdir(dir, { withFileTypes: true }).catch(() => []);
  for (const e of entries) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) total += await dirBytes(p);
    else if (e.isFile()) total += (await lstat(p).catch(() => undefined))?.size ?? 0;
  }
  return total;
}

function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}
