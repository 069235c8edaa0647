import { once } from "node:events";
import {
  Client,
  Metadata,
  Server,
  type CallOptions,
  type ChannelOptions,
  type ServerDuplexStream,
  type ServerReadableStream,
  type ServerUnaryCall,
  type ServerWritableStream,
  type ServiceDefinition,
  type UntypedHandleCall,
  type sendUnaryData,
} from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { ReflectionService } from "@grpc/reflection";
import { HealthImplementation } from "grpc-health-check";
import { FerryError, asFerryError, fromServiceError, toServiceError } from "./errors.js";
import { silentLogger, type Logger } from "./log.js";
import { channelCredentials, channelOptions, serverCredentials, type Role, type Security } from "./tls.js";

// ---------------------------------------------------------------------------------------------
// method shapes, read off ts-proto's `outputServices=grpc-js` definitions

interface MethodDef<Req, Res, ReqS extends boolean, ResS extends boolean> {
  path: string;
  requestStream: ReqS;
  responseStream: ResS;
  requestSerialize: (v: Req) => Buffer;
  requestDeserialize: (b: Buffer) => Req;
  responseSerialize: (v: Res) => Buffer;
  responseDeserialize: (b: Buffer) => Res;
}
type AnyMethod = MethodDef<any, any, boolean, boolean>; // eslint-disable-line @typescript-eslint/no-explicit-any
export type ServiceDef = Record<string, AnyMethod>;

/** Who is calling, from the client certificate (OU = role, CN = name). */
export interface Peer {
  role: Role | "insecure";
  name: string;
  address: string;
}

export interface CallContext {
  peer: Peer;
  /** Aborted when the client cancels or its deadline passes. */
  signal: AbortSignal;
  metadata: Metadata;
  method: string;
}

/** What a service implementation provides: plain async functions, no grpc-js in sight. */
export type ServiceImpl<S extends ServiceDef> = {
  [K in keyof S]: S[K] extends MethodDef<infer Req, infer Res, false, false>
    ? (req: Req, ctx: CallContext) => Promise<Res>
    : S[K] extends MethodDef<infer Req, infer Res, false, true>
      ? (req: Req, ctx: CallContext) => AsyncIterable<Res>
      : S[K] extends MethodDef<infer Req, infer Res, true, false>
        ? (reqs: AsyncIterable<Req>, ctx: CallContext) => Promise<Res>
        : never;
};

/** Which roles may call a service: a default list and per-method exceptions. */
export interface AccessPolicy {
  allow: readonly Role[];
  methods?: Record<string, readonly Role[]>;
}

export interface ServiceRegistration<S extends ServiceDef> {
  /** Full proto name, e.g. "ferry.agent.v1.AgentService" (health status key). */
  name: string;
  definition: S;
  impl: ServiceImpl<S>;
  access: AccessPolicy;
}

function peerOf(call: { getPeer(): string; getAuthContext?: () => unknown }, security: Security): Peer {
  const address = call.getPeer();
  if (security.mode === "insecure") return { role: "insecure", name: "", address };
  const auth = call.getAuthContext?.() as { sslPeerCertificate?: { subject?: Record<string, string | string[]> } } | null;
  const subject = auth?.sslPeerCertificate?.subject ?? {};
  const first = (v: string | string[] | undefined): string => (Array.isArray(v) ? (v[0] ?? "") : (v ?? ""));
  const ou = first(subject.OU);
  const role = ou === "controller" || ou === "agent" || ou === "admin" ? ou : undefined;
  if (!role)
    throw new FerryError("PermissionDenied", `client certificate has no Ferry role (OU="${ou}")`, {
      fix: "use a certificate made by deploy/certs.sh",
    });
  return { role, name: first(subject.CN), address };
}

function authorize(access: AccessPolicy, method: string, peer: Peer): void {
  if (peer.role === "insecure") return;
  const allowed = access.methods?.[method] ?? access.allow;
  if (!allowed.includes(peer.role)) {
    throw new FerryError("PermissionDenied", `a ${peer.role} certificate (CN=${peer.name}) may not call ${method}`, {
      fix: `call it with a certificate of role ${allowed.join(" or ")}`,
    });
  }
}

