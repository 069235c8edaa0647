import { connectivityState, type ChannelOptions } from "@grpc/grpc-js";
import * as agentMessages from "@ferry/api/agent";
import {
  AgentServiceService,
  type BlobRef,
  type PullBlobResponse,
  type PushBlobRequest,
  type ReadBlobRequest,
  type ReadBlobResponse,
} from "@ferry/api/agent";
import {
  FerryError,
  asFerryError,
  connect,
  isFerryError,
  silentLogger,
  validateDigest,
  validateOperationKey,
  type CallContext,
  type CallOpts,
  type DeepPartial,
  type Logger,
  type Security,
  type ServiceImpl,
} from "@ferry/common";
import type { BlobStore, BlobWriter } from "./blob-store.js";
import { ChunkPacer, decodeReadBlobResponse, encodeReadBlobResponse } from "./chunk-codec.js";

/**
 * AgentService's definition with ReadBlob's chunk message on a lean codec (one copy on encode,
 * none on decode). Wire-compatible with the proto; use it both to serve the agent and for the
 * client that pulls from a peer, or the gain is lost on that side.
 */
export const agentServiceDefinition = {
  ...AgentServiceService,
  readBlob: {
    ...AgentServiceService.readBlob,
    responseSerialize: encodeReadBlobResponse,
    responseDeserialize: decodeReadBlobResponse,
  },
};
export type AgentServiceDefinition = typeof agentServiceDefinition;

/** The RPCs this module implements. */
export const STORE_METHODS = [
  "hasBlobs",
  "pushBlob",
  "getBlobStatus",
  "readBlob",
  "pullBlob",
  "connectPeer",
  "tagImage",
  "listImages",
  "deleteBlob",
] as const;
export type StoreMethod = (typeof STORE_METHODS)[number];

/** Only the store's RPCs of {@link agentServiceDefinition}: to serve the store alone (tests, benchmarks). */
export const storeServiceDefinition = Object.fromEntries(STORE_METHODS.map((m) => [m, agentServiceDefinition[m]])) as Pick<
  AgentServiceDefinition,
  StoreMethod
>;
export type StoreServiceDefinition = typeof storeServiceDefinition;

export type StoreServiceImpl = ServiceImpl<StoreServiceDefinition>;

/** What a pull needs of a peer agent. `close()` is called when the pull ends (make it a no-op when channels are cached). */
export interface ReadBlobPeer {
  readBlob(req: DeepPartial<ReadBlobRequest>, opts?: CallOpts): AsyncIterable<ReadBlobResponse>;
  /** Connect now (if not connected) and wait until connected; resolves true if it had to connect. */
  connect(timeoutMs: number): Promise<boolean>;
  close(): void;
}
/** Opens a client to the agent at `address` whose certificate is issued for `serverName`. */
export type PeerClientFactory = (address: string, serverName: string) => ReadBlobPeer;

/** Chunk sizes: the proto allows 64 KiB .. 4 MiB (a message must stay under the 16 MiB limit). */
export const MIN_CHUNK_BYTES = 64 * 1024;
export const MAX_CHUNK_BYTES = 4 * 1024 * 1024;
export const DEFAULT_READ_CHUNK_BYTES = 1024 * 1024;
/** Pulls default to 2 MiB: measured fastest over mTLS on loopback (4 MiB chunks were 2x slower over TLS). */
export const DEFAULT_PULL_CHUNK_BYTES = 2 * 1024 * 1024;
/** ConnectPeer's largest warm-up. */
export const MAX_WARM_BYTES = 8 * 1024 * 1024;
/** ConnectPeer's wait when the request gives none. */
export const DEFAULT_CONNECT_TIMEOUT_MS = 5000;

/**
 * Channel options of a pulling client. The HTTP/2 window is the receiver's setting and grpc-js
 * has it on the client side only: that is why the destination pulls instead of the source pushing.
 */
export const PEER_CHANNEL_OPTIONS: ChannelOptions = {
  "grpc-node.flow_control_window": 16 * 1024 * 1024,
  "grpc.max_receive_message_length": 16 * 1024 * 1024,
};

