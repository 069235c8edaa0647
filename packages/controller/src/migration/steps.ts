// The steps of a live migration, as the pipeline engine runs them (see ../pipeline):
//
//   ┬ prepare-image ┬─ checkpoint ─┬ transfer    ┬─ restore ═ cleanup-source
//   └ prepare-netns ┘              └ switch-path ┘  (commit)  (container, namespace, checkpoint, blobs)
//   no downtime                    │ downtime starts . downtime ends │
//
// The source's namespace goes with the source's container, after the commit, not inside the
// downtime as COAT cleared it. Until then it costs the downtime nothing: CRIU's lock holds it
// shut, and once the path is switched nothing is sent to it; a rollback restores the container
// into it as it is. Cleared inside the downtime, it took CPU from the transfer and the path switch
// (downtime 0.955-0.965x with it after the commit: testbed, controller path, 15 + 15 migrations
// alternating, twice). Records saved by an older controller that cleared it in the downtime (step
// clear-source-netns) resume with that pipeline (stopAndCopyPipeline).
//
// The container is not inspected here, nor the destination asked for its image: StartMigration's
// pre-checks did both a moment before (the spec, the state and the image's bytes decide
// admission) and seed the outputs with what they learnt (`outputsOfInspected`, `partial`),
// saved with the record before any step runs.
//
// Until `restore` succeeds, every failure rolls back: undos run in reverse, and the last one,
// the checkpoint's, restores the container on the source from the checkpoint it kept. Once the
// destination runs the container, its clients may have talked to it: there is no way back, so
// `restore` is the commit point and `cleanup-source` is retried, never undone.
//
// Every agent call carries the step's operation key (`<migration id>/<step>`), so a retried call,
// or one repeated after a controller restart, is answered from the agent's record.
import {
  BlobKind,
  ContainerState,
  type BlobRef,
  type CheckpointResponse,
  type ContainerInfo,
  type ContainerSpec,
  type ExportCheckpointResponse,
  type TcpConnection,
} from "@ferry/api/agent";
import { FerryError, RETRYABLE_CODES, type CallOpts } from "@ferry/common";
import type { RetryPolicy, Stage, Step, StepIo } from "../pipeline/types.js";
import type { AgentClient } from "../hosts.js";
import type { PathSwitch, Sdn } from "../sdn/index.js";

export interface HostHandle {
  name: string;
  /** The agent's gRPC address, which a peer agent pulls blobs from. */
  address: string;
  tlsServerName: string;
  client: AgentClient;
}

/** What steps learn and later steps (and a resumed controller) need; saved in the journal. */
export interface MigrationOutputs {
  spec?: ContainerSpec;
  imageDigest?: string;
  imageBytes?: number;
  /** The destination already had the image: only the upper dir and the checkpoint travel. */
  partial?: boolean;
  sourceOfport?: number;
  destOfport?: number;
  checkpointId?: string;
  connections?: TcpConnection[];
  checkpointBlob?: BlobRef;
  upperBlob?: BlobRef;
  /** The destination's restore deleted the pulled blobs (older agents leave them to cleanup-source). */
  destBlobsDeleted?: boolean;
}

export interface MigrationCtx {
  id: string;
  container: string;
  source: HostHandle;
  dest: HostHandle;
  sdn: Sdn;
  /**
   * Saved with every record save: a step's outputs are durable with its DONE. Its own undo must
   * not depend on them (a controller may die before that save): it asks the agents instead.
   */
  out: MigrationOutputs;
}

const retry = (maxAttempts: number): RetryPolicy => ({
  maxAttempts,
  initialBackoffMs: 100,
  maxBackoffMs: 2000,
  retryable: RETRYABLE_CODES,
});
/** Inside the downtime a retry costs the client more than a failure's rollback would: retry fast. */
const downtimeRetry: RetryPolicy = { maxAttempts: 3, initialBackoffMs: 20, maxBackoffMs: 200, retryable: RETRYABLE_CODES };

interface Tally {
  work: number;
  /** Per agent host: calls made, and the fastest round trip beyond the agent's own time. */
  rpc: Map<string, { calls: number; min: number }>;
}
const tallies = new WeakMap<StepIo, Tally>();

