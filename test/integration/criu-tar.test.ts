/**
 * deploy/host/criu-tar.c, what CRIU runs as `tar` for Ferry's containers, against GNU tar: an
 * empty directory's archive is one GNU tar reads and extracts alike, its own archive is put back
 * with the directory's mode, owner and mtime, and everything else goes to GNU tar untouched.
 * Runs as root (owners).
 */
import { spawn } from "node:child_process";
import { open, mkdir, mkdtemp, readFile, rm, stat, utimes, chown, chmod, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { exec } from "@ferry/common";

const isRoot = process.getuid?.() === 0;
const REPO = path.resolve(import.meta.dirname, "../..");
/** CRIU 4.2's arguments (criu/filesystems.c tmpfs_dump / tmpfs_restore). */
const CREATE = [
  "--create",
  "--gzip",
  "--no-unquote",
  "--no-wildcards",
  "--one-file-system",
  "--check-links",
  "--preserve-permissions",
  "--sparse",
  "--numeric-owner",
  "--directory",
  "/proc/self/fd/0",
  ".",
];
const extractArgs = (dir: string): string[] => ["--extract", "--gzip", "--no-unquote", "--no-wildcards", "--directory", dir];

let W = "";
let shim = "";

/** Run `bin` as CRIU does: stdin from `stdinPath` (a directory or an image file), stdout into `outPath`. */
async function run(bin: string, args: string[], stdinPath: string, outPath?: string): Promise<{ code: number | null; stderr: string }> {
  const inFd = await open(stdinPath, "r");
  const outFd = outPath ? await open(outPath, "w") : undefined;
  try {
    const child = spawn(bin, args, { stdio: [inFd.fd, outFd ? outFd.fd : "ignore", "pipe"] });
    let stderr = "";
    child.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
    const code = await new Promise<number | null>((r) => child.on("close", r));
    return { code, stderr };
  } finally {
    await inFd.close();
    await outFd?.close();
  }
}

async function statOf(dir: string): Promise<string> {
  const s = await stat(dir);
  return `${(s.mode & 0o7777).toString(8)} ${s.uid}:${s.gid} ${Math.round(s.mtimeMs / 1000)}`;
}

async function emptyDir(name: string): Promise<string> {
  const d = path.join(W, name);
  await mkdir(d);
  await chown(d, 123, 456);
  await chmod(d, 0o1777);
  await utimes(d, new Date("2020-01-02T03:04:05Z"), new Date("2020-01-02T03:04:05Z"));
  return d;
}

describe.skipIf(!isRoot)("criu-tar (CRIU's tar for empty tmpfs mounts)", () => {
  beforeAll(async () => {
    W = await mkdtemp(path.join(tmpdir(), "ferry-criu-tar-"));
    shim = path.join(W, "tar");
    await exec("gcc", ["-O2", "-static", "-Wall", "-Wextra", "-Werror", "-o", shim, path.join(REPO, "deploy/host/criu-tar.c")]);
  });

  afterAll(async () => {
    if (W) await rm(W, { recursive: true, force: true });
  });

  it("archives an empty directory in a form GNU tar lists and extracts, and puts its own archive back alike", async () => {
    const src = await emptyDir("src");
    const archive = path.join(W, "empty.tgz");
    expect((await run(shim, CREATE, src, archive)).code).toBe(0);
    const bytes = await readFile(archive);
    expect(bytes.length).toBe(1559);
    expect(bytes[9]).toBe(255); // written by criu-tar, not by gzip
    await exec("gzip", ["-t", archive]);
    const listed = (await exec("tar", ["-tzvf", archive, "--numeric-owner"])).stdout.trim().split("\n");
    expect(listed).toHaveLength(1);
    expect(listed[0]).toMatch(/^drwxrwxrwt 123\/456\s+0 2020-01-02 03:04 \.\/$/);

    const want = await statOf(src);
    expect(want).toBe(`1777 123:456 ${Date.parse("2020-01-02T03:04:05Z") / 1000}`);
    for (const [who, bin] of [
      ["criu-tar", shim],
      ["GNU tar", "/usr/bin/tar"],
    ] as const) {
      const dst = path.join(W, `dst-${who.replace(" ", "")}`);
      await mkdir(dst);
      expect((await run(bin, extractArgs(dst), archive)).code, who).toBe(0);
      expect(await statOf(dst), who).toBe(want);
    }
  });

  it("leaves a directory with entries, an archive it did not write, a pipe and other arguments to GNU tar", async () => {
    const full = path.join(W, "full");
    await mkdir(full);
    await writeFile(path.join(full, "f"), "hello");
    const archive = path.join(W, "full.tgz");
    expect((await run(shim, CREATE, full, archive)).code).toBe(0);
    expect((await readFile(archive))[9]).toBe(3); // gzip's own header: GNU tar made it
    expect((await exec("tar", ["-tzf", archive])).stdout.split("\n")).toContain("./f");

    const dst = path.join(W, "full-dst");
    await mkdir(dst);
    expect((await run(shim, extractArgs(dst), archive)).code).toBe(0);
    expect(await readFile(path.join(dst, "f"), "utf8")).toBe("hello");

    // its own archive through a pipe (no pread): GNU tar reads it, with stdin untouched
    const own = path.join(W, "own.tgz");
    const src = await emptyDir("src2");
    await run(shim, CREATE, src, own);
    const piped = path.join(W, "piped");
    await mkdir(piped);
    const r = await exec("bash", ["-c", `cat "$1" | "$2" ${extractArgs(piped).join(" ")}`, "-", own, shim]);
    expect(r.exitCode).toBe(0);
    expect(await statOf(piped)).toBe(await statOf(src));

    // a damaged copy of its own archive is not taken for one: GNU tar gets it, and refuses it
    const bad = path.join(W, "bad.tgz");
    const copy = await readFile(own);
    copy.writeUInt8(copy.readUInt8(15 + 100) ^ 1, 15 + 100); // a byte of the mode field: the CRC no longer matches
    await writeFile(bad, copy);
    const untouched = path.join(W, "untouched");
    await mkdir(untouched);
    const before = await statOf(untouched);
    expect((await run(shim, extractArgs(untouched), bad)).code).not.toBe(0);
    expect(await statOf(untouched)).toBe(before);

    expect((await exec(shim, ["--version"])).stdout).toMatch(/GNU tar/);
  });

  it("the agent refuses a --criu-tools directory that is not root's alone, or holds no tar", async () => {
    const agent = (tools: string): Promise<{ exitCode: number; stderr: string }> =>
      exec(
        process.execPath,
        [
          path.join(REPO, "packages/agent/dist/main.js"),
          "--name",
          "t",
          "--insecure",
          "--listen",
          "127.0.0.1:0",
          "--state-dir",
          path.join(W, "state"),
          "--criu-tools",
          tools,
        ],
        { okCodes: [1] },
      );
    const open_ = path.join(W, "tools-open");
    await mkdir(open_);
    await exec("cp", [shim, path.join(open_, "tar")]);
    await chmod(open_, 0o777);
    let r = await agent(open_);
    expect(r.stderr).toContain(`--criu-tools: ${open_} is not root's alone`);
    expect(r.stderr).toContain("chmod go-w");
    r = await agent(path.join(W, "nowhere"));
    expect(r.stderr).toContain("holds no executable tar");
  });
});
