import { access, readdir, readFile } from "node:fs/promises";
import path from "node:path";
import { exec, ExecError, FerryError, isRunning, type Logger, silentLogger } from "@ferry/common";

/** `runc state` / `runc list` of one container. */
export interface RuncState {
  id: string;
  pid: number;
  /** "created" | "running" | "paused" | "stopped" */
  status: string;
  bundle: string;
  created: string;
}

/** Where a detached container's stdio go and where runc leaves its pid. */
export interface LaunchOptions {
  bundle: string;
  pidFile: string;
  /** Container stdout and stderr are appended here by the stdio relay. */
  logFile: string;
  /** runc's own log (--log): its error messages, which would otherwise go to the container's stdio. */
  runcLogFile: string;
  /** Added to runc's environment, which CRIU and its action scripts inherit. */
  env?: Record<string, string>;
}

export interface CheckpointOptions {
  imagePath: string;
  workPath: string;
  tcpEstablished: boolean;
  leaveRunning: boolean;
  /** "address:port" of a CRIU page server receiving the memory pages. */
  pageServer?: string;
}

export interface RestoreOptions extends LaunchOptions {
  imagePath: string;
  workPath: string;
  tcpEstablished: boolean;
}

/** The runc operations Ferry needs; a fake of this runs the core logic in unit tests. */
export interface RuncApi {
  /** The per-agent state dir given as `runc --root`. */
  readonly root: string;
  version(): Promise<string>;
  run(id: string, opts: LaunchOptions): Promise<void>;
  create(id: string, opts: LaunchOptions): Promise<void>;
  start(id: string): Promise<void>;
  /** undefined when runc does not know the container. */
  state(id: string): Promise<RuncState | undefined>;
  list(): Promise<RuncState[]>;
  kill(id: string, signal: string, all?: boolean): Promise<void>;
  delete(id: string, force: boolean): Promise<void>;
  checkpoint(id: string, opts: CheckpointOptions): Promise<void>;
  restore(id: string, opts: RestoreOptions): Promise<void>;
}

export interface RuncOptions {
  /** The runc binary (default "runc" on PATH). */
  binary?: string;
  /** `--root`: several agents share this machine, each keeps its own runc state. */
  root: string;
  /** `--criu`: the CRIU binary runc drives (default "criu" on PATH). */
  criuPath?: string;
  /**
   * A directory put first on runc's PATH, which CRIU inherits: programs CRIU runs by name there
   * come from it (deploy/host/criu-tar.c as `tar`). None by default.
   */
  criuTools?: string;
  log?: Logger;
  /** Per-call timeout (default 120 s). */
  timeoutMs?: number;
}

/**
 * Launches `runc run|create|restore -d` with anonymous pipes as the container's stdio, owned by a
 * relay that outlives both runc and the agent:
 *
 *   setsid bash -c LAUNCH   (own session: an agent restart or a kill of its process group spares it)
 *     coproc RELAY { exec cat 3>&1 >>LOG 2>/dev/null; }
 *        RELAY stdin  = pipe A (read end)  <- container fd 1 and fd 2 (write end)
 *        RELAY fd 3   = pipe B (write end) -> container fd 0 (read end): held, never written,
 *                       so the container never sees EOF on stdin while its relay lives
 *     runc ... <&B.r >&A.w 2>&A.w         (-d: runc hands its own stdio to the container)
 *
 * One `cat` per container, and it cleans itself up: when the container exits (or is dumped), the
 * last writer of A goes away, cat reads EOF, exits, and so closes B. Anonymous pipes (not files,
 * not FIFOs, not Node's socketpairs) are what CRIU can dump; at restore runc maps the dumped
 * pipes onto its own stdio with --inherit-fd. runc's own messages go to --log (a file), since its
 * stderr is the container's pipe; on failure the launcher prints that log's tail to stderr.
 */
const LAUNCH = `
set -u
log=$1; runclog=$2; shift 2
: >"$runclog"
coproc RELAY { exec cat 3>&1 >>"$log" 2>/dev/null; }
"$@" <&"\${RELAY[0]}" >&"\${RELAY[1]}" 2>&"\${RELAY[1]}"
rc=$?
if [ $rc -ne 0 ]; then tail -c 4000 "$runclog" >&2; fi
exit $rc
`;