type AnyCall =
  | ServerUnaryCall<unknown, unknown>
  | ServerReadableStream<unknown, unknown>
  | ServerWritableStream<unknown, unknown>
  | ServerDuplexStream<unknown, unknown>;

function contextOf(call: AnyCall, method: string, peer: Peer): CallContext {
  const ac = new AbortController();
  (call as NodeJS.EventEmitter).on("cancelled", () => ac.abort(new FerryError("Cancelled", "the client cancelled the call")));
  return { peer, signal: ac.signal, metadata: call.metadata, method };
}

/** Write to a server stream, waiting for the transport to drain so memory stays flat. */
async function writeAll(call: ServerWritableStream<unknown, unknown>, items: AsyncIterable<unknown>, signal: AbortSignal): Promise<void> {
  for await (const item of items) {
    if (signal.aborted) return;
    if (!call.write(item)) {
      // Both waits are cancelled when one wins: a listener per backpressure wait would pile up.
      const ac = new AbortController();
      await Promise.race([
        once(call, "drain", { signal: ac.signal }),
        once(signal as unknown as NodeJS.EventEmitter, "abort", { signal: ac.signal }),
      ]).catch(() => undefined);
      ac.abort();
    }
  }
}

/** Trailer with the time the server spent on a call: the client's measure of control overhead. */
export const SERVER_TIME_TRAILER = "ferry-server-ms";

function serverTime(t0: number): Metadata {
  const m = new Metadata();
  m.set(SERVER_TIME_TRAILER, (performance.now() - t0).toFixed(2));
  return m;
}

/**
 * Turn a plain implementation into grpc-js handlers: authorization by certificate role, errors
 * mapped to status codes in one place, cancellation as an AbortSignal, backpressure on streams.
 */
export function toHandlers<S extends ServiceDef>(
  reg: ServiceRegistration<S>,
  security: Security,
  log: Logger,
): Record<string, UntypedHandleCall> {
  const handlers: Record<string, UntypedHandleCall> = {};
  for (const [method, def] of Object.entries(reg.definition)) {
    const fn = reg.impl[method as keyof S] as unknown as (a: unknown, ctx: CallContext) => unknown;
    const fail = (e: unknown): ReturnType<typeof toServiceError> => {
      const fe = asFerryError(e);
      if (fe.code === "Internal") log.error({ method, err: fe }, "handler failed");
      else log.debug({ method, code: fe.code, msg: fe.message }, "handler refused");
      return toServiceError(fe);
    };
    if (!def.requestStream && !def.responseStream) {
      handlers[method] = ((call: ServerUnaryCall<unknown, unknown>, cb: sendUnaryData<unknown>) => {
        void (async () => {
          try {
            const peer = peerOf(call, security);
            authorize(reg.access, method, peer);
            const t0 = performance.now();
            const res = await fn(call.request, contextOf(call, method, peer));
            cb(null, res, serverTime(t0));
          } catch (e) {
            cb(fail(e));
          }
        })();
      }) as UntypedHandleCall;
    } else if (!def.requestStream && def.responseStream) {
      handlers[method] = (call: ServerWritableStream<unknown, unknown>) => {
        void (async () => {
          try {
            const peer = peerOf(call, security);
            authorize(reg.access, method, peer);
            const ctx = contextOf(call, method, peer);
            const t0 = performance.now();
            await writeAll(call, fn(call.request, ctx) as AsyncIterable<unknown>, ctx.signal);
            call.end(serverTime(t0));
          } catch (e) {
            call.emit("error", fail(e));
          }
        })();
      };
    } else if (def.requestStream && !def.responseStream) {
      handlers[method] = ((call: ServerReadableStream<unknown, unknown>, cb: sendUnaryData<unknown>) => {
        void (async () => {
          try {
            const peer = peerOf(call, security);
            authorize(reg.access, method, peer);
            const t0 = performance.now();
            const res = await fn(call, contextOf(call, method, peer));
            cb(null, res, serverTime(t0));
          } catch (e) {
            cb(fail(e));
          }
        })();
      }) as UntypedHandleCall;
    } else {
      throw new Error(`bidi method ${method} is not supported by toHandlers`);
    }
  }
  return handlers;
}

