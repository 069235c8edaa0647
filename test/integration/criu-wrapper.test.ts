/**
 * deploy/host/criu-wrapper.c, the private CRIU's entry point: it answers runc's VERSION probe
 * from a record of CRIU's own answer for this very binary, and hands everything else to CRIU.
 * Built here with a record in a scratch directory; driven as runc drives CRIU (`criu swrk FD`,
 * a SEQPACKET socket). Needs the private CRIU under /opt/ferry/criu (setup.sh) and root.
 */
import { existsSync } from "node:fs";
import { chmod, mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { exec } from "@ferry/common";

const REPO = path.resolve(import.meta.dirname, "../..");
const PREFIX = "/opt/ferry/criu";
const LIBPATH = ["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu", "usr/lib", "lib"].map((d) => `${PREFIX}/${d}`).join(":");
const usable = process.getuid?.() === 0 && existsSync(`${PREFIX}/ld/criu`) && existsSync(`${PREFIX}/usr/sbin/criu`);

/** What runc does with CRIU: a socket pair, `criu swrk <fd>`, one request, one answer. */
const ASK_C = `
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
  if (argc != 3) return 2;
  unsigned char req[64], resp[4096];
  size_t n = 0;
  for (const char *h = argv[2]; h[0] && h[1] && n < sizeof req; h += 2) sscanf(h, "%2hhx", &req[n++]);
  int sp[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sp)) return 3;
  pid_t pid = fork();
  if (pid == 0) {
    close(sp[0]);
    dup2(sp[1], 7); /* not 3: go-criu's probe passes whatever number its socket has */
    execl(argv[1], "criu", "swrk", "7", (char *)NULL);
    _exit(127);
  }
  close(sp[1]);
  if (send(sp[0], req, n, 0) != (ssize_t)n) return 4;
  ssize_t got = recv(sp[0], resp, sizeof resp, 0);
  close(sp[0]);
  int st;
  waitpid(pid, &st, 0);
  for (ssize_t i = 0; i < got; i++) printf("%02x", resp[i]);
  printf(" %d\\n", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
  return 0;
}
`;

const VERSION = "080a"; // CriuReq { type: VERSION }
const VERSION_WITH_OPTS = "080a1200"; // the same with an empty opts: not the probe's bytes, so CRIU answers it
const CHECK = "0803"; // CriuReq { type: CHECK }

let W = "";
let wrapper = "";
let ask = "";
let record = "";

async function swrk(req: string): Promise<{ resp: string; exit: number }> {
  // the last line: CRIU may write to the same stdout ("Looks good." for CHECK)
  const [resp, exit] = (await exec(ask, [wrapper, req])).stdout.trim().split("\n").pop()!.split(" ");
  return { resp: resp!, exit: Number(exit) };
}

describe.skipIf(!usable)("criu-wrapper (the private CRIU's entry point)", () => {
  beforeAll(async () => {
    W = await mkdtemp(path.join(tmpdir(), "ferry-criu-wrapper-"));
    wrapper = path.join(W, "criu");
    ask = path.join(W, "ask");
    record = path.join(W, "version-response");
    const def = (k: string, v: string) => `-D${k}="${v}"`;
    await exec("gcc", [
      "-O2",
      "-static",
      "-Wall",
      "-Wextra",
      "-Werror",
      def("CRIU_LOADER", `${PREFIX}/ld/criu`),
      def("CRIU_LIBPATH", LIBPATH),
      def("CRIU_BINARY", `${PREFIX}/usr/sbin/criu`),
      def("CRIU_VERSION_RECORD", record),
      "-o",
      wrapper,
      path.join(REPO, "deploy/host/criu-wrapper.c"),
    ]);
    await writeFile(path.join(W, "ask.c"), ASK_C);
    await exec("gcc", ["-O2", "-Wall", "-o", ask, path.join(W, "ask.c")]);
  });

  afterAll(async () => {
    if (W) await rm(W, { recursive: true, force: true });
  });

  it("runs CRIU itself for everything but the probe", async () => {
    expect((await exec(wrapper, ["--version"])).stdout).toMatch(/^Version: 4\.\d+/);
    expect(await swrk(CHECK)).toEqual({ resp: "08031001", exit: 0 }); // CHECK, success
    expect(existsSync(record)).toBe(false);
  });

  it("answers the VERSION probe with CRIU's own bytes, recorded once, and from the record after", async () => {
    const real = await swrk(VERSION_WITH_OPTS);
    expect(real.resp).toMatch(/^080a1001/); // VERSION, success
    expect(await swrk(VERSION)).toEqual(real);
    const st = await stat(record);
    expect(st.uid).toBe(0);
    expect(st.mode & 0o022).toBe(0);
    const bytes = await readFile(record);
    expect(bytes.subarray(40).toString("hex")).toBe(real.resp); // after the binary's identity (5 x u64)

    // the next probe is answered from the record: a record that says otherwise is believed...
    const edited = Buffer.from(bytes);
    edited.writeUInt8(edited.readUInt8(edited.length - 1) ^ 0x7f, edited.length - 1); // the last varint of the version
    await writeFile(record, edited);
    expect((await swrk(VERSION)).resp).toBe(edited.subarray(40).toString("hex"));
    // ...but not one that anyone but root may write, nor one made for another binary
    await chmod(record, 0o666);
    expect(await swrk(VERSION)).toEqual(real);
    const other = Buffer.from(edited);
    other.writeUInt8(other.readUInt8(8) ^ 0xff, 8); // the inode
    await writeFile(record, other);
    await chmod(record, 0o644);
    expect(await swrk(VERSION)).toEqual(real);
    expect((await readFile(record)).equals(bytes)).toBe(true); // recorded again, for this binary
  });
});