/** The runc CLI, with a per-agent --root and an explicit CRIU path. */
export class Runc implements RuncApi {
  readonly root: string;
  private readonly binary: string;
  private readonly criuPath: string;
  /** The environment of every runc process: PATH with {@link RuncOptions.criuTools} first. */
  private readonly env: NodeJS.ProcessEnv;
  private readonly log: Logger;
  private readonly timeoutMs: number;

  constructor(opts: RuncOptions) {
    this.root = opts.root;
    this.binary = opts.binary ?? "runc";
    this.criuPath = opts.criuPath ?? "criu";
    this.env = opts.criuTools
      ? { ...process.env, PATH: `${opts.criuTools}:${process.env.PATH ?? "/usr/sbin:/usr/bin:/sbin:/bin"}` }
      : process.env;
    this.log = opts.log ?? silentLogger;
    this.timeoutMs = opts.timeoutMs ?? 120_000;
  }

  private global(): string[] {
    return ["--root", this.root, "--criu", this.criuPath];
  }

  private async runc(args: string[], okCodes?: number[]): Promise<{ stdout: string; stderr: string; exitCode: number }> {
    const all = [...this.global(), ...args];
    this.log.debug({ args: all }, "runc");
    return exec(this.binary, all, { timeoutMs: this.timeoutMs, env: this.env, ...(okCodes ? { okCodes } : {}) });
  }

  /** Detached launch with the stdio relay (see LAUNCH). */
  private async launch(args: string[], opts: LaunchOptions): Promise<void> {
    const all = ["--log", opts.runcLogFile, ...this.global(), ...args];
    this.log.debug({ args: all }, "runc launch");
    await exec("setsid", ["bash", "-c", LAUNCH, "ferry-launch", opts.logFile, opts.runcLogFile, this.binary, ...all], {
      timeoutMs: this.timeoutMs,
      env: opts.env ? { ...this.env, ...opts.env } : this.env,
    });
  }

  async version(): Promise<string> {
    const { stdout } = await this.runc(["--version"]);
    const m = /runc version (\S+)/.exec(stdout);
    return m ? `runc ${m[1]}` : stdout.split("\n")[0]!.trim();
  }

  async run(id: string, opts: LaunchOptions): Promise<void> {
    await this.launch(["run", "-d", "--bundle", opts.bundle, "--pid-file", opts.pidFile, id], opts);
  }

  async create(id: string, opts: LaunchOptions): Promise<void> {
    await this.launch(["create", "--bundle", opts.bundle, "--pid-file", opts.pidFile, id], opts);
  }

  async start(id: string): Promise<void> {
    await this.runc(["start", id]);
  }

  /**
   * What `runc state` prints, read from runc's own state file as runc does (see {@link readRuncState}):
   * an agent asks before and after most operations and every second for its metrics, and a `runc`
   * process costs ~5 ms of CPU each time. A state file this code does not understand goes to runc.
   */
  async state(id: string): Promise<RuncState | undefined> {
    const st = await readRuncState(this.root, id);
    return st === "unknown" ? this.stateFromRunc(id) : st;
  }

  async list(): Promise<RuncState[]> {
    const ids = await readdir(this.root).catch((e: NodeJS.ErrnoException) => {
      if (e.code === "ENOENT") return [];
      throw e;
    });
    // as `runc list` does, a container whose state cannot be read is left out, not an error
    const states = await Promise.all(ids.map((id) => this.state(id).catch(() => undefined)));
    return states.filter((s): s is RuncState => s !== undefined).sort((a, b) => a.id.localeCompare(b.id));
  }

  private async stateFromRunc(id: string): Promise<RuncState | undefined> {
    try {
      const { stdout } = await this.runc(["state", id]);
      return JSON.parse(stdout) as RuncState;
    } catch (e) {
      if (e instanceof ExecError && /does not exist|not exist|container .* not found/i.test(e.stderr)) return undefined;
      throw e;
    }
  }

  async kill(id: string, signal: string, all = false): Promise<void> {
    await this.runc(["kill", ...(all ? ["--all"] : []), id, signal]);
  }

