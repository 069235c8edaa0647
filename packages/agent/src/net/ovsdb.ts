// A client of ovsdb-server's JSON-RPC protocol (RFC 7047), for the few Open_vSwitch database
// operations a migration makes: add a port, delete a port, read an OpenFlow port number.
// ovs-vsctl does each of these as a new process that loads the OVS libraries and fetches the
// whole database first: ~5 ms of CPU per call, four calls per migration. One long-lived
// connection asks for just the rows it needs.
import { createConnection, type Socket } from "node:net";
import { StringDecoder } from "node:string_decoder";
import { FerryError } from "@ferry/common";

/** An OVSDB value as the protocol writes it: an atom, ["uuid", s], ["set", [...]] or ["map", [[k, v], ...]]. */
export type OvsdbValue = string | number | boolean | [string, unknown];
export type OvsdbRow = Record<string, OvsdbValue>;
/** One operation of a "transact" (RFC 7047 section 5.2). */
export type OvsdbOp = Record<string, unknown> & { op: string; table?: string };
/** What one operation returned: rows for "select", a count for "update"/"mutate", a uuid for "insert". */
export interface OvsdbResult {
  rows?: OvsdbRow[];
  count?: number;
  uuid?: [string, string];
  error?: string;
  details?: string;
}

const DATABASE = "Open_vSwitch";

interface Pending {
  resolve(r: unknown): void;
  reject(e: Error): void;
  timer: NodeJS.Timeout;
}

/**
 * Splits a byte stream into the JSON texts ovsdb-server writes back to back (no delimiter between
 * them): counts brackets outside strings.
 */
export class JsonStream {
  private buf = "";
  private depth = 0;
  private inString = false;
  private escaped = false;
  private start = 0;
  private scanned = 0;
  private readonly decoder = new StringDecoder("utf8");

  /** Feed bytes; returns the complete texts, parsed. */
  push(chunk: Buffer): unknown[] {
    this.buf += this.decoder.write(chunk);
    const out: unknown[] = [];
    for (let i = this.scanned; i < this.buf.length; i++) {
      const c = this.buf.charCodeAt(i);
      if (this.inString) {
        if (this.escaped) this.escaped = false;
        else if (c === 0x5c /* \ */) this.escaped = true;
        else if (c === 0x22 /* " */) this.inString = false;
        continue;
      }
      if (c === 0x22) this.inString = true;
      else if (c === 0x7b /* { */ || c === 0x5b /* [ */) {
        if (this.depth++ === 0) this.start = i;
      } else if (c === 0x7d /* } */ || c === 0x5d /* ] */) {
        if (--this.depth === 0) out.push(JSON.parse(this.buf.slice(this.start, i + 1)));
        else if (this.depth < 0) throw new Error("unbalanced JSON from ovsdb-server");
      }
    }
    if (this.depth === 0) {
      this.buf = "";
      this.scanned = 0;
    } else {
      this.buf = this.buf.slice(this.start);
      this.scanned = this.buf.length;
      this.start = 0;
    }
    return out;
  }
}

/**
 * One connection to an ovsdb-server unix socket, opened on first use and again after it drops.
 * Answers the server's inactivity probes ("echo"). Every request has a time limit.
 */
export class OvsdbClient {
  private socket: Socket | undefined;
  private connecting: Promise<Socket> | undefined;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;

  constructor(
    private readonly path: string,
    private readonly timeoutMs = 10_000,
  ) {}

  /** Run `ops` as one transaction. A failed operation rejects with its error and details. */
  async transact(ops: readonly OvsdbOp[]): Promise<OvsdbResult[]> {
    const results = (await this.request("transact", [DATABASE, ...ops])) as Array<OvsdbResult | null>;
    // RFC 7047 5.2: a failed operation's result has "error"; the ones after it may be null.
    // A result beyond the operations (a "commit" failure) is an error too.
    const failed = results.find((r) => r?.error);
    if (failed) {
      const i = results.indexOf(failed);
      const what = i < ops.length ? `operation ${i} (${ops[i]!.op} ${ops[i]!.table ?? ""})` : "commit";
      throw new OvsdbError(`${what}: ${failed.error}${failed.details ? `: ${failed.details}` : ""}`, failed.error!);
    }
    return results.slice(0, ops.length).map((r) => r ?? {});
  }

