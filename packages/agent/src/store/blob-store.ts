import { createHash, randomBytes, type Hash } from "node:crypto";
import { createReadStream } from "node:fs";
import { mkdir, open, readFile, readdir, rename, rm, stat, statfs, unlink, writeFile, chmod, type FileHandle } from "node:fs/promises";
import path from "node:path";
import { BlobKind, type BlobRef, type ImageInfo } from "@ferry/api/agent";
import {
  ExecError,
  FerryError,
  asFerryError,
  exec,
  safeJoin,
  silentLogger,
  validateDigest,
  validateImageName,
  type Logger,
} from "@ferry/common";

// Layout under `root`:
//   sha256/<hex>            complete blobs, verified, read-only
//   meta/<hex>.json         { sizeBytes, kind } of a complete blob
//   partial/<hex>           an upload or pull in progress (append-only)
//   partial/<hex>.json      { digest, sizeBytes, kind } it was started with
//   images/<name>.json      a tag: { name, digest, sizeBytes }
//   unpacked/<hex>/         an IMAGE blob unpacked once, used as an overlay lower dir
//   tmp/                    scratch (pack output, unpack staging); emptied at init

/** Free bytes on the filesystem holding `dir` (injectable so tests can simulate a full disk). */
export type FreeSpaceFn = (dir: string) => Promise<number>;

export interface BlobStoreOptions {
  root: string;
  log?: Logger;
  /** Default: statfs(root).bavail * bsize. */
  freeBytes?: FreeSpaceFn;
  /** fsync a blob before it becomes visible (default true): a crash never leaves a named blob with wrong content. */
  fsync?: boolean;
  /**
   * Who uses a blob (e.g. a container whose overlay lower is this image), so that delete refuses
   * instead of pulling files out from under it. Returns a description of the user, or undefined.
   */
  inUse?: (digest: string) => Promise<string | undefined>;
  /** GNU tar binary (default "tar"). */
  tar?: string;
}

export interface BlobStatus {
  complete: boolean;
  receivedBytes: number;
}

/** GNU tar flags that keep what overlay upper dirs and CRIU images need. */
const TAR_COMMON = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls"];
// posix (pax) format is the one that carries xattrs; --sparse stores holes as holes.
const TAR_CREATE = ["--create", "--format=posix", "--sparse", ...TAR_COMMON];
// --same-owner/--same-permissions are root's defaults; said explicitly since they are the point.
const TAR_EXTRACT = ["--extract", "--same-owner", "--same-permissions", "--delay-directory-restore", ...TAR_COMMON];
const TAR_TIMEOUT_MS = 30 * 60_000;

const KIND_NAMES: Record<number, string> = {
  [BlobKind.BLOB_KIND_UNSPECIFIED]: "unspecified",
  [BlobKind.BLOB_KIND_IMAGE]: "image",
  [BlobKind.BLOB_KIND_UPPER]: "upper",
  [BlobKind.BLOB_KIND_CHECKPOINT]: "checkpoint",
};

const hexOf = (digest: string): string => digest.slice("sha256:".length);

/** "sha256:<hex>" of a file's bytes. */
async function sha256File(file: string): Promise<string> {
  const hash = createHash("sha256");
  for await (const b of createReadStream(file, { highWaterMark: 1 << 20 })) hash.update(b as Buffer);
  return `sha256:${hash.digest("hex")}`;
}
const mib = (n: number): string => `${(n / 1024 / 1024).toFixed(1)} MiB`;

async function exists(p: string): Promise<boolean> {
  try {
    await stat(p);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return false;
    throw e;
  }
}

async function readJson<T>(p: string): Promise<T | undefined> {
  try {
    return JSON.parse(await readFile(p, "utf8")) as T;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw e;
  }
}

/** Write a small file so that readers see the old or the new content, never half of one. */
async function writeJsonAtomic(p: string, value: unknown): Promise<void> {
  const tmp = `${p}.${randomBytes(4).toString("hex")}.tmp`;
  await writeFile(tmp, JSON.stringify(value) + "\n");
  await rename(tmp, p);
}

const defaultFreeBytes: FreeSpaceFn = async (dir) => {
  const s = await statfs(dir);
  return s.bavail * s.bsize;
};

function tarFailure(e: unknown, what: string): FerryError {
  if (e instanceof ExecError && /No space left on device/.test(e.stderr)) {
    return new FerryError("ResourceExhausted", `${what}: no space left on device`, { fix: "free disk space on this host", cause: e });
  }
  return new FerryError("Internal", `${what}: ${(e as Error).message}`, { cause: e });
}