/** A {@link PeerClientFactory} over real gRPC channels (mTLS with the agent's own certificate, or insecure). */
export function grpcPeerClients(security: Security, extra: ChannelOptions = {}): PeerClientFactory {
  // One long-lived channel per peer: a migration's pulls (checkpoint ‖ upper dir) run inside the
  // downtime, where a fresh channel's TCP and TLS handshake per pull is time the client waits.
  // grpc-js reconnects a channel whose connection broke, so keeping it is safe.
  const channels = new Map<string, ReturnType<typeof connect<typeof agentServiceDefinition>>>();
  return (address, serverName) => {
    const key = `${address}\0${serverName}`;
    let c = channels.get(key);
    if (!c) {
      c = connect(agentServiceDefinition, agentMessages, {
        address,
        security,
        ...(serverName ? { serverName } : {}),
        options: { ...PEER_CHANNEL_OPTIONS, ...extra },
      });
      channels.set(key, c);
    }
    const client = c.raw;
    return {
      readBlob: c.readBlob,
      connect: (timeoutMs) =>
        new Promise((resolve, reject) => {
          if (client.getChannel().getConnectivityState(true) === connectivityState.READY) return resolve(false);
          client.waitForReady(Date.now() + timeoutMs, (err) => (err ? reject(err) : resolve(true)));
        }),
      close: () => undefined,
    };
  };
}

/** Ways to make real transfers fail on purpose in tests (mutable: change them between calls). */
export interface StoreFailpoints {
  /** ReadBlob fails with Unavailable once it has sent at least this many bytes. */
  readBlobFailAfterBytes?: number;
}

export interface StoreServiceOptions {
  store: BlobStore;
  peerClient: PeerClientFactory;
  log?: Logger;
  /** Minimum time between two progress messages of a pull (default 100 ms: at most ~10/s). */
  progressIntervalMs?: number;
  failpoints?: StoreFailpoints;
}

function chunkBytesOf(field: string, value: number, dflt: number): number {
  if (value === 0) return dflt;
  if (!Number.isInteger(value) || value < MIN_CHUNK_BYTES || value > MAX_CHUNK_BYTES) {
    throw FerryError.invalid(
      field,
      `${value} is outside ${MIN_CHUNK_BYTES}..${MAX_CHUNK_BYTES} bytes`,
      "use 65536 to 4194304, or 0 for the default",
    );
  }
  return value;
}

function blobRefOf(field: string, ref: BlobRef | undefined): BlobRef {
  if (!ref) throw FerryError.invalid(field, "is required", "give the blob's digest, size_bytes and kind");
  validateDigest(`${field}.digest`, ref.digest);
  return ref;
}

/** Next item of an iterator, or Cancelled as soon as the call is aborted (a dead client must not pin a writer). */
async function nextOrAbort<T>(it: AsyncIterator<T>, signal: AbortSignal): Promise<IteratorResult<T>> {
  if (signal.aborted) throw new FerryError("Cancelled", "the client cancelled the call");
  let onAbort: (() => void) | undefined;
  const aborted = new Promise<never>((_, reject) => {
    onAbort = () => reject(new FerryError("Cancelled", "the client cancelled the call"));
    signal.addEventListener("abort", onAbort, { once: true });
  });
  try {
    return await Promise.race([it.next(), aborted]);
  } finally {
    signal.removeEventListener("abort", onAbort!);
  }
}

const MB = 1e6;
/** sha256 of zero bytes. */
const EMPTY_DIGEST = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/**
 * The content-addressed store's part of AgentService as plain functions (see `serve()` in
 * @ferry/common). Handlers validate, call the {@link BlobStore}, and shape the answer.
 */