function tally(io: StepIo): Tally {
  let t = tallies.get(io);
  if (!t) tallies.set(io, (t = { work: 0, rpc: new Map() }));
  return t;
}

/**
 * Count time the agents spent on this step (their own report, per call): the step's `work_ms`.
 * What the step took beyond it is the network and the controller's overhead.
 */
function addWork(io: StepIo, ms: number): void {
  const t = tally(io);
  t.work += ms;
  io.detail("work_ms", Math.round(t.work));
}

/**
 * Count one round trip to a host's agent: `rpc_calls:<host>`, and `rpc_min_ms:<host>`, the
 * fastest round trip's time beyond the agent's own (network and transport). The overhead
 * computation takes each host's fastest round trip in the migration as the network's share of
 * every call to it, so the rest of a call's time counts as the controller's.
 */
function addRpc(io: StepIo, host: string, rpcMs: number): void {
  const r = tally(io).rpc.get(host) ?? { calls: 0, min: Infinity };
  r.calls += 1;
  r.min = Math.min(r.min, rpcMs);
  tally(io).rpc.set(host, r);
  io.detail(`rpc_calls:${host}`, r.calls);
  io.detail(`rpc_min_ms:${host}`, Math.round(r.min * 100) / 100);
}

/** Call options for one agent call made by a step to `host`: its signal, its server time counted as work. */
function agentOpts(io: StepIo, host: HostHandle): CallOpts {
  const t0 = performance.now();
  return {
    signal: io.signal,
    onServerMs: (ms) => {
      addWork(io, ms);
      addRpc(io, host.name, Math.max(0, performance.now() - t0 - ms));
    },
  };
}

/**
 * Agent calls made at once count as the slowest one: its work and one round trip to its host,
 * not their sums (the overhead must not shrink because calls overlapped).
 */
async function inParallel(io: StepIo, calls: Call[]): Promise<void> {
  const t0 = performance.now();
  let slowest: { host: string; wall: number; server: number } | undefined;
  await Promise.all(
    calls.map(([host, c]) =>
      c({
        signal: io.signal,
        onServerMs: (ms) => {
          const wall = performance.now() - t0;
          if (!slowest || wall > slowest.wall) slowest = { host: host.name, wall, server: ms };
        },
      }),
    ),
  );
  if (!slowest) return;
  addWork(io, slowest.server);
  addRpc(io, slowest.host, Math.max(0, slowest.wall - slowest.server));
}

const ignoreNotFound = (e: unknown): void => {
  if ((e as FerryError).code !== "NotFound") throw e;
};

function call(io: StepIo, suffix?: string): { operationKey: string } {
  return { operationKey: suffix ? `${io.key}/${suffix}` : io.key };
}

function need<T>(v: T | undefined, what: string): T {
  if (v === undefined) throw new FerryError("Internal", `migration state lost: ${what} is missing`);
  return v;
}

function withOfport(spec: ContainerSpec, ofport: number | undefined): ContainerSpec {
  return ofport && spec.network ? { ...spec, network: { ...spec.network, ofport } } : spec;
}

function pathOf(ctx: MigrationCtx): PathSwitch {
  const spec = need(ctx.out.spec, "spec");
  const ip = (spec.network?.ipCidr ?? "").split("/")[0] ?? "";
  return {
    container: ctx.container,
    ip,
    mac: spec.network?.mac ?? "",
    from: { host: ctx.source.name, ...(ctx.out.sourceOfport ? { ofport: ctx.out.sourceOfport } : {}) },
    to: { host: ctx.dest.name, ...(ctx.out.destOfport ? { ofport: ctx.out.destOfport } : {}) },
    migrationId: ctx.id,
  };
}

/**
 * Pull one blob from the source into the destination, counting bytes and MB/s. The destination's
 * time on the call (its trailer, through `opts`) is the work: the copy from the source included.
 */
async function pull(ctx: MigrationCtx, io: StepIo, blob: BlobRef, suffix: string, opts: CallOpts): Promise<void> {
  for await (const p of ctx.dest.client.pullBlob(
    { ...call(io, suffix), blob, sourceAddress: ctx.source.address, sourceServerName: ctx.source.tlsServerName, chunkBytes: 1 << 20 },
    opts,
  )) {
    if (p.done && p.stats) {
      io.addBytes(p.stats.bytes - p.stats.resumedFrom);
      io.detail(`${suffix}_mb_per_s`, p.stats.mbPerS);
    }
  }
}

