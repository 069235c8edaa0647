import { createHash } from "node:crypto";
import { mkdir, readFile, readdir, rename, rm, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import { FerryError, validateOperationKey, type CallContext, type ServiceDef, type ServiceImpl } from "@ferry/common";

interface Record_ {
  method: string;
  requestHash: string;
  /** The encoded response, base64. */
  response: string;
  at: string;
}

/**
 * The agent's record of answered mutating calls, keyed by operation key. A retried call (same
 * key, same method and request) gets the recorded answer instead of being done twice; a call
 * still running is joined, not started again. Failures are not recorded: a retry redoes them.
 * Records live on disk, so they survive an agent restart, and expire after `ttlMs`.
 */
export class OperationLog {
  private readonly inflight = new Map<string, { requestHash: string; answer: Promise<Buffer> }>();

  constructor(
    private readonly dir: string,
    private readonly ttlMs = 24 * 3600_000,
  ) {}

  private file(key: string): string {
    return path.join(this.dir, createHash("sha256").update(key).digest("hex") + ".json");
  }

  /** Run `fn` once per key; `encode`/`decode` turn the response into bytes for the record. */
  async once<T>(
    key: string,
    method: string,
    request: Buffer,
    fn: () => Promise<T>,
    encode: (v: T) => Buffer,
    decode: (b: Buffer) => T,
  ): Promise<T> {
    validateOperationKey("operation_key", key);
    const requestHash = createHash("sha256").update(method).update(request).digest("hex");
    // Registered before the first await, so a concurrent duplicate always finds it.
    let running = this.inflight.get(key);
    if (running && running.requestHash !== requestHash) {
      throw new FerryError("AlreadyExists", `operation key "${key}" is in use by a different request`, {
        field: "operation_key",
        fix: "use a new operation key for a new request",
      });
    }
    if (!running) {
      running = { requestHash, answer: this.answer(key, method, requestHash, fn, encode).finally(() => this.inflight.delete(key)) };
      this.inflight.set(key, running);
    }
    return decode(await running.answer);
  }

  private async answer<T>(
    key: string,
    method: string,
    requestHash: string,
    fn: () => Promise<T>,
    encode: (v: T) => Buffer,
  ): Promise<Buffer> {
    const file = this.file(key);
    const existing = await readFile(file, "utf8").then(
      (s) => JSON.parse(s) as Record_,
      () => undefined,
    );
    if (existing) {
      if (existing.method !== method || existing.requestHash !== requestHash) {
        throw new FerryError("AlreadyExists", `operation key "${key}" was already used for a different request (${existing.method})`, {
          field: "operation_key",
          fix: "use a new operation key for a new request; reuse a key only to retry the same request",
        });
      }
      return Buffer.from(existing.response, "base64");
    }
    const bytes = encode(await fn());
    await mkdir(this.dir, { recursive: true });
    const rec: Record_ = { method, requestHash, response: bytes.toString("base64"), at: new Date().toISOString() };
    await writeFile(file + ".tmp", JSON.stringify(rec));
    await rename(file + ".tmp", file);
    return bytes;
  }

  /** Drop records older than the TTL. */
  async prune(now = Date.now()): Promise<number> {
    let n = 0;
    for (const f of await readdir(this.dir).catch(() => [] as string[])) {
      const full = path.join(this.dir, f);
      const s = await stat(full).catch(() => undefined);
      if (s && now - s.mtimeMs > this.ttlMs) {
        await rm(full, { force: true });
        n++;
      }
    }
    return n;
  }
}

/**
 * Wrap every unary method whose request has a non-empty `operationKey` so that it runs once
 * per key. Streaming methods are left alone (PullBlob resumes by itself).
 */
export function idempotent<S extends ServiceDef>(definition: S, impl: ServiceImpl<S>, log: OperationLog): ServiceImpl<S> {
  const out: Record<string, unknown> = { ...impl };
  for (const [method, def] of Object.entries(definition)) {
    if (def.requestStream || def.responseStream) continue;
    const fn = impl[method as keyof S] as unknown as (req: { operationKey?: string }, ctx: CallContext) => Promise<unknown>;
    out[method] = (req: { operationKey?: string }, ctx: CallContext) => {
      if (!req.operationKey) return fn(req, ctx);
      return log.once(
        req.operationKey,
        method,
        def.requestSerialize(req),
        () => fn(req, ctx),
        def.responseSerialize,
        def.responseDeserialize,
      );
    };
  }
  return out as ServiceImpl<S>;
}