export interface ServeOptions {
  /** "0.0.0.0:7443", or port 0 to pick a free one. */
  address: string;
  security: Security;
  services: ServiceRegistration<any>[]; // eslint-disable-line @typescript-eslint/no-explicit-any
  /** .proto files (relative to `protoRoot`) to serve by reflection. */
  protoFiles: string[];
  protoRoot: string;
  log?: Logger;
  options?: ChannelOptions;
}

export interface RunningServer {
  server: Server;
  port: number;
  health: HealthImplementation;
  /** Graceful shutdown, then forced after `graceMs`. */
  close(graceMs?: number): Promise<void>;
}

/** Start a gRPC server with Ferry's services, the standard health service and server reflection. */
export async function serve(opts: ServeOptions): Promise<RunningServer> {
  const log = opts.log ?? silentLogger;
  const server = new Server({
    "grpc.max_receive_message_length": 16 * 1024 * 1024,
    "grpc.max_send_message_length": 16 * 1024 * 1024,
    ...opts.options,
  });
  for (const reg of opts.services) {
    server.addService(reg.definition as ServiceDefinition, toHandlers(reg, opts.security, log));
  }
  const status: Record<string, "SERVING"> = { "": "SERVING" };
  for (const reg of opts.services) status[reg.name] = "SERVING";
  const health = new HealthImplementation(status);
  health.addToServer(server);
  const pkg = protoLoader.loadSync(opts.protoFiles, {
    includeDirs: [opts.protoRoot],
    keepCase: false,
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  new ReflectionService(pkg).addToServer(server);

  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync(opts.address, serverCredentials(opts.security), (err, p) => (err ? reject(err) : resolve(p)));
  });
  return {
    server,
    port,
    health,
    close: (graceMs = 2000) =>
      new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          server.forceShutdown();
          resolve();
        }, graceMs);
        server.tryShutdown(() => {
          clearTimeout(timer);
          resolve();
        });
      }),
  };
}

// ---------------------------------------------------------------------------------------------
// clients

/** A message type from ts-proto, used to fill defaults of a partial request. */
interface MessageFns<T> {
  fromPartial(v: unknown): T;
}

export type DeepPartial<T> = T extends Date | Buffer | Uint8Array
  ? T
  : T extends Array<infer U>
    ? Array<DeepPartial<U>>
    : T extends object
      ? { [K in keyof T]?: DeepPartial<T[K]> }
      : T;

export interface CallOpts {
  /** Relative deadline. */
  timeoutMs?: number;
  signal?: AbortSignal;
  /**
   * Called with the time the server says it spent on the call (its trailer), once the call
   * ends: what a caller subtracts from its wall time to find its own overhead.
   */
  onServerMs?: (ms: number) => void;
  metadata?: Metadata;
}

/** A promise-based client: unary → Promise, server stream → AsyncIterable, client stream ← AsyncIterable. Errors are FerryErrors. */
export type PromiseClient<S extends ServiceDef> = {
  [K in keyof S]: S[K] extends MethodDef<infer Req, infer Res, false, false>
    ? (req?: DeepPartial<Req>, opts?: CallOpts) => Promise<Res>
    : S[K] extends MethodDef<infer Req, infer Res, false, true>
      ? (req?: DeepPartial<Req>, opts?: CallOpts) => AsyncIterable<Res>
      : S[K] extends MethodDef<infer Req, infer Res, true, false>
        ? (reqs: AsyncIterable<DeepPartial<Req>> | Iterable<DeepPartial<Req>>, opts?: CallOpts) => Promise<Res>
        : never;
} & { close(): void; readonly raw: Client };