/**
 * What the steps need of the container, from its source agent's answer to InspectContainer:
 * NotFound without a spec, FailedPrecondition unless it runs.
 */
export function outputsOfInspected(info: ContainerInfo | undefined, container: string, source: string): MigrationOutputs {
  if (!info?.spec) throw FerryError.notFound("container", container);
  if (info.state !== ContainerState.CONTAINER_STATE_RUNNING) {
    throw new FerryError("FailedPrecondition", `container "${container}" is not running on ${source}`, {
      fix: "only a running container can be live-migrated; start it first",
    });
  }
  return {
    spec: info.spec,
    imageDigest: info.imageDigest,
    // The path switch's revert points the flows back at this port: without it a rollback fails.
    ...(info.spec.network?.ofport ? { sourceOfport: info.spec.network.ofport } : {}),
  };
}

/** How much of the image a newly opened peer connection reads before the freeze (see prepare-image). */
export const PEER_WARM_BYTES = 1024 * 1024;

const prepareImage: Step<MigrationCtx> = {
  name: "prepare-image",
  timeoutMs: 600_000,
  retry: retry(4),
  async run(ctx, io) {
    const digest = need(ctx.out.imageDigest, "image digest");
    // Whether the destination has the image: StartMigration's pre-checks asked it (admission counts the image's bytes).
    const partial = need(ctx.out.partial, "whether the destination has the image");
    io.detail("partial", partial ? 1 : 0);
    // The destination's channel to the source, connected now: the pulls inside the downtime find
    // the TCP, TLS and HTTP/2 handshakes done (~100 ms over a 20 ms link), and a source the
    // destination cannot reach fails the migration here, before the freeze. A connection opened
    // now is warmed with 1 MiB of the image (both hold it): the checkpoint's pull then starts at
    // an open TCP window, not the initial one. A full migration's image pull warms it anyway.
    const r = await ctx.dest.client.connectPeer(
      {
        address: ctx.source.address,
        serverName: ctx.source.tlsServerName,
        ...(partial ? { warmDigest: digest, warmBytes: PEER_WARM_BYTES } : {}),
      },
      agentOpts(io, ctx.dest),
    );
    io.detail("peer_connect_ms", r.connectMs);
    if (r.warmedBytes) {
      io.detail("peer_warmed_bytes", r.warmedBytes);
      io.detail("peer_warm_ms", r.warmMs);
    }
    if (!partial) {
      // Full migration: the image travels too, but ahead of the freeze, so not in the downtime.
      const { complete, receivedBytes } = await ctx.source.client.getBlobStatus({ digest }, agentOpts(io, ctx.source));
      if (!complete) throw new FerryError("FailedPrecondition", `the source ${ctx.source.name} does not hold the image ${digest} any more`);
      await pull(ctx, io, { digest, sizeBytes: receivedBytes, kind: BlobKind.BLOB_KIND_IMAGE }, "image", agentOpts(io, ctx.dest));
      // Name it there as on the source, unless that name means another image there: the
      // destination can then run new containers of this image by name too.
      const name = need(ctx.out.spec, "spec").image;
      if (!name.startsWith("sha256:")) {
        const { images } = await ctx.dest.client.listImages({}, agentOpts(io, ctx.dest));
        if (!images.some((i) => i.name === name))
          await ctx.dest.client.tagImage({ ...call(io, "tag"), name, digest }, agentOpts(io, ctx.dest));
      }
    }
  },
};

const prepareNetns: Step<MigrationCtx> = {
  name: "prepare-netns",
  timeoutMs: 30_000,
  retry: retry(3),
  async run(ctx, io) {
    const spec = need(ctx.out.spec, "spec");
    // Created locked: same IP and MAC as the source, unreachable until the path switch, and
    // holding (not resetting) the client's retransmissions until the restore releases the lock.
    // ofport 0: the destination allocates its own (the source's number may be taken there).
    const network = { ...spec.network!, ofport: 0 };
    const r = await ctx.dest.client.createNetns(
      { ...call(io), container: ctx.container, network, networkLocked: true },
      agentOpts(io, ctx.dest),
    );
    ctx.out.destOfport = r.ofport;
  },
  async compensate(ctx, io) {
    await ctx.dest.client.clearNetns({ ...call(io), container: ctx.container }, agentOpts(io, ctx.dest));
  },
};

