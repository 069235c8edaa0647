// Holding what reaches a locked namespace until the container there runs: the agent's side of
// ferry-hold (../../native/ferry-hold.c, built by `npm run build` into dist/).
//
// The network lock (./lock.ts) queues packets from elsewhere to NFQUEUE 0xC114 instead of
// dropping them. A destination's namespace is created locked; the agent binds its queue at once,
// so that the segments a client sends or retransmits during the downtime, once the path leads
// there, wait in the kernel instead of being lost. The restore releases them the moment the
// container runs: the client's retransmission is answered at once, instead of at its next
// backed-off timer (200, 400, 800 ms... after the last). A namespace cleared (a rollback)
// drops them. Anything that goes wrong here leaves the lock as it was before: packets dropped.
import { spawn, type ChildProcessByStdio } from "node:child_process";
import { once } from "node:events";
import type { Socket } from "node:net";
import type { Readable, Writable } from "node:stream";
import { fileURLToPath } from "node:url";

export const HOLD_HELPER = fileURLToPath(new URL("../../dist/ferry-hold", import.meta.url));

/** What {@link NetNs} needs of the holds; keys are namespace names. */
export interface PacketHoldApi {
  /** Bind the namespace's queue; false (said in the log) when it cannot be. */
  hold(key: string, netnsPath: string): Promise<boolean>;
  /** Hand what was held to the namespace and stop holding: how many packets. */
  release(key: string): Promise<number>;
  /** Stop holding; the kernel drops what was held. */
  drop(key: string): Promise<void>;
}

type Warn = (msg: string, fields: Record<string, unknown>) => void;

/** One ferry-hold process for the agent, started with the first hold; it exits with the agent. */
export class PacketHolds implements PacketHoldApi {
  /** The helper, and who waits for its answers: one line per command, in order. */
  private helper: { proc: ChildProcessByStdio<Writable, Readable, null>; waiting: Array<(line: string) => void> } | undefined;
  /**
   * The namespaces held now. Releasing or dropping any other (a source's namespace, one created
   * unlocked) asks nothing of the helper: no round trip inside the downtime, no helper started.
   */
  private readonly held = new Set<string>();

  constructor(
    private readonly warn: Warn,
    private readonly binary = HOLD_HELPER,
  ) {}

  async hold(key: string, netnsPath: string): Promise<boolean> {
    if (this.held.has(key)) return true; // a lock() of a namespace created locked: nothing to ask
    const a = await this.command(`hold ${key} ${netnsPath}`);
    if (a.startsWith("ok ")) {
      this.held.add(key);
      return true;
    }
    this.warn("packets reaching a locked namespace will be dropped, not held", { namespace: key, error: a });
    return false;
  }

  async release(key: string): Promise<number> {
    if (!this.held.delete(key)) return 0;
    const a = await this.command(`release ${key}`);
    if (a.startsWith("ok ")) return Number(a.split(" ")[2] ?? 0);
    this.warn("held packets not released", { namespace: key, error: a });
    return 0;
  }

  async drop(key: string): Promise<void> {
    if (this.held.delete(key)) await this.command(`drop ${key}`);
  }

  /** End the helper (its sockets close with it: the kernel drops what they held); resolves once it has exited. */
  close(): Promise<void> {
    const proc = this.helper?.proc;
    this.helper = undefined;
    this.held.clear();
    if (!proc) return Promise.resolve();
    const exited = proc.exitCode !== null || proc.signalCode !== null ? Promise.resolve() : once(proc, "exit").then(() => undefined);
    proc.stdin.end();
    return exited;
  }

  /** One command's answer line; "error ..." when the helper cannot be run or dies meanwhile. */
  private command(line: string): Promise<string> {
    if (!/^[a-z]+ [A-Za-z0-9_.-]+( \/[^\s]*)?$/.test(line)) return Promise.resolve(`error malformed command: ${line}`);
    const { proc, waiting } = this.start();
    const answers = proc.stdout as unknown as Socket;
    return new Promise((resolve) => {
      // The answer pipe keeps this process alive only while a command waits for its answer.
      if (waiting.length === 0) answers.ref();
      waiting.push((l) => {
        if (waiting.length === 0) answers.unref();
        resolve(l);
      });
      proc.stdin.write(`${line}\n`);
    });
  }

  private start(): NonNullable<PacketHolds["helper"]> {
    if (this.helper) return this.helper;
    const proc = spawn(this.binary, [], { stdio: ["pipe", "pipe", "inherit"] });
    const h = { proc, waiting: [] as Array<(line: string) => void> };
    // Never keeps the agent alive; its stdin closes with the agent, and it exits.
    proc.unref();
    (proc.stdin as unknown as Socket).unref();
    (proc.stdout as unknown as Socket).unref();
    let buf = "";
    proc.stdout.setEncoding("utf8").on("data", (d: string) => {
      buf += d;
      let nl: number;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const l = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        h.waiting.shift()?.(l);
      }
    });
    proc.stdin.on("error", () => {
      /* a dead helper: "exit" answers what was waiting */
    });
    const gone = (why: string): void => {
      if (this.helper === h) {
        this.helper = undefined;
        this.held.clear(); // its sockets closed with it: the kernel dropped what they held
      }
      for (const w of h.waiting.splice(0)) w(`error ferry-hold ${why}`);
    };
    proc.on("error", (e) => gone(`could not start: ${e.message}`));
    proc.on("exit", (code, sig) => gone(`exited (${sig ?? `code ${code}`})`));
    this.helper = h;
    return h;
  }
}