export interface ConnectOptions {
  address: string;
  security: Security;
  /** Name on the server's certificate, when it differs from the address's host. */
  serverName?: string;
  options?: ChannelOptions;
}

/** grpc-js emits "status" (with the trailers) right after it settles a unary call's callback. */
function reportServerTime(call: NodeJS.EventEmitter, o: CallOpts | undefined): void {
  if (!o?.onServerMs) return;
  call.once("status", (st: { metadata?: Metadata }) => {
    const v = Number(st.metadata?.get(SERVER_TIME_TRAILER)[0]);
    if (Number.isFinite(v)) o.onServerMs!(v);
  });
}

function callOptions(o: CallOpts | undefined): Partial<CallOptions> {
  return o?.timeoutMs ? { deadline: new Date(Date.now() + o.timeoutMs) } : {};
}

/**
 * A client for one of Ferry's services over one long-lived channel. `messages` is the module of
 * generated message types, used to fill in defaults so that callers pass only what they mean.
 */
export function connect<S extends ServiceDef>(definition: S, messages: Record<string, unknown>, opts: ConnectOptions): PromiseClient<S> {
  const client = new Client(opts.address, channelCredentials(opts.security), channelOptions(opts.serverName, opts.options));
  const out: Record<string, unknown> = {
    close: () => client.close(),
    raw: client,
  };
  for (const [method, def] of Object.entries(definition)) {
    const reqName = def.path.split("/").pop() + "Request";
    const fns = messages[reqName] as MessageFns<unknown> | undefined;
    const serialize = (v: unknown): Buffer => def.requestSerialize(fns ? fns.fromPartial(v ?? {}) : v);
    const deserialize = def.responseDeserialize;
    if (!def.requestStream && !def.responseStream) {
      out[method] = (req: unknown, o?: CallOpts) =>
        new Promise((resolve, reject) => {
          const call = client.makeUnaryRequest(
            def.path,
            serialize,
            deserialize,
            req ?? {},
            o?.metadata ?? new Metadata(),
            callOptions(o),
            (err, res) => (err ? reject(fromServiceError(err)) : resolve(res)),
          );
          o?.signal?.addEventListener("abort", () => call.cancel(), { once: true });
          reportServerTime(call, o);
        });
    } else if (!def.requestStream && def.responseStream) {
      out[method] = (req: unknown, o?: CallOpts) => {
        const call = client.makeServerStreamRequest(
          def.path,
          serialize,
          deserialize,
          req ?? {},
          o?.metadata ?? new Metadata(),
          callOptions(o),
        );
        o?.signal?.addEventListener("abort", () => call.cancel(), { once: true });
        reportServerTime(call, o);
        // Errors reach the caller through the iterator; a stream never iterated (or abandoned)
        // must not take the process down with an unhandled 'error' event.
        call.on("error", () => undefined);
        return (async function* () {
          try {
            for await (const item of call) yield item as unknown;
          } catch (e) {
            throw fromServiceError(e);
          } finally {
            call.cancel();
          }
        })();
      };
    } else if (def.requestStream && !def.responseStream) {
      out[method] = async (reqs: AsyncIterable<unknown> | Iterable<unknown>, o?: CallOpts) => {
        let call: ReturnType<Client["makeClientStreamRequest"]> | undefined;
        const result = new Promise((resolve, reject) => {
          call = client.makeClientStreamRequest(
            def.path,
            serialize,
            deserialize,
            o?.metadata ?? new Metadata(),
            callOptions(o),
            (err, res) => (err ? reject(fromServiceError(err)) : resolve(res)),
          );
        });
        o?.signal?.addEventListener("abort", () => call!.cancel(), { once: true });
        reportServerTime(call!, o);
        try {
          for await (const r of reqs) {
            if (!call!.write(r)) await Promise.race([once(call!, "drain"), result]);
          }
          call!.end();
        } catch (e) {
          call!.cancel();
          await result.catch(() => undefined);
          throw asFerryError(e);
        }
        return result;
      };
    }
  }
  return out as PromiseClient<S>;
}