const checkpoint: Step<MigrationCtx> = {
  name: "checkpoint",
  timeoutMs: 120_000,
  retry: downtimeRetry,
  inDowntime: true,
  async run(ctx, io) {
    // The source packs the blobs in the same call (exportBlobs): the transfer starts with the
    // pulls, one round trip to the source sooner. An agent that predates it, or whose pack
    // failed, answers without them, and the transfer asks for them (ExportCheckpoint).
    const r = await checkpointCall(ctx, io, io.key);
    // Saved with the step's DONE: an undo that finds no id here asks the source (see below).
    ctx.out.checkpointId = r.checkpointId;
    ctx.out.connections = r.connections;
    keepBlobs(ctx, io, r.blobs);
    const s = r.stats;
    if (s) {
      io.detail("criu_frozen_ms", s.frozenMs);
      io.detail("criu_freezing_ms", s.freezingMs);
      io.detail("pages_written", s.pagesWritten);
      io.detail("image_bytes", s.imageBytes);
    }
    io.detail("tcp_connections", r.connections.length);
  },
  async compensate(ctx, io) {
    // Roll back: the source still has the checkpoint; bring the container back from it there.
    const { container } = await ctx.source.client
      .inspectContainer({ name: ctx.container }, agentOpts(io, ctx.source))
      .catch(() => ({ container: undefined }));
    // The blobs the dump was packed into go first, whatever comes next (a repeated undo finds
    // the container running). A controller that died before the DONE never saved them: the same
    // call again, under the run's operation key, is answered from the source's record.
    if (!ctx.out.checkpointBlob && container?.state === ContainerState.CONTAINER_STATE_CHECKPOINTED) {
      // An error: not recorded, so nothing was packed that the source could name.
      const again = await checkpointCall(ctx, io, `${ctx.id}/checkpoint`).catch(() => undefined);
      keepBlobs(ctx, io, again?.blobs);
    }
    await inParallel(io, blobDeletions(ctx, io, "source"));
    if (container?.state === ContainerState.CONTAINER_STATE_RUNNING) return;
    // A controller that died between the dump and its DONE never saved the id; the source, whose
    // container is CHECKPOINTED by exactly that dump, has it.
    const checkpointId =
      ctx.out.checkpointId || (container?.state === ContainerState.CONTAINER_STATE_CHECKPOINTED ? container.checkpointId : "");
    if (!checkpointId) {
      if (container) return; // the dump never happened: the container was left as it was
      throw new FerryError("Internal", `container "${ctx.container}" is gone from ${ctx.source.name} and no checkpoint was recorded`);
    }
    await ctx.source.client.restore({ ...call(io), spec: ctx.out.spec, checkpointId, tcpEstablished: true }, agentOpts(io, ctx.source));
  },
};

const transfer: Step<MigrationCtx> = {
  name: "transfer",
  timeoutMs: 300_000,
  retry: downtimeRetry,
  inDowntime: true,
  async run(ctx, io) {
    // Packed by the checkpoint, or now. Not saved before the pulls (the undo can ask again,
    // below): with the step's DONE.
    const { checkpointBlob, upperBlob } = await sourceBlobs(ctx, io);
    // The two pulls overlap: the longer one is the work (the export's time came with its call).
    await inParallel(io, [
      [ctx.dest, (o) => pull(ctx, io, checkpointBlob, "checkpoint", o)],
      [ctx.dest, (o) => pull(ctx, io, upperBlob, "upper", o)],
    ]);
  },
  async compensate(ctx, io) {
    // A controller that died before the DONE never saved which blobs the export made: asked
    // again with the same operation key, the source answers with the same ones (or exports now,
    // for them to be deleted at once).
    // An export that fails made no blobs: nothing more to find.
    if (ctx.out.checkpointId) await sourceBlobs(ctx, io).catch(() => undefined);
    // Both copies: the one pulled to the destination and the one exported on the source.
    await inParallel(io, [...blobDeletions(ctx, io, "dest"), ...blobDeletions(ctx, io, "source")]);
  },
};