/**
 * An open upload or pull of one blob into partial/<hex>: append chunks at the expected offset,
 * hash as they come, and {@link commit} verifies and publishes the blob atomically. {@link close}
 * keeps the partial so that a later transfer resumes from {@link received}.
 */
export class BlobWriter {
  private closed = false;

  /** @internal created by {@link BlobStore.openWriter} */
  constructor(
    private readonly store: BlobStore,
    readonly ref: BlobRef,
    private readonly fh: FileHandle,
    private readonly hash: Hash,
    private receivedBytes: number,
    /** Bytes that were already there when this writer opened (resume point). */
    readonly resumedFrom: number,
    private readonly release: () => void,
  ) {}

  /** Bytes of the blob now in the partial file. */
  get received(): number {
    return this.receivedBytes;
  }

  /** Append one chunk. Chunks past the blob's declared size are refused. */
  async write(chunk: Uint8Array): Promise<void> {
    if (this.closed) throw new FerryError("Internal", "write after the blob writer was closed");
    const end = this.receivedBytes + chunk.length;
    if (end > this.ref.sizeBytes) {
      throw FerryError.invalid(
        "blob.size_bytes",
        `chunk ends at byte ${end}, past the blob's declared size ${this.ref.sizeBytes}`,
        "declare the blob's real size, or send only its bytes",
      );
    }
    // The write runs on the thread pool while this thread hashes the same bytes.
    const written = this.writeFully(chunk);
    this.hash.update(chunk);
    await written;
    this.receivedBytes = end;
  }

  private async writeFully(chunk: Uint8Array): Promise<void> {
    let off = 0;
    while (off < chunk.length) {
      const { bytesWritten } = await this.fh.write(chunk, off, chunk.length - off, null);
      off += bytesWritten;
    }
  }

  /**
   * Verify size and sha256 and publish the blob at sha256/<hex>. On a digest mismatch the partial
   * is deleted (its bytes are wrong somewhere, resuming would not help) and DataLoss is thrown.
   */
  async commit(): Promise<BlobRef> {
    if (this.receivedBytes !== this.ref.sizeBytes) {
      throw new FerryError(
        "FailedPrecondition",
        `blob ${this.ref.digest} is incomplete: ${this.receivedBytes} of ${this.ref.sizeBytes} bytes received`,
        { fix: `send the rest starting at offset ${this.receivedBytes}` },
      );
    }
    const actual = `sha256:${this.hash.digest("hex")}`;
    if (actual !== this.ref.digest) {
      await this.close();
      await this.store.discardPartial(this.ref.digest);
      throw new FerryError("DataLoss", `received data has digest ${actual}, expected ${this.ref.digest}; the partial blob was deleted`, {
        field: "blob.digest",
        fix: "transfer the blob again; if it fails again, the source's copy or the digest is wrong",
        data: { expected: this.ref.digest, actual },
      });
    }
    if (this.store.fsync) await this.fh.datasync();
    await this.close();
    return this.store.publish(this.ref);
  }

  /** Close the file; the partial stays for a resume. Safe to call twice. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.release();
    await this.fh.close();
  }
}

/**
 * The agent's content-addressed store: blobs by sha256 (images, container upper dirs,
 * checkpoints as tars), resumable partial transfers, image tags and unpacked image lower dirs.
 */
export class BlobStore {
  readonly root: string;
  readonly fsync: boolean;
  private readonly log: Logger;
  private readonly freeBytes: FreeSpaceFn;
  private readonly inUse: BlobStoreOptions["inUse"];
  private readonly tar: string;
  /** Blobs with an open writer: a second concurrent transfer of one blob is refused. */
  private readonly writing = new Set<string>();
  /** Unpacks in progress, so concurrent lowerDir() calls share one. */
  private readonly unpacking = new Map<string, Promise<string>>();
  private initialized: Promise<void> | undefined;

  constructor(opts: BlobStoreOptions) {
    this.root = path.resolve(opts.root);
    this.log = opts.log ?? silentLogger;
    this.freeBytes = opts.freeBytes ?? defaultFreeBytes;
    this.fsync = opts.fsync ?? true;
    this.inUse = opts.inUse;
    this.tar = opts.tar ?? "tar";
  }

