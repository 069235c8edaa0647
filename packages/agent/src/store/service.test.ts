import { randomBytes } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile, chmod, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import * as agentMessages from "@ferry/api/agent";
import { BlobKind, type BlobRef, type PullBlobResponse } from "@ferry/api/agent";
import { FerryError, connect, serve, type PromiseClient, type RunningServer, type Security } from "@ferry/common";
import { BlobStore, type FreeSpaceFn } from "./blob-store.js";
import {
  PEER_CHANNEL_OPTIONS,
  createStoreService,
  grpcPeerClients,
  storeServiceDefinition,
  type StoreFailpoints,
  type StoreServiceDefinition,
} from "./service.js";

const protoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../../../proto");
const insecure: Security = { mode: "insecure" };
const MiB = 1024 * 1024;

interface Agent {
  root: string;
  store: BlobStore;
  failpoints: StoreFailpoints;
  server: RunningServer;
  address: string;
  client: PromiseClient<StoreServiceDefinition>;
  restart(): Promise<void>;
  stop(): Promise<void>;
}

const cleanup: Array<() => Promise<void>> = [];

async function startAgent(opts: { freeBytes?: FreeSpaceFn } = {}): Promise<Agent> {
  const root = await mkdtemp(path.join(tmpdir(), "ferry-store-t-"));
  const store = new BlobStore({ root, fsync: false, ...(opts.freeBytes ? { freeBytes: opts.freeBytes } : {}) });
  const failpoints: StoreFailpoints = {};
  const impl = createStoreService({ store, peerClient: grpcPeerClients(insecure), failpoints, progressIntervalMs: 10 });
  const listen = (): Promise<RunningServer> =>
    serve({
      address: "127.0.0.1:0",
      security: insecure,
      services: [
        { name: "ferry.agent.v1.AgentService", definition: storeServiceDefinition, impl, access: { allow: ["controller", "agent"] } },
      ],
      protoFiles: ["ferry/agent/v1/agent.proto"],
      protoRoot,
    });
  const agent: Agent = {
    root,
    store,
    failpoints,
    server: await listen(),
    address: "",
    client: undefined as unknown as Agent["client"],
    async restart() {
      agent.client.close();
      agent.server = await listen();
      agent.address = `127.0.0.1:${agent.server.port}`;
      agent.client = connect(storeServiceDefinition, agentMessages, {
        address: agent.address,
        security: insecure,
        options: PEER_CHANNEL_OPTIONS,
      });
    },
    async stop() {
      agent.client.close();
      agent.server.server.forceShutdown();
    },
  };
  agent.address = `127.0.0.1:${agent.server.port}`;
  agent.client = connect(storeServiceDefinition, agentMessages, {
    address: agent.address,
    security: insecure,
    options: PEER_CHANNEL_OPTIONS,
  });
  cleanup.push(async () => {
    await agent.stop();
    await rm(root, { recursive: true, force: true });
  });
  return agent;
}

afterAll(async () => {
  for (const c of cleanup.reverse()) await c();
});

/** Random content as a file imported into `agent`'s store. */
async function addRandomBlob(agent: Agent, size: number): Promise<{ ref: BlobRef; data: Buffer }> {
  const data = randomBytes(size);
  const file = path.join(agent.root, `in-${randomBytes(4).toString("hex")}`);
  await writeFile(file, data);
  const ref = await agent.store.importFile(file, BlobKind.BLOB_KIND_CHECKPOINT, { move: true });
  return { ref, data };
}

function* pushMessages(ref: BlobRef, data: Buffer, offset = 0, chunk = MiB): Generator<agentMessages.PushBlobRequest> {
  yield { msg: { $case: "header", value: ref }, offset };
  for (let o = offset; o < data.length; o += chunk)
    yield { msg: { $case: "chunk", value: data.subarray(o, Math.min(o + chunk, data.length)) }, offset: 0 };
}