/**
 * Checkpoint on the source, packing the blobs in the same call (export_blobs), under
 * `operationKey`: the step's own, or, from its undo, the run's again (answered from the record).
 */
function checkpointCall(ctx: MigrationCtx, io: StepIo, operationKey: string): Promise<CheckpointResponse> {
  return ctx.source.client.checkpoint(
    { operationKey, name: ctx.container, tcpEstablished: true, exportBlobs: true },
    agentOpts(io, ctx.source),
  );
}

/** Keep the blobs a checkpoint or an export made (both, or none: an older agent's checkpoint packs none). */
function keepBlobs(ctx: MigrationCtx, io: StepIo, blobs: ExportCheckpointResponse | undefined): void {
  if (!blobs?.checkpoint || !blobs.upper) return;
  ctx.out.checkpointBlob = blobs.checkpoint;
  ctx.out.upperBlob = blobs.upper;
  io.detail("export_ms", blobs.durationMs);
}

/**
 * The checkpoint and upper dir packed into blobs on the source: those the checkpoint made, or an
 * export now (an older agent), one operation whoever asks.
 */
async function sourceBlobs(ctx: MigrationCtx, io: StepIo): Promise<{ checkpointBlob: BlobRef; upperBlob: BlobRef }> {
  if (!ctx.out.checkpointBlob || !ctx.out.upperBlob) {
    const ex = await ctx.source.client.exportCheckpoint(
      { operationKey: `${ctx.id}/transfer/export`, name: ctx.container, checkpointId: need(ctx.out.checkpointId, "checkpoint id") },
      agentOpts(io, ctx.source),
    );
    keepBlobs(ctx, io, ex);
  }
  return { checkpointBlob: need(ctx.out.checkpointBlob, "checkpoint blob"), upperBlob: need(ctx.out.upperBlob, "upper blob") };
}

/** Only in records saved by an older controller: see the diagram at the top. */
const clearSourceNetns: Step<MigrationCtx> = {
  name: "clear-source-netns",
  timeoutMs: 30_000,
  retry: downtimeRetry,
  inDowntime: true,
  async run(ctx, io) {
    const r = await ctx.source.client.clearNetns({ ...call(io), container: ctx.container }, agentOpts(io, ctx.source));
    io.detail("veth_wait_ms", r.waitMs);
  },
  async compensate(ctx, io) {
    // The source's restore (the checkpoint's undo, which runs after this) needs its namespace
    // back, locked as CRIU left it.
    const spec = need(ctx.out.spec, "spec");
    const network = { ...spec.network!, ofport: ctx.out.sourceOfport ?? spec.network?.ofport ?? 0 };
    await ctx.source.client
      .createNetns({ ...call(io), container: ctx.container, network, networkLocked: true }, agentOpts(io, ctx.source))
      .catch((e: unknown) => {
        if ((e as FerryError).code !== "AlreadyExists") throw e;
      });
  },
};

const switchPath: Step<MigrationCtx> = {
  name: "switch-path",
  timeoutMs: 20_000,
  retry: downtimeRetry,
  inDowntime: true,
  async run(ctx, io) {
    const r = await ctx.sdn.switchPath(pathOf(ctx), io.signal);
    addWork(io, r.durationMs);
    for (const [k, v] of Object.entries(r.details)) io.detail(k, v);
  },
  async compensate(ctx, io) {
    await ctx.sdn.revert(pathOf(ctx), io.signal);
  },
};