  close(): void {
    this.socket?.destroy();
    this.socket = undefined;
  }

  private async request(method: string, params: unknown[]): Promise<unknown> {
    const socket = await this.connect();
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        if (this.pending.size === 0) socket.unref();
        reject(
          new FerryError("Unavailable", `ovsdb-server at ${this.path} did not answer "${method}" within ${this.timeoutMs} ms`, {
            fix: "check that ovsdb-server is running and not overloaded",
          }),
        );
      }, this.timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      socket.ref();
      socket.write(JSON.stringify({ id, method, params }));
    });
  }

  private connect(): Promise<Socket> {
    if (this.socket && !this.socket.destroyed) return Promise.resolve(this.socket);
    this.connecting ??= new Promise<Socket>((resolve, reject) => {
      const s = createConnection(this.path);
      const stream = new JsonStream();
      const unavailable = (e: Error) =>
        new FerryError("Unavailable", `Open vSwitch database is not reachable at ${this.path}: ${e.message}`, {
          fix: `start ovsdb-server with --remote=punix:${this.path}`,
          cause: e,
        });
      s.once("connect", () => {
        this.socket = s;
        this.connecting = undefined;
        s.unref(); // an idle connection keeps no process alive
        resolve(s);
      });
      s.on("data", (chunk: Buffer) => {
        let msgs: unknown[];
        try {
          msgs = stream.push(chunk);
        } catch (e) {
          s.destroy(e as Error);
          return;
        }
        for (const m of msgs) this.onMessage(s, m as { id: unknown; method?: string; params?: unknown; result?: unknown; error?: unknown });
      });
      s.on("error", (e) => {
        if (this.connecting) {
          this.connecting = undefined;
          reject(unavailable(e));
        }
        this.failAll(unavailable(e));
      });
      s.on("close", () => {
        if (this.socket === s) this.socket = undefined;
        this.failAll(unavailable(new Error("connection closed")));
      });
    });
    return this.connecting;
  }

  private onMessage(s: Socket, m: { id: unknown; method?: string; params?: unknown; result?: unknown; error?: unknown }): void {
    if (m.method === "echo") {
      s.write(JSON.stringify({ id: m.id, result: m.params, error: null }));
      return;
    }
    if (typeof m.id !== "number") return; // notifications: Ferry monitors nothing
    const p = this.pending.get(m.id);
    if (!p) return;
    this.pending.delete(m.id);
    clearTimeout(p.timer);
    if (this.pending.size === 0) s.unref();
    if (m.error) {
      const code = typeof m.error === "string" ? m.error : JSON.stringify(m.error);
      p.reject(new OvsdbError(`ovsdb-server: ${code}`, code));
    } else p.resolve(m.result);
  }

  private failAll(e: Error): void {
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      this.pending.delete(id);
      p.reject(e);
    }
  }
}

/** An operation ovsdb-server refused; `code` is the protocol's error string ("constraint violation", ...). */
export class OvsdbError extends Error {
  constructor(
    message: string,
    readonly code: string,
  ) {
    super(message);
    this.name = "OvsdbError";
  }
}

/** ["set", [...]] or a single atom, as a list. */
export function setMembers(v: OvsdbValue | undefined): unknown[] {
  if (Array.isArray(v) && v[0] === "set") return v[1] as unknown[];
  return v === undefined ? [] : [v];
}

/** An OVSDB map from a plain object. */
export function ovsdbMap(o: Record<string, string>): ["map", Array<[string, string]>] {
  return ["map", Object.entries(o)];
}