export function createStoreService(opts: StoreServiceOptions): StoreServiceImpl {
  const { store, peerClient } = opts;
  const log = opts.log ?? silentLogger;
  const progressEvery = opts.progressIntervalMs ?? 100;
  const fp = opts.failpoints ?? {};

  /** A failure of the source's stream as the puller's caller should see it. */
  function sourceFailure(e: unknown, source: string, ref: BlobRef, at: number, ctx: CallContext): FerryError {
    const fe = asFerryError(e);
    if (ctx.signal.aborted) return new FerryError("Cancelled", `pull of ${ref.digest} cancelled at byte ${at}`, { cause: e });
    // The source's verdicts on the request itself are final; anything else is the link or the
    // peer going away, and a new pull resumes from what arrived.
    if (["NotFound", "InvalidArgument", "PermissionDenied", "Unauthenticated", "FailedPrecondition"].includes(fe.code)) {
      return new FerryError(fe.code, `source ${source}: ${fe.message}`, { cause: e, ...(fe.data ? { data: fe.data } : {}) });
    }
    return new FerryError(
      "Unavailable",
      `pull of ${ref.digest} from ${source} interrupted at byte ${at} of ${ref.sizeBytes}: ${fe.message}`,
      {
        fix: `pull again: it resumes at byte ${at}`,
        data: { receivedBytes: at, totalBytes: ref.sizeBytes },
        cause: e,
      },
    );
  }

  return {
    async hasBlobs(req) {
      return store.has(req.digests);
    },

    async getBlobStatus(req) {
      return store.status(req.digest);
    },

    async *readBlob(req, ctx) {
      validateDigest("digest", req.digest);
      const chunk = chunkBytesOf("chunk_bytes", req.chunkBytes, DEFAULT_READ_CHUNK_BYTES);
      let offset = req.offset;
      let sent = 0;
      const pacer = new ChunkPacer(2);
      for await (const data of store.read(req.digest, offset, chunk, req.limitBytes)) {
        await pacer.ready(ctx.signal);
        if (ctx.signal.aborted) return;
        if (fp.readBlobFailAfterBytes !== undefined && sent >= fp.readBlobFailAfterBytes) {
          throw new FerryError("Unavailable", `failpoint: ReadBlob cut after ${sent} bytes`);
        }
        yield pacer.track({ data, offset });
        offset += data.length;
        sent += data.length;
      }
    },

    async pushBlob(reqs, ctx) {
      const it = reqs[Symbol.asyncIterator]();
      const first = await nextOrAbort(it, ctx.signal);
      const head: PushBlobRequest | undefined = first.done ? undefined : first.value;
      if (head?.msg?.$case !== "header")
        throw FerryError.invalid("msg", "the first message must carry the header", "send { header: BlobRef, offset } first, then chunks");
      const ref = blobRefOf("header", head.msg.value);
      if ((await store.status(ref.digest)).complete) return { blob: await store.stat(ref.digest), stored: false };
      let w: BlobWriter;
      try {
        w = await store.openWriter(ref, head.offset, "header");
      } catch (e) {
        if (isFerryError(e, "AlreadyExists")) return { blob: await store.stat(ref.digest), stored: false };
        throw e;
      }
      try {
        for (;;) {
          const n = await nextOrAbort(it, ctx.signal);
          if (n.done) break;
          if (n.value.msg?.$case !== "chunk")
            throw FerryError.invalid("msg", "only chunks may follow the header", "send the header once, first");
          await w.write(n.value.msg.value);
        }
        const blob = await w.commit();
        log.info({ digest: blob.digest, bytes: blob.sizeBytes, resumedFrom: w.resumedFrom }, "blob pushed");
        return { blob, stored: true };
      } finally {
        await w.close();
      }
    },

    async connectPeer(req, ctx) {
      if (!req.address) throw FerryError.invalid("address", "is required", 'give the peer agent\'s "host:port"');
      if (req.warmBytes > MAX_WARM_BYTES)
        throw FerryError.invalid("warm_bytes", `${req.warmBytes} is over ${MAX_WARM_BYTES}`, `ask for at most ${MAX_WARM_BYTES} (8 MiB)`);
      if (req.warmDigest) validateDigest("warm_digest", req.warmDigest);
      const timeoutMs = req.timeoutMs || DEFAULT_CONNECT_TIMEOUT_MS;
      const started = performance.now();
      const peer = peerClient(req.address, req.serverName);
      const connected = await peer.connect(timeoutMs).catch((e: unknown) => {
        throw new FerryError("Unavailable", `peer agent ${req.address} not reached in ${timeoutMs} ms: ${(e as Error).message}`, {
          field: "address",
          fix: `check that ${req.address} is the peer agent's listening address and reachable from here, and its certificate is issued for "${req.serverName}"`,
        });
      });
      // At least 1 when it connected: 0 says it was connected already.
      const connectMs = connected ? Math.max(1, Math.round(performance.now() - started)) : 0;
      if (!connected || !req.warmDigest || !req.warmBytes) return { connectMs, warmedBytes: 0, warmMs: 0 };
      const warmStarted = performance.now();
      let warmedBytes = 0;
      try {
        for await (const m of peer.readBlob({ digest: req.warmDigest, limitBytes: req.warmBytes }, { signal: ctx.signal })) {
          warmedBytes += m.data.length;
          // A peer that predates limit_bytes sends on: enough is enough.
          if (warmedBytes >= req.warmBytes) break;
        }
      } catch (e) {
        log.warn({ peer: req.address, digest: req.warmDigest, warmedBytes, error: (e as Error).message }, "peer warm-up failed");
      }
      return { connectMs, warmedBytes, warmMs: Math.round(performance.now() - warmStarted) };
    },

    async *pullBlob(req, ctx): AsyncGenerator<PullBlobResponse> {
      validateOperationKey("operation_key", req.operationKey);
      const ref = blobRefOf("blob", req.blob);
      if (ref.sizeBytes === 0 && ref.digest !== EMPTY_DIGEST) {
        throw FerryError.invalid(
          "blob.size_bytes",
          "is 0 for a non-empty blob",
          "give the blob's size (GetBlobStatus on the source tells it)",
        );
      }
      if (!req.sourceAddress) throw FerryError.invalid("source_address", "is required", 'give the source agent\'s "host:port"');
      const chunkBytes = chunkBytesOf("chunk_bytes", req.chunkBytes, DEFAULT_PULL_CHUNK_BYTES);
      const source = req.sourceAddress;
      const started = performance.now();

      let w: BlobWriter;
      try {
        w = await store.openWriter(ref, "resume", "blob");
      } catch (e) {
        if (!isFerryError(e, "AlreadyExists")) throw e;
        const size = (await store.stat(ref.digest)).sizeBytes;
        yield { receivedBytes: size, totalBytes: size, done: true, stats: { bytes: 0, resumedFrom: size, durationMs: 0, mbPerS: 0 } };
        return;
      }
      const peer = peerClient(source, req.sourceServerName);
      const stream = peer.readBlob({ digest: ref.digest, offset: w.received, chunkBytes }, { signal: ctx.signal })[Symbol.asyncIterator]();
      const plog = log.child({ digest: ref.digest, source });
      plog.info({ resumedFrom: w.resumedFrom, total: ref.sizeBytes, chunkBytes }, "pull started");
      try {
        yield { receivedBytes: w.received, totalBytes: ref.sizeBytes, done: false };
        let lastProgress = performance.now();
        while (w.received < ref.sizeBytes) {
          let n: IteratorResult<ReadBlobResponse>;
          try {
            n = await stream.next();
          } catch (e) {
            throw sourceFailure(e, source, ref, w.received, ctx);
          }
          if (n.done) {
            throw new FerryError(
              "Unavailable",
              `source ${source} ended the stream of ${ref.digest} at byte ${w.received} of ${ref.sizeBytes}`,
              {
                fix: `pull again: it resumes at byte ${w.received}`,
                data: { receivedBytes: w.received, totalBytes: ref.sizeBytes },
              },
            );
          }
          if (n.value.offset !== w.received) {
            throw new FerryError("DataLoss", `source ${source} sent a chunk at offset ${n.value.offset}, expected ${w.received}`, {
              fix: "pull again; the source agent is faulty if it repeats",
            });
          }
          await w.write(n.value.data);
          const now = performance.now();
          if (now - lastProgress >= progressEvery) {
            lastProgress = now;
            yield { receivedBytes: w.received, totalBytes: ref.sizeBytes, done: false };
          }
        }
        await w.commit();
        const durationMs = performance.now() - started;
        const bytes = ref.sizeBytes - w.resumedFrom;
        const mbPerS = durationMs > 0 ? bytes / MB / (durationMs / 1000) : 0;
        plog.info({ bytes, resumedFrom: w.resumedFrom, ms: Math.round(durationMs), mbPerS: Math.round(mbPerS) }, "pull done");
        yield {
          receivedBytes: ref.sizeBytes,
          totalBytes: ref.sizeBytes,
          done: true,
          stats: { bytes, resumedFrom: w.resumedFrom, durationMs: Math.round(durationMs), mbPerS },
        };
      } finally {
        await stream.return?.();
        peer.close();
        await w.close();
      }
    },

    async tagImage(req) {
      validateOperationKey("operation_key", req.operationKey);
      return { image: await store.tag(req.name, req.digest) };
    },

    async listImages() {
      return { images: await store.listImages() };
    },

    async deleteBlob(req) {
      validateOperationKey("operation_key", req.operationKey);
      await store.delete(req.digest);
      return {};
    },
  };
}