  private dir(sub: "sha256" | "meta" | "partial" | "images" | "unpacked" | "tmp"): string {
    return path.join(this.root, sub);
  }
  private blobPath(digest: string): string {
    return safeJoin(this.dir("sha256"), hexOf(digest));
  }
  private metaPath(digest: string): string {
    return safeJoin(this.dir("meta"), `${hexOf(digest)}.json`);
  }
  private partialPath(digest: string): string {
    return safeJoin(this.dir("partial"), hexOf(digest));
  }
  private unpackedPath(digest: string): string {
    return safeJoin(this.dir("unpacked"), hexOf(digest));
  }

  /** Create the layout and drop scratch left by a crash (half unpacks, half packs). Idempotent. */
  init(): Promise<void> {
    this.initialized ??= (async () => {
      await rm(this.dir("tmp"), { recursive: true, force: true });
      for (const d of ["sha256", "meta", "partial", "images", "unpacked", "tmp"] as const) {
        await mkdir(this.dir(d), { recursive: true, mode: 0o700 });
      }
    })();
    return this.initialized;
  }

  /** Which digests are complete here. Every digest is validated. */
  async has(digests: readonly string[]): Promise<{ present: string[]; missing: string[] }> {
    await this.init();
    const present: string[] = [];
    const missing: string[] = [];
    for (const [i, d] of digests.entries()) {
      validateDigest(`digests[${i}]`, d);
      ((await exists(this.blobPath(d))) ? present : missing).push(d);
    }
    return { present, missing };
  }

  /** Complete, or how many bytes of a partial transfer are here (0 when nothing is). */
  async status(digest: string): Promise<BlobStatus> {
    await this.init();
    validateDigest("digest", digest);
    try {
      const s = await stat(this.blobPath(digest));
      return { complete: true, receivedBytes: s.size };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
    }
    try {
      return { complete: false, receivedBytes: (await stat(this.partialPath(digest))).size };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return { complete: false, receivedBytes: 0 };
      throw e;
    }
  }

  /** A complete blob's size and kind; NotFound when it is not (completely) here. */
  async stat(digest: string, field = "digest"): Promise<BlobRef> {
    await this.init();
    validateDigest(field, digest);
    let size: number;
    try {
      size = (await stat(this.blobPath(digest))).size;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") {
        throw new FerryError("NotFound", `blob ${digest} not found on this host`, {
          field,
          fix: "push or pull the blob first (HasBlobs lists what is here)",
        });
      }
      throw e;
    }
    const meta = await readJson<{ kind?: BlobKind }>(this.metaPath(digest));
    return { digest, sizeBytes: size, kind: meta?.kind ?? BlobKind.BLOB_KIND_UNSPECIFIED };
  }

  /** Refuse with ResourceExhausted, naming the need and the free amount, when `need` bytes do not fit. */
  async ensureSpace(need: number, what: string): Promise<void> {
    await this.init();
    const free = await this.freeBytes(this.root);
    if (need > free) {
      throw new FerryError(
        "ResourceExhausted",
        `not enough disk space for ${what}: need ${need} bytes (${mib(need)}), ${free} bytes (${mib(free)}) free in ${this.root}`,
        {
          fix: "free disk space on this host or choose another host",
          data: { resource: "disk", needBytes: need, freeBytes: free, path: this.root },
        },
      );
    }
  }