async function pull(dest: Agent, source: Agent, ref: BlobRef, chunkBytes = 0): Promise<PullBlobResponse[]> {
  const out: PullBlobResponse[] = [];
  for await (const m of dest.client.pullBlob({ blob: ref, sourceAddress: source.address, chunkBytes })) out.push(m);
  return out;
}

async function rejection(p: Promise<unknown>): Promise<FerryError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(FerryError);
    return e as FerryError;
  }
  throw new Error("expected a rejection");
}

const blobFile = (a: Agent, digest: string): string => path.join(a.root, "sha256", digest.slice(7));

describe("store service over gRPC", () => {
  let a: Agent;
  let b: Agent;
  beforeAll(async () => {
    a = await startAgent();
    b = await startAgent();
  });

  it("pushes a blob in chunks and pulls it to a peer, verifying the digest", async () => {
    const data = randomBytes(5 * MiB + 123);
    const { ref } = {
      ref: {
        digest: `sha256:${(await import("node:crypto")).createHash("sha256").update(data).digest("hex")}`,
        sizeBytes: data.length,
        kind: BlobKind.BLOB_KIND_IMAGE,
      },
    };
    const pushed = await a.client.pushBlob(pushMessages(ref, data));
    expect(pushed).toEqual({ blob: ref, stored: true });
    expect(await a.client.pushBlob(pushMessages(ref, data))).toEqual({ blob: ref, stored: false });
    expect(await a.client.hasBlobs({ digests: [ref.digest] })).toEqual({ present: [ref.digest], missing: [] });
    expect(await b.client.hasBlobs({ digests: [ref.digest] })).toEqual({ present: [], missing: [ref.digest] });

    const msgs = await pull(b, a, ref, 64 * 1024);
    const last = msgs.at(-1)!;
    expect(last.done).toBe(true);
    expect(last.receivedBytes).toBe(data.length);
    expect(last.stats).toMatchObject({ bytes: data.length, resumedFrom: 0 });
    expect(last.stats!.mbPerS).toBeGreaterThan(0);
    expect(msgs.slice(0, -1).every((m) => !m.done && m.totalBytes === data.length)).toBe(true);
    expect((await readFile(blobFile(b, ref.digest))).equals(data)).toBe(true);
    expect(await b.client.getBlobStatus({ digest: ref.digest })).toEqual({ complete: true, receivedBytes: data.length });
    expect((await b.store.stat(ref.digest)).kind).toBe(BlobKind.BLOB_KIND_IMAGE);

    // A second pull of a blob already here is answered at once.
    const again = await pull(b, a, ref);
    expect(again).toHaveLength(1);
    expect(again[0]!.stats).toMatchObject({ bytes: 0, resumedFrom: data.length });

    // And it can be tagged and listed as an image.
    expect(await b.client.tagImage({ name: "alpine-3.19", digest: ref.digest })).toEqual({
      image: { name: "alpine-3.19", digest: ref.digest, sizeBytes: data.length },
    });
    expect((await b.client.listImages({})).images.map((i) => i.name)).toEqual(["alpine-3.19"]);
    await b.client.deleteBlob({ digest: ref.digest });
    expect((await b.client.listImages({})).images).toEqual([]);
    expect(await b.client.hasBlobs({ digests: [ref.digest] })).toEqual({ present: [], missing: [ref.digest] });
  });

  it("refuses a corrupted push with DataLoss and keeps nothing", async () => {
    const data = randomBytes(3 * MiB);
    const ref = {
      digest: `sha256:${(await import("node:crypto")).createHash("sha256").update(data).digest("hex")}`,
      sizeBytes: data.length,
      kind: BlobKind.BLOB_KIND_UPPER,
    };
    const bad = Buffer.from(data);
    bad[2 * MiB + 7]! ^= 0xff;
    const err = await rejection(a.client.pushBlob(pushMessages(ref, bad)));
    expect(err.code).toBe("DataLoss");
    expect(err.message).toContain(ref.digest);
    expect(await a.client.getBlobStatus({ digest: ref.digest })).toEqual({ complete: false, receivedBytes: 0 });
    expect(await a.client.hasBlobs({ digests: [ref.digest] })).toMatchObject({ missing: [ref.digest] });
  });

  it("refuses a pull whose source data does not match its digest (DataLoss), keeping nothing", async () => {
    const { ref } = await addRandomBlob(a, 2 * MiB);
    const file = blobFile(a, ref.digest);
    const content = await readFile(file);
    content[MiB]! ^= 1;
    await chmod(file, 0o644);
    await writeFile(file, content); // bit rot on the source
    const err = await rejection(pull(b, a, ref));
    expect(err.code).toBe("DataLoss");
    expect(await b.client.getBlobStatus({ digest: ref.digest })).toEqual({ complete: false, receivedBytes: 0 });
  });

  it("resumes a pull cut by the source (failpoint) from where it stopped", async () => {
    const { ref, data } = await addRandomBlob(a, 8 * MiB);
    a.failpoints.readBlobFailAfterBytes = 3 * MiB;
    try {
      const err = await rejection(pull(b, a, ref, 256 * 1024));
      expect(err.code).toBe("Unavailable");
      expect(err.message).toMatch(/interrupted at byte \d+/);
    } finally {
      delete a.failpoints.readBlobFailAfterBytes;
    }
    const status = await b.client.getBlobStatus({ digest: ref.digest });
    expect(status.complete).toBe(false);
    expect(status.receivedBytes).toBe(3 * MiB);
    const msgs = await pull(b, a, ref, 256 * 1024);
    expect(msgs[0]!.receivedBytes).toBe(3 * MiB);
    expect(msgs.at(-1)!.stats).toMatchObject({ resumedFrom: 3 * MiB, bytes: 5 * MiB });
    expect((await readFile(blobFile(b, ref.digest))).equals(data)).toBe(true);
  });

  it("resumes a pull after the source agent dies mid-transfer", async () => {
    const src = await startAgent();
    const { ref, data } = await addRandomBlob(src, 64 * MiB);
    let killedAt = -1;
    const err = await rejection(
      (async () => {
        for await (const m of b.client.pullBlob({ blob: ref, sourceAddress: src.address, chunkBytes: 64 * 1024 })) {
          if (killedAt < 0 && m.receivedBytes > 0) {
            killedAt = m.receivedBytes;
            src.server.server.forceShutdown(); // the source agent goes away
          }
        }
      })(),
    );
    expect(err.code).toBe("Unavailable");
    const { receivedBytes } = await b.client.getBlobStatus({ digest: ref.digest });
    expect(receivedBytes).toBeGreaterThanOrEqual(killedAt);
    expect(receivedBytes).toBeLessThan(ref.sizeBytes);

    await src.restart(); // same store, new port
    const msgs = await pull(b, src, ref);
    expect(msgs.at(-1)!.stats).toMatchObject({ resumedFrom: receivedBytes, bytes: ref.sizeBytes - receivedBytes });
    expect((await readFile(blobFile(b, ref.digest))).equals(data)).toBe(true);
  });

  it("refuses a push at the wrong offset with FailedPrecondition naming where to resume", async () => {
    const data = randomBytes(3 * MiB);
    const ref = {
      digest: `sha256:${(await import("node:crypto")).createHash("sha256").update(data).digest("hex")}`,
      sizeBytes: data.length,
      kind: BlobKind.BLOB_KIND_IMAGE,
    };
    let err = await rejection(a.client.pushBlob(pushMessages(ref, data, 100)));
    expect(err.code).toBe("FailedPrecondition");
    expect(err.message).toContain("resume at offset 0");

    // An upload that stops after 1 MiB is kept as a partial ...
    err = await rejection(a.client.pushBlob(pushMessages(ref, data.subarray(0, MiB))));
    expect(err.code).toBe("FailedPrecondition");
    expect(await a.client.getBlobStatus({ digest: ref.digest })).toEqual({ complete: false, receivedBytes: MiB });
    // ... restarting it at 0 is refused ...
    err = await rejection(a.client.pushBlob(pushMessages(ref, data, 0)));
    expect(err.code).toBe("FailedPrecondition");
    expect(err.message).toContain(`resume at offset ${MiB}`);
    // ... and resuming at 1 MiB completes it.
    expect(await a.client.pushBlob(pushMessages(ref, data, MiB))).toEqual({ blob: ref, stored: true });
    expect((await readFile(blobFile(a, ref.digest))).equals(data)).toBe(true);
  });

  it("connects to a peer ahead of a pull, and says Unavailable, naming the address, for one it cannot reach", async () => {
    const c = await startAgent();
    const first = await c.client.connectPeer({ address: a.address, serverName: "" });
    expect(first.connectMs).toBeGreaterThan(0);
    // The pulls use the same channel: already connected.
    expect((await c.client.connectPeer({ address: a.address, serverName: "" })).connectMs).toBe(0);
    const started = performance.now();
    const err = await rejection(c.client.connectPeer({ address: "127.0.0.1:1", serverName: "", timeoutMs: 300 }));
    expect(err.code).toBe("Unavailable");
    expect(err.message).toContain("127.0.0.1:1 not reached in 300 ms");
    expect(performance.now() - started).toBeLessThan(3000);
    expect((await rejection(c.client.connectPeer({ address: "" }))).code).toBe("InvalidArgument");
  });

  it("reads a blob from an offset up to a limit, cutting the last chunk", async () => {
    const { ref, data } = await addRandomBlob(a, 3 * MiB + 5);
    const read = async (offset: number, limitBytes: number): Promise<Buffer> => {
      const parts: Buffer[] = [];
      for await (const m of a.client.readBlob({ digest: ref.digest, offset, limitBytes, chunkBytes: 64 * 1024 })) parts.push(m.data);
      return Buffer.concat(parts);
    };
    expect((await read(100, MiB + 7)).equals(data.subarray(100, 100 + MiB + 7))).toBe(true);
    // a limit past the end reads to the end; 0 is no limit
    expect((await read(3 * MiB, MiB)).equals(data.subarray(3 * MiB))).toBe(true);
    expect((await read(0, 0)).equals(data)).toBe(true);
  });

  it("warms a connection it opens by reading the given blob up to warm_bytes, and only then", async () => {
    const { ref } = await addRandomBlob(a, 2 * MiB);
    const c = await startAgent();
    const first = await c.client.connectPeer({ address: a.address, serverName: "", warmDigest: ref.digest, warmBytes: MiB });
    expect(first.connectMs).toBeGreaterThan(0);
    expect(first.warmedBytes).toBe(MiB);
    // already connected: no warm-up
    const again = await c.client.connectPeer({ address: a.address, serverName: "", warmDigest: ref.digest, warmBytes: MiB });
    expect(again).toEqual({ connectMs: 0, warmedBytes: 0, warmMs: 0 });
    // nothing was stored on the warming side
    expect(await c.client.hasBlobs({ digests: [ref.digest] })).toEqual({ present: [], missing: [ref.digest] });

    // a blob the peer does not hold: connected all the same, nothing warmed
    const d = await startAgent();
    const missing = await d.client.connectPeer({
      address: a.address,
      serverName: "",
      warmDigest: `sha256:${"cd".repeat(32)}`,
      warmBytes: MiB,
    });
    expect(missing.connectMs).toBeGreaterThan(0);
    expect(missing.warmedBytes).toBe(0);

    let err = await rejection(d.client.connectPeer({ address: a.address, serverName: "", warmDigest: ref.digest, warmBytes: 8 * MiB + 1 }));
    expect(err.code).toBe("InvalidArgument");
    expect(err.message).toContain("warm_bytes");
    err = await rejection(d.client.connectPeer({ address: a.address, serverName: "", warmDigest: "sha256:nope", warmBytes: MiB }));
    expect(err.code).toBe("InvalidArgument");
    expect(err.message).toContain("warm_digest");
  });

  it("answers NotFound for an unknown digest", async () => {
    const unknown = `sha256:${"ab".repeat(32)}`;
    const read = async (): Promise<void> => {
      for await (const _ of a.client.readBlob({ digest: unknown })) void _;
    };
    expect((await rejection(read())).code).toBe("NotFound");
    expect((await rejection(a.client.tagImage({ name: "x", digest: unknown }))).code).toBe("NotFound");
    expect((await rejection(a.client.deleteBlob({ digest: unknown }))).code).toBe("NotFound");
    const err = await rejection(pull(b, a, { digest: unknown, sizeBytes: 10, kind: BlobKind.BLOB_KIND_IMAGE }));
    expect(err.code).toBe("NotFound");
    expect(err.message).toContain(`source ${a.address}`);
  });

  it("answers InvalidArgument for a malformed digest, naming the field", async () => {
    let err = await rejection(a.client.hasBlobs({ digests: [`sha256:${"0".repeat(64)}`, "sha256:xyz"] }));
    expect(err.code).toBe("InvalidArgument");
    expect(err.message).toContain("digests[1]");
    err = await rejection(a.client.getBlobStatus({ digest: "../../etc/passwd" }));
    expect(err.code).toBe("InvalidArgument");
    err = await rejection(pull(b, a, { digest: "SHA256:AB", sizeBytes: 1, kind: 0 }));
    expect(err.code).toBe("InvalidArgument");
    expect(err.message).toContain("blob.digest");
    err = await rejection(a.client.tagImage({ name: "Bad/Name", digest: `sha256:${"0".repeat(64)}` }));
    expect(err.code).toBe("InvalidArgument");
  });

  it("refuses a pull or push that does not fit on disk with ResourceExhausted and the numbers", async () => {
    const full = await startAgent({ freeBytes: async () => 1000 });
    const { ref, data } = await addRandomBlob(a, 2 * MiB);
    let err = await rejection(pull(full, a, ref));
    expect(err.code).toBe("ResourceExhausted");
    expect(err.message).toContain(`need ${2 * MiB} bytes`);
    expect(err.message).toContain("1000 bytes");
    err = await rejection(full.client.pushBlob(pushMessages(ref, data)));
    expect(err.code).toBe("ResourceExhausted");
    expect(await full.client.getBlobStatus({ digest: ref.digest })).toEqual({ complete: false, receivedBytes: 0 });
  });

  it("pulls a 256 MiB blob with flat memory", async () => {
    const src = await startAgent();
    const dst = await startAgent();
    const size = 256 * MiB;
    const file = path.join(src.root, "big");
    const piece = randomBytes(MiB);
    const fh = await (await import("node:fs/promises")).open(file, "w");
    for (let i = 0; i < size / MiB; i++) {
      piece.writeUInt32LE(i, 0); // distinct pieces, so a misplaced chunk changes the digest
      await fh.write(piece);
    }
    await fh.close();
    const ref = await src.store.importFile(file, BlobKind.BLOB_KIND_IMAGE, { move: true });
    global.gc?.();
    const base = process.memoryUsage().rss;
    let peak = base;
    const timer = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 5);
    try {
      const msgs = await pull(dst, src, ref, 4 * MiB);
      expect(msgs.at(-1)!.stats!.bytes).toBe(size);
    } finally {
      clearInterval(timer);
    }
    expect((await stat(blobFile(dst, ref.digest))).size).toBe(size);
    const growthMiB = (peak - base) / MiB;
    console.log(`256 MiB pull: RSS growth ${growthMiB.toFixed(1)} MiB`);
    // A pull that held the blob would grow by 256 MiB or more. A streaming one grows by the chunks
    // in flight plus the garbage V8 lets pile up before it collects Buffers (it starts at ~64 MiB
    // of external memory): 54 and 108 MiB in two runs of the suite, so the bound leaves room.
    expect(growthMiB).toBeLessThan(160);
  });
});
