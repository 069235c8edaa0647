import { createHash, randomBytes } from "node:crypto";
import {
  chown,
  lstat,
  mkdir,
  mkdtemp,
  open,
  readFile,
  readlink,
  readdir,
  rm,
  stat,
  symlink,
  writeFile,
  chmod,
  link,
} from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { BlobKind } from "@ferry/api/agent";
import { FerryError, exec } from "@ferry/common";
import { BlobStore } from "./blob-store.js";

const isRoot = process.getuid?.() === 0;
const MiB = 1024 * 1024;
let work: string;

beforeAll(async () => {
  work = await mkdtemp(path.join(tmpdir(), "ferry-store-t-"));
});
afterAll(async () => {
  await rm(work, { recursive: true, force: true });
});

async function getXattr(file: string, name: string): Promise<string | undefined> {
  const script = "import os,sys\ntry: sys.stdout.write(os.getxattr(sys.argv[1], sys.argv[2]).decode())\nexcept OSError: pass";
  return (await exec("python3", ["-c", script, file, name])).stdout || undefined;
}

describe("BlobStore tars", () => {
  it.skipIf(!isRoot)("packDir/unpackTo keep modes, owners, symlinks, hard links, whiteouts, xattrs and holes", async () => {
    const store = new BlobStore({ root: path.join(work, "store1") });
    const src = path.join(work, "upper");
    await mkdir(path.join(src, "etc/app"), { recursive: true });
    await writeFile(path.join(src, "etc/app/config"), "port=8080\n");
    await chmod(path.join(src, "etc/app/config"), 0o640);
    await chown(path.join(src, "etc/app/config"), 1234, 1234);
    await chmod(path.join(src, "etc/app"), 0o751);
    await writeFile(path.join(src, "suid"), "#!/bin/sh\n");
    await chmod(path.join(src, "suid"), 0o4755);
    await symlink("etc/app/config", path.join(src, "link"));
    await symlink("/does/not/exist", path.join(src, "dangling"));
    await link(path.join(src, "etc/app/config"), path.join(src, "hardlink"));
    // An overlayfs whiteout (a deleted lower file) and an opaque directory.
    await exec("mknod", [path.join(src, "deleted-file"), "c", "0", "0"]);
    await mkdir(path.join(src, "opaque"));
    await exec("python3", ["-c", "import os,sys; os.setxattr(sys.argv[1], 'trusted.overlay.opaque', b'y')", path.join(src, "opaque")]);
    // A sparse file: 64 MiB with one written byte in the middle (CRIU pages images can be sparse).
    const sparse = path.join(src, "pages.img");
    const fh = await open(sparse, "w");
    await fh.write(Buffer.from("x"), 0, 1, 32 * MiB);
    await fh.truncate(64 * MiB);
    await fh.close();

    const ref = await store.packDir(src, BlobKind.BLOB_KIND_UPPER);
    expect(ref.kind).toBe(BlobKind.BLOB_KIND_UPPER);
    expect(ref.sizeBytes).toBeLessThan(MiB); // the hole was not stored as zeros
    const blob = await readFile(await store.pathOf(ref.digest));
    expect(`sha256:${createHash("sha256").update(blob).digest("hex")}`).toBe(ref.digest);
    expect(blob.length).toBe(ref.sizeBytes);
    expect((await store.stat(ref.digest)).kind).toBe(BlobKind.BLOB_KIND_UPPER);
    // Packing the same content again gives the same blob, already stored.
    expect((await store.has([ref.digest])).present).toEqual([ref.digest]);

    const dst = path.join(work, "restored");
    await store.unpackTo(ref.digest, dst);
    const cfg = await stat(path.join(dst, "etc/app/config"));
    expect(cfg.mode & 0o7777).toBe(0o640);
    expect([cfg.uid, cfg.gid]).toEqual([1234, 1234]);
    expect((await stat(path.join(dst, "etc/app"))).mode & 0o7777).toBe(0o751);
    expect((await stat(path.join(dst, "suid"))).mode & 0o7777).toBe(0o4755);
    expect(await readlink(path.join(dst, "link"))).toBe("etc/app/config");
    expect(await readlink(path.join(dst, "dangling"))).toBe("/does/not/exist");
    expect((await stat(path.join(dst, "hardlink"))).ino).toBe(cfg.ino);
    const wh = await lstat(path.join(dst, "deleted-file"));
    expect(wh.isCharacterDevice()).toBe(true);
    expect(wh.rdev).toBe(0);
    expect(await getXattr(path.join(dst, "opaque"), "trusted.overlay.opaque")).toBe("y");
    const sp = await stat(path.join(dst, "pages.img"));
    expect(sp.size).toBe(64 * MiB);
    expect(sp.blocks * 512).toBeLessThan(MiB); // still sparse
    const byte = Buffer.alloc(1);
    const rf = await open(path.join(dst, "pages.img"), "r");
    await rf.read(byte, 0, 1, 32 * MiB);
    await rf.close();
    expect(byte.toString()).toBe("x");
  });

  it("unpacks an IMAGE blob as soon as it is stored, pushed or imported: not at its first use", async () => {
    const store = new BlobStore({ root: path.join(work, "store-eager"), fsync: false });
    const rootfs = path.join(work, "rootfs-eager");
    await mkdir(path.join(rootfs, "bin"), { recursive: true });
    await writeFile(path.join(rootfs, "bin/hello"), "hello\n");
    const tar = path.join(work, "rootfs-eager.tar");
    await exec("tar", ["-cf", tar, "-C", rootfs, "."]);
    const unpacked = (d: string): string => path.join(store.root, "unpacked", d.slice(7));
    const img = await store.importFile(tar, BlobKind.BLOB_KIND_IMAGE);
    expect(await readFile(path.join(unpacked(img.digest), "bin/hello"), "utf8")).toBe("hello\n");
    // Moved in (same filesystem) too; other kinds are never unpacked.
    await writeFile(path.join(rootfs, "bin/other"), "other\n");
    await exec("tar", ["-cf", tar, "-C", rootfs, "."]);
    const moved = await store.importFile(tar, BlobKind.BLOB_KIND_IMAGE, { move: true });
    expect(await readFile(path.join(unpacked(moved.digest), "bin/other"), "utf8")).toBe("other\n");
    await exec("tar", ["-cf", tar, "-C", path.join(rootfs, "bin"), "."]);
    const ckpt = await store.importFile(tar, BlobKind.BLOB_KIND_CHECKPOINT);
    await expect(stat(unpacked(ckpt.digest))).rejects.toMatchObject({ code: "ENOENT" });
    expect(await readdir(path.join(store.root, "partial"))).toEqual([]);
  });

  it("unpacks an image once into a lower dir, atomically, and refuses other kinds", async () => {
    const store = new BlobStore({ root: path.join(work, "store2"), fsync: false });
    const rootfs = path.join(work, "rootfs");
    await mkdir(path.join(rootfs, "bin"), { recursive: true });
    await writeFile(path.join(rootfs, "bin/hello"), "hello\n");
    const img = await store.packDir(rootfs, BlobKind.BLOB_KIND_IMAGE);
    const [d1, d2] = await Promise.all([store.lowerDir(img.digest), store.lowerDir(img.digest)]);
    expect(d1).toBe(d2);
    expect(d1).toBe(path.join(store.root, "unpacked", img.digest.slice(7)));
    expect(await readFile(path.join(d1, "bin/hello"), "utf8")).toBe("hello\n");
    expect(await readdir(path.join(store.root, "tmp"))).toEqual([]); // no staging dir left behind
    expect(await store.lowerDir(img.digest)).toBe(d1);

    const ckpt = await store.packDir(path.join(rootfs, "bin"), BlobKind.BLOB_KIND_CHECKPOINT);
    await expect(store.lowerDir(ckpt.digest)).rejects.toMatchObject({ code: "FailedPrecondition" });
    await expect(store.tag("ckpt", ckpt.digest)).rejects.toMatchObject({ code: "FailedPrecondition" });
    await expect(store.lowerDir(`sha256:${"1".repeat(64)}`)).rejects.toMatchObject({ code: "NotFound" });

    // Tags resolve; deleting the blob drops its tag and its unpacked dir.
    await store.tag("busybox", img.digest);
    expect(await store.resolveImage("busybox")).toBe(img.digest);
    expect(await store.resolveImage(img.digest)).toBe(img.digest);
    await store.delete(img.digest);
    await expect(stat(d1)).rejects.toMatchObject({ code: "ENOENT" });
    await expect(store.resolveImage("busybox")).rejects.toMatchObject({ code: "NotFound" });
  });

  it("refuses to delete a blob in use", async () => {
    const store = new BlobStore({ root: path.join(work, "store3"), fsync: false, inUse: async () => "container web-1" });
    const f = path.join(work, "f");
    await writeFile(f, randomBytes(1000));
    const ref = await store.importFile(f, BlobKind.BLOB_KIND_IMAGE);
    const err = await store.delete(ref.digest).catch((e: unknown) => e as FerryError);
    expect(err).toBeInstanceOf(FerryError);
    expect((err as FerryError).code).toBe("FailedPrecondition");
    expect((err as FerryError).message).toContain("container web-1");
  });

  it("re-hashes an existing partial on resume, so a blob completed across processes verifies", async () => {
    const root = path.join(work, "store4");
    const data = randomBytes(3 * MiB);
    const ref = {
      digest: `sha256:${createHash("sha256").update(data).digest("hex")}`,
      sizeBytes: data.length,
      kind: BlobKind.BLOB_KIND_CHECKPOINT,
    };
    const first = new BlobStore({ root, fsync: false });
    const w1 = await first.openWriter(ref, 0);
    await w1.write(data.subarray(0, MiB + 5));
    await w1.close(); // the "process" goes away
    await expect(first.openWriter({ ...ref, sizeBytes: 5 }, "resume")).rejects.toMatchObject({ code: "InvalidArgument" });

    const second = new BlobStore({ root, fsync: false }); // a new process: no hash state in memory
    expect(await second.status(ref.digest)).toEqual({ complete: false, receivedBytes: MiB + 5 });
    const w2 = await second.openWriter(ref, "resume");
    expect(w2.resumedFrom).toBe(MiB + 5);
    await w2.write(data.subarray(MiB + 5));
    await expect(w2.write(Buffer.from("x"))).rejects.toMatchObject({ code: "InvalidArgument" });
    expect(await w2.commit()).toEqual(ref);
    expect((await readFile(await second.pathOf(ref.digest))).equals(data)).toBe(true);
    expect((await stat(await second.pathOf(ref.digest))).mode & 0o777).toBe(0o444);
    await expect(second.openWriter(ref, 0)).rejects.toMatchObject({ code: "AlreadyExists" });
  });

  it("refuses a second concurrent writer of one blob", async () => {
    const store = new BlobStore({ root: path.join(work, "store5"), fsync: false });
    const ref = { digest: `sha256:${"2".repeat(64)}`, sizeBytes: 10, kind: BlobKind.BLOB_KIND_IMAGE };
    const w = await store.openWriter(ref, 0);
    await expect(store.openWriter(ref, "resume")).rejects.toMatchObject({ code: "Aborted" });
    await w.close();
    const again = await store.openWriter(ref, "resume");
    await again.close();
  });
});