  async delete(id: string, force: boolean): Promise<void> {
    await this.runc(["delete", ...(force ? ["--force"] : []), id]);
  }

  async checkpoint(id: string, opts: CheckpointOptions): Promise<void> {
    const args = ["checkpoint", "--image-path", opts.imagePath, "--work-path", opts.workPath];
    if (opts.tcpEstablished) args.push("--tcp-established");
    if (opts.leaveRunning) args.push("--leave-running");
    if (opts.pageServer) args.push("--page-server", opts.pageServer);
    args.push(id);
    await this.runc(args);
  }

  async restore(id: string, opts: RestoreOptions): Promise<void> {
    const args = ["restore", "-d", "--image-path", opts.imagePath, "--work-path", opts.workPath];
    if (opts.tcpEstablished) args.push("--tcp-established");
    args.push("--bundle", opts.bundle, "--pid-file", opts.pidFile, id);
    await this.launch(args, opts);
  }
}

/** The PID runc wrote, or a FerryError naming the file. */
export async function readPidFile(path: string): Promise<number> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (e) {
    throw new FerryError("Internal", `runc left no pid file at ${path}`, { cause: e });
  }
  const pid = Number(text.trim());
  if (!Number.isInteger(pid) || pid <= 0) throw new FerryError("Internal", `pid file ${path} holds "${text.trim()}", not a pid`);
  return pid;
}

/** The part of runc 1.1's `<root>/<id>/state.json` (libcontainer's State) that `runc state` reads. */
interface RuncStateFile {
  id: string;
  init_process_pid: number;
  /** The init process's start time (field 22 of /proc/<pid>/stat): a reused pid has another. */
  init_process_start: number;
  created: string;
  config: { labels?: string[] };
  cgroup_paths?: Record<string, string>;
}

/**
 * A container's state as runc 1.1's `runc state` computes it (libcontainer refreshState):
 * paused if its freezer cgroup is frozen; stopped if its init process is gone (or the pid now
 * belongs to another process, or is a zombie); created while runc's exec.fifo exists (between
 * `create` and `start`); running otherwise. A stopped container's pid reads 0, as runc prints it.
 * undefined when runc has no such container; "unknown" when the file is not in the shape expected.
 */
export async function readRuncState(root: string, id: string): Promise<RuncState | undefined | "unknown"> {
  const dir = path.join(root, id);
  let f: RuncStateFile;
  try {
    f = JSON.parse(await readFile(path.join(dir, "state.json"), "utf8")) as RuncStateFile;
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    return code === "ENOENT" || code === "ENOTDIR" ? undefined : "unknown";
  }
  const bundle = f.config?.labels?.find((l) => l.startsWith("bundle="))?.slice("bundle=".length);
  if (f.id !== id || !Number.isInteger(f.init_process_pid) || !Number.isInteger(f.init_process_start) || bundle === undefined) {
    return "unknown";
  }
  const base = { id, bundle, created: f.created };
  if (await isFrozen(f.cgroup_paths ?? {})) return { ...base, pid: f.init_process_pid, status: "paused" };
  if (!isRunning(f.init_process_pid, f.init_process_start)) return { ...base, pid: 0, status: "stopped" };
  const created = await access(path.join(dir, "exec.fifo")).then(
    () => true,
    () => false,
  );
  return { ...base, pid: f.init_process_pid, status: created ? "created" : "running" };
}

/** cgroup v1: freezer.state FROZEN, by the cgroup itself (not an ancestor); v2: cgroup.freeze 1. FREEZING is not yet paused. */
async function isFrozen(cgroupPaths: Record<string, string>): Promise<boolean> {
  const read = (p: string): Promise<string> =>
    readFile(p, "utf8").then(
      (s) => s.trim(),
      () => "",
    );
  if (cgroupPaths.freezer) {
    return (
      (await read(path.join(cgroupPaths.freezer, "freezer.state"))) === "FROZEN" &&
      (await read(path.join(cgroupPaths.freezer, "freezer.self_freezing"))) !== "0"
    );
  }
  const unified = cgroupPaths[""];
  return unified ? (await read(path.join(unified, "cgroup.freeze"))) === "1" : false;
}