  /**
   * Open a writer for `ref`, appending at `offset` ("resume": wherever the partial ends). An
   * explicit offset that is not the partial's size is refused with FailedPrecondition naming
   * where to resume. Checks free space for the remaining bytes. Throws AlreadyExists when the
   * blob is already complete, Aborted when another transfer of it is running.
   */
  async openWriter(ref: BlobRef, offset: number | "resume", field = "blob"): Promise<BlobWriter> {
    await this.init();
    validateDigest(`${field}.digest`, ref.digest);
    if (!Number.isSafeInteger(ref.sizeBytes) || ref.sizeBytes < 0)
      throw FerryError.invalid(`${field}.size_bytes`, `${ref.sizeBytes} is not a size`, "give the blob's size in bytes");
    if (await exists(this.blobPath(ref.digest))) {
      throw new FerryError("AlreadyExists", `blob ${ref.digest} is already complete on this host`, { field: `${field}.digest` });
    }
    if (this.writing.has(ref.digest)) {
      throw new FerryError("Aborted", `another transfer of blob ${ref.digest} is in progress on this host`, {
        fix: "retry when it has ended",
      });
    }
    this.writing.add(ref.digest);
    const release = (): void => void this.writing.delete(ref.digest);
    let fh: FileHandle | undefined;
    try {
      const partial = this.partialPath(ref.digest);
      const metaFile = `${partial}.json`;
      const meta = await readJson<{ sizeBytes: number; kind: BlobKind }>(metaFile);
      let have = 0;
      if (meta) {
        have = await stat(partial).then(
          (s) => s.size,
          () => 0,
        );
        if (meta.sizeBytes !== ref.sizeBytes) {
          throw FerryError.invalid(
            `${field}.size_bytes`,
            `blob ${ref.digest} was started with size ${meta.sizeBytes}, not ${ref.sizeBytes}`,
            "send the blob's real size (a digest has only one size), or DeleteBlob the partial first",
          );
        }
      } else {
        // Metadata first: a partial file never exists without the size it must reach.
        await writeJsonAtomic(metaFile, { digest: ref.digest, sizeBytes: ref.sizeBytes, kind: ref.kind });
        await rm(partial, { force: true });
      }
      const start = offset === "resume" ? have : offset;
      if (start !== have) {
        throw new FerryError(
          "FailedPrecondition",
          `offset ${start} does not match the ${have} bytes of blob ${ref.digest} already received`,
          {
            field: "offset",
            fix: `resume at offset ${have}`,
            data: { receivedBytes: have },
          },
        );
      }
      await this.ensureSpace(ref.sizeBytes - have, `blob ${ref.digest}`);
      const hash = createHash("sha256");
      // On resume the hash state is gone with the previous process: re-hash what is there.
      if (have > 0) {
        for await (const b of createReadStream(partial, { highWaterMark: 1 << 20 })) hash.update(b as Buffer);
      }
      fh = await open(partial, "a", 0o600);
      return new BlobWriter(this, ref, fh, hash, have, have, release);
    } catch (e) {
      release();
      await fh?.close();
      throw e;
    }
  }

  /**
   * @internal the partial is complete and verified: make it the blob. An IMAGE blob is also
   * unpacked now, while it is being pushed or pulled (a migration pulls the image before the
   * freeze): otherwise the first container made from it here, a migration's restore included,
   * would unpack it inside the downtime. A failed unpack is only logged: the blob is stored, and
   * the first use unpacks again and reports why.
   */
  async publish(ref: BlobRef): Promise<BlobRef> {
    const partial = this.partialPath(ref.digest);
    await writeJsonAtomic(this.metaPath(ref.digest), { sizeBytes: ref.sizeBytes, kind: ref.kind });
    await chmod(partial, 0o444);
    await rename(partial, this.blobPath(ref.digest));
    await rm(`${partial}.json`, { force: true });
    this.log.info({ digest: ref.digest, bytes: ref.sizeBytes, kind: KIND_NAMES[ref.kind] }, "blob stored");
    if (ref.kind === BlobKind.BLOB_KIND_IMAGE) {
      await this.lowerDir(ref.digest).catch((e: unknown) => {
        this.log.warn({ digest: ref.digest, err: asFerryError(e).message }, "image not unpacked ahead of use");
      });
    }
    return { ...ref };
  }

  /** @internal drop a partial transfer (after a digest mismatch). */
  async discardPartial(digest: string): Promise<void> {
    const partial = this.partialPath(digest);
    await rm(partial, { force: true });
    await rm(`${partial}.json`, { force: true });
  }

  /**
   * A complete blob from `offset`, in chunks of `chunkBytes`, read as the consumer pulls (one
   * chunk of buffering: memory stays flat). NotFound for an unknown digest.
   */
  async *read(digest: string, offset: number, chunkBytes: number, limitBytes = 0): AsyncGenerator<Buffer> {
    const ref = await this.stat(digest);
    if (!Number.isSafeInteger(offset) || offset < 0 || offset > ref.sizeBytes) {
      throw FerryError.invalid(
        "offset",
        `offset ${offset} is outside blob ${digest} of ${ref.sizeBytes} bytes`,
        `use an offset from 0 to ${ref.sizeBytes}`,
      );
    }
    if (offset === ref.sizeBytes) return;
    const end = limitBytes > 0 ? Math.min(ref.sizeBytes, offset + limitBytes) - 1 : undefined;
    yield* createReadStream(this.blobPath(digest), { start: offset, end, highWaterMark: chunkBytes }) as AsyncIterable<Buffer>;
  }

  /** Path of a complete blob, for local readers (e.g. tar). NotFound when absent. */
  async pathOf(digest: string): Promise<string> {
    await this.stat(digest);
    return this.blobPath(digest);
  }