const restore: Step<MigrationCtx> = {
  name: "restore",
  timeoutMs: 120_000,
  retry: downtimeRetry,
  inDowntime: true,
  async run(ctx, io) {
    const r = await ctx.dest.client.restore(
      {
        ...call(io),
        // The destination's ofport, so that its ContainerInfo (and the next migration) has the real port.
        spec: withOfport(need(ctx.out.spec, "spec"), ctx.out.destOfport),
        checkpointBlob: need(ctx.out.checkpointBlob, "checkpoint blob"),
        upperBlob: need(ctx.out.upperBlob, "upper blob"),
        tcpEstablished: true,
        imageDigest: need(ctx.out.imageDigest, "image digest"),
        // Used once: the destination deletes them itself, sparing cleanup-source two calls to it.
        deleteBlobs: true,
      },
      agentOpts(io, ctx.dest),
    );
    ctx.out.destBlobsDeleted = r.blobsDeleted;
    if (r.stats) {
      io.detail("criu_restore_ms", r.stats.restoreMs);
      io.detail("runc_restore_ms", r.stats.runcMs);
      io.detail("unpack_ms", r.stats.unpackMs);
      io.detail("held_packets", r.stats.heldPackets);
    }
  },
  async compensate(ctx, io) {
    // A restore that failed half-way may have left a container behind on the destination.
    await ctx.dest.client
      .deleteContainer({ ...call(io), name: ctx.container, force: true, keepNetns: true }, agentOpts(io, ctx.dest))
      .catch((e: unknown) => {
        if ((e as FerryError).code !== "NotFound") throw e;
      });
  },
};

const cleanupSource: Step<MigrationCtx> = {
  name: "cleanup-source",
  timeoutMs: 60_000,
  retry: retry(6),
  async run(ctx, io) {
    // Independent deletions, all at once; the transfer's blobs served their purpose (the
    // destination unpacked them, and deleted its copies unless its agent predates that).
    await inParallel(io, [
      [
        ctx.source,
        (o) =>
          ctx.source.client
            // and its namespace (kept locked until now; see the diagram at the top)
            .deleteContainer({ ...call(io, "container"), name: ctx.container, force: true, keepNetns: false }, o)
            .catch(ignoreNotFound),
      ],
      ...(ctx.out.checkpointId
        ? [
            [
              ctx.source,
              (o: CallOpts) =>
                ctx.source.client
                  .deleteCheckpoint({ ...call(io, "checkpoint"), checkpointId: ctx.out.checkpointId! }, o)
                  .catch(ignoreNotFound),
            ] as Call,
          ]
        : []),
      ...blobDeletions(ctx, io, "source"),
      ...(ctx.out.destBlobsDeleted ? [] : blobDeletions(ctx, io, "dest")),
    ]);
  },
};

type Call = [HostHandle, (opts: CallOpts) => Promise<unknown>];

/** Deleting the checkpoint and upper blobs on one side (an absent blob is fine). */
function blobDeletions(ctx: MigrationCtx, io: StepIo, side: "source" | "dest"): Call[] {
  const host = side === "source" ? ctx.source : ctx.dest;
  return [ctx.out.checkpointBlob, ctx.out.upperBlob]
    .filter((b): b is BlobRef => b !== undefined)
    .map((blob) => [
      host,
      (o: CallOpts) =>
        host.client.deleteBlob({ ...call(io, `${side}-${blob.digest.slice(7, 19)}`), digest: blob.digest }, o).catch(ignoreNotFound),
    ]);
}

/** Steps that prepare the destination in parallel, before the freeze. */
export const PREPARE_GROUP = "prepare";

/** Steps that run in parallel inside the downtime: none waits for another. */
export const TRANSFER_GROUP = "transfer";

/**
 * The stop-and-copy pipeline (COAT's steps, the transfer and the path switch in parallel).
 * `saved`: the step names of a record being resumed; one made by an older controller that
 * cleared the source's namespace inside the downtime resumes with that step, so that its
 * rollback still puts the namespace back.
 */
export function stopAndCopyPipeline(saved: readonly string[] = []): Stage<MigrationCtx>[] {
  const legacy = saved.includes(clearSourceNetns.name);
  return [
    // Independent, both ahead of the freeze: the image (if missing) and the locked namespace.
    { group: PREPARE_GROUP, steps: [prepareImage, prepareNetns] },
    checkpoint,
    { group: TRANSFER_GROUP, steps: legacy ? [transfer, clearSourceNetns, switchPath] : [transfer, switchPath] },
    restore,
    cleanupSource,
  ];
}

export const COMMIT_STEP = "restore";

/**
 * Steps older controllers ran that did nothing to undo: a resumed record drops them, so that a
 * rollback does not stop at a step this version does not know.
 */
export const RETIRED_STEPS: ReadonlySet<string> = new Set(["inspect"]);