  /**
   * Delete a blob (complete or partial), its unpacked dir and the tags naming it. NotFound when
   * nothing of it is here; FailedPrecondition when `inUse` says something still uses it.
   */
  async delete(digest: string): Promise<void> {
    await this.init();
    validateDigest("digest", digest);
    const user = await this.inUse?.(digest);
    if (user)
      throw new FerryError("FailedPrecondition", `blob ${digest} is in use by ${user}`, { field: "digest", fix: `delete ${user} first` });
    if (this.writing.has(digest))
      throw new FerryError("Aborted", `blob ${digest} is being transferred`, { fix: "retry when the transfer has ended" });
    const partial = this.partialPath(digest);
    const found = (await exists(this.blobPath(digest))) || (await exists(partial)) || (await exists(`${partial}.json`));
    if (!found) throw FerryError.notFound("blob", digest, "HasBlobs lists what is here");
    for (const img of await this.listImages()) {
      if (img.digest === digest) await rm(safeJoin(this.dir("images"), `${img.name}.json`), { force: true });
    }
    // Move the unpacked dir aside first so that a crash mid-delete never leaves a half lower dir in place.
    const unpacked = this.unpackedPath(digest);
    if (await exists(unpacked)) {
      const trash = path.join(this.dir("tmp"), `del-${hexOf(digest)}-${randomBytes(4).toString("hex")}`);
      await rename(unpacked, trash);
      await rm(trash, { recursive: true, force: true });
    }
    await rm(this.blobPath(digest), { force: true });
    await rm(this.metaPath(digest), { force: true });
    await this.discardPartial(digest);
    this.log.info({ digest }, "blob deleted");
  }

  // ------------------------------------------------------------------------------------------
  // images

  /** Name a complete blob as an image (replacing an older tag of that name). */
  async tag(name: string, digest: string): Promise<ImageInfo> {
    validateImageName("name", name);
    const ref = await this.stat(digest);
    if (ref.kind !== BlobKind.BLOB_KIND_IMAGE && ref.kind !== BlobKind.BLOB_KIND_UNSPECIFIED) {
      throw new FerryError("FailedPrecondition", `blob ${digest} is a ${KIND_NAMES[ref.kind] ?? ref.kind} blob, not a root filesystem`, {
        field: "digest",
        fix: "tag a blob pushed with kind BLOB_KIND_IMAGE",
      });
    }
    const info: ImageInfo = { name, digest, sizeBytes: ref.sizeBytes };
    await writeJsonAtomic(safeJoin(this.dir("images"), `${name}.json`), info);
    return info;
  }

  /** Every tagged image, sorted by name. */
  async listImages(): Promise<ImageInfo[]> {
    await this.init();
    const out: ImageInfo[] = [];
    for (const f of (await readdir(this.dir("images"))).sort()) {
      if (!f.endsWith(".json")) continue;
      const info = await readJson<ImageInfo>(path.join(this.dir("images"), f));
      if (info) out.push(info);
    }
    return out;
  }

  /** An image name or "sha256:<hex>" to a digest held here; NotFound otherwise. */
  async resolveImage(ref: string, field = "image"): Promise<string> {
    if (ref.startsWith("sha256:")) {
      await this.stat(ref, field);
      return ref;
    }
    validateImageName(field, ref);
    const info = await readJson<ImageInfo>(safeJoin(this.dir("images"), `${ref}.json`));
    if (!info)
      throw new FerryError("NotFound", `image "${ref}" not found on this host`, {
        field,
        fix: "TagImage a pushed blob with this name, or use its digest",
      });
    return info.digest;
  }

  // ------------------------------------------------------------------------------------------
  // tars

  /**
   * The directory an IMAGE blob unpacks to, unpacked on first use. Unpacks into a scratch dir
   * and renames it into place, so a crash never leaves half a lower dir under the final name.
   */
  lowerDir(digest: string): Promise<string> {
    validateDigest("digest", digest);
    const running = this.unpacking.get(digest);
    if (running) return running;
    const p = this.unpackOnce(digest).finally(() => this.unpacking.delete(digest));
    this.unpacking.set(digest, p);
    return p;
  }

  private async unpackOnce(digest: string): Promise<string> {
    const ref = await this.stat(digest);
    const final = this.unpackedPath(digest);
    if (await exists(final)) return final;
    if (ref.kind !== BlobKind.BLOB_KIND_IMAGE && ref.kind !== BlobKind.BLOB_KIND_UNSPECIFIED) {
      throw new FerryError("FailedPrecondition", `blob ${digest} is a ${KIND_NAMES[ref.kind] ?? ref.kind} blob, not an image`, {
        field: "digest",
        fix: "use an image blob as a lower dir",
      });
    }
    await this.ensureSpace(ref.sizeBytes, `unpacking image ${digest}`);
    const staging = path.join(this.dir("tmp"), `unpack-${hexOf(digest)}-${randomBytes(4).toString("hex")}`);
    await mkdir(staging, { mode: 0o755 });
    try {
      const started = performance.now();
      await this.extract(digest, staging);
      await rename(staging, final);
      this.log.info({ digest, ms: Math.round(performance.now() - started) }, "image unpacked");
    } catch (e) {
      await rm(staging, { recursive: true, force: true });
      // Another agent process may have won the race; its result is as good as ours.
      if (await exists(final)) return final;
      throw e;
    }
    return final;
  }

  /** Unpack a blob (a tar) into `dir` (created if missing), keeping owners, modes, xattrs, devices, holes. */
  async unpackTo(digest: string, dir: string): Promise<void> {
    const ref = await this.stat(digest);
    await this.ensureSpace(ref.sizeBytes, `unpacking blob ${digest}`);
    await mkdir(dir, { recursive: true });
    await this.extract(digest, dir);
  }

  private async extract(digest: string, dir: string): Promise<void> {
    try {
      await exec(this.tar, [...TAR_EXTRACT, `--file=${this.blobPath(digest)}`, "-C", dir], { timeoutMs: TAR_TIMEOUT_MS });
    } catch (e) {
      throw tarFailure(e, `unpacking blob ${digest} into ${dir}`);
    }
  }

  /**
   * Tar a directory into the store as a blob of `kind`: GNU tar (pax format) with numeric owners,
   * modes, all xattrs (overlay's trusted.overlay.* too), ACLs, sparse files and device nodes
   * (overlay whiteouts are char devices 0/0). The digest is read back from the tar just written,
   * still in the page cache: one process (tar) instead of a shell pipeline of four.
   */
  async packDir(dir: string, kind: BlobKind): Promise<BlobRef> {
    await this.init();
    const st = await stat(dir).catch(() => undefined);
    if (!st?.isDirectory())
      throw new FerryError("NotFound", `directory ${dir} not found`, { field: "dir", fix: "pack an existing directory" });
    const out = path.join(this.dir("tmp"), `pack-${randomBytes(6).toString("hex")}.tar`);
    try {
      await exec(this.tar, [...TAR_CREATE, `--file=${out}`, "-C", dir, "."], { timeoutMs: TAR_TIMEOUT_MS }).catch((e: unknown) => {
        throw tarFailure(e, `packing ${dir}`);
      });
      const digest = await sha256File(out);
      const ref: BlobRef = { digest, sizeBytes: (await stat(out)).size, kind };
      if (await exists(this.blobPath(digest))) return await this.stat(digest);
      if (this.fsync) {
        const fh = await open(out, "r");
        await fh.datasync().finally(() => fh.close());
      }
      await writeJsonAtomic(this.metaPath(digest), { sizeBytes: ref.sizeBytes, kind });
      await chmod(out, 0o444);
      await rename(out, this.blobPath(digest));
      this.log.info({ digest, bytes: ref.sizeBytes, kind: KIND_NAMES[kind], dir }, "directory packed");
      return ref;
    } finally {
      await unlink(out).catch(() => undefined);
    }
  }

  /**
   * Add an existing file as a blob (admin import, tests, benchmarks): hashed while copied, or
   * renamed into the store with `move` (same filesystem).
   */
  async importFile(file: string, kind: BlobKind, opts: { move?: boolean } = {}): Promise<BlobRef> {
    await this.init();
    const digest = await sha256File(file);
    const size = (await stat(file)).size;
    if (await exists(this.blobPath(digest))) return this.stat(digest);
    const ref: BlobRef = { digest, sizeBytes: size, kind };
    if (opts.move) {
      // The file becomes the partial, already verified: published like any other blob.
      await rename(file, this.partialPath(digest));
      return this.publish(ref);
    }
    const w = await this.openWriter(ref, "resume", "file");
    try {
      // A partial of the same digest holds the same leading bytes: continue after them.
      for await (const b of createReadStream(file, { start: w.received, highWaterMark: 1 << 20 })) await w.write(b as Buffer);
      return await w.commit();
    } finally {
      await w.close();
    }
  }
}
