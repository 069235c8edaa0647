import { mkdtempSync, rmSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { isFerryError } from "@ferry/common";
import { afterEach, describe, expect, it } from "vitest";
import { JsonStream, OvsdbClient, OvsdbError } from "./ovsdb.js";

describe("JsonStream", () => {
  it("splits back-to-back JSON texts at any byte, brackets inside strings included", () => {
    const texts = [
      { id: 1, result: [{ rows: [{ name: "a}]{[b", note: 'q"uote\\' }] }] },
      { id: null, method: "echo", params: [] },
      ["x", "é✓"],
    ];
    const bytes = Buffer.from(texts.map((t) => JSON.stringify(t)).join(""));
    for (const size of [1, 2, 3, 7, bytes.length]) {
      const s = new JsonStream();
      const got: unknown[] = [];
      for (let i = 0; i < bytes.length; i += size) got.push(...s.push(bytes.subarray(i, i + size)));
      expect(got, `chunks of ${size} bytes`).toEqual(texts);
    }
  });
});

/** A scripted peer on a unix socket: it sees what the client sends and answers as the test says. */
let server: Server | undefined;
let dir: string | undefined;
afterEach(() => {
  server?.close();
  server = undefined;
  if (dir) rmSync(dir, { recursive: true, force: true });
  dir = undefined;
});

async function peer(onRequest: (req: { id: number; method: string; params: unknown[] }, sock: Socket) => void): Promise<string> {
  dir = mkdtempSync(path.join(tmpdir(), "ferry-ovsdb-"));
  const sockPath = path.join(dir, "db.sock");
  server = createServer((sock) => {
    const s = new JsonStream();
    sock.on("data", (d) => s.push(d).forEach((m) => onRequest(m as { id: number; method: string; params: unknown[] }, sock)));
  });
  await new Promise<void>((r) => server!.listen(sockPath, r));
  return sockPath;
}

describe("OvsdbClient", () => {
  it("answers the server's echo and matches replies to requests by id, in any order", async () => {
    const echoes: unknown[] = [];
    const held: Array<{ id: number; sock: Socket }> = [];
    const sockPath = await peer((req, sock) => {
      if (req.id === undefined || req.method === undefined) {
        echoes.push(req); // the client's answer to our echo
        return;
      }
      held.push({ id: req.id, sock });
      if (held.length === 2) {
        sock.write(JSON.stringify({ id: "e1", method: "echo", params: ["ping"] }));
        // the second request's answer first, split across writes
        const second = JSON.stringify({ id: held[1]!.id, result: [{ count: 2 }], error: null });
        sock.write(second.slice(0, 5));
        setTimeout(() => {
          sock.write(second.slice(5));
          sock.write(JSON.stringify({ id: held[0]!.id, result: [{ rows: [{ name: "one" }] }], error: null }));
        }, 5);
      }
    });
    const c = new OvsdbClient(sockPath, 2000);
    const [a, b] = await Promise.all([
      c.transact([{ op: "select", table: "Port", where: [] }]),
      c.transact([{ op: "mutate", table: "Bridge", where: [], mutations: [] }]),
    ]);
    expect(a).toEqual([{ rows: [{ name: "one" }] }]);
    expect(b).toEqual([{ count: 2 }]);
    expect(echoes).toEqual([{ id: "e1", result: ["ping"], error: null }]);
    c.close();
  });

  it("a failed operation rejects with the server's error, naming the operation", async () => {
    const sockPath = await peer((req, sock) =>
      sock.write(
        JSON.stringify({
          id: req.id,
          result: [{ count: 1 }, { error: "constraint violation", details: "duplicate name" }, null],
          error: null,
        }),
      ),
    );
    const c = new OvsdbClient(sockPath, 2000);
    const e = await c
      .transact([
        { op: "mutate", table: "Bridge", where: [] },
        { op: "insert", table: "Port", row: {} },
        { op: "select", table: "Port", where: [] },
      ])
      .catch((x: unknown) => x);
    expect(e).toBeInstanceOf(OvsdbError);
    expect((e as OvsdbError).code).toBe("constraint violation");
    expect((e as Error).message).toMatch(/operation 1 \(insert Port\): constraint violation: duplicate name/);
    c.close();
  });

  it("a dropped connection fails what was waiting with Unavailable; the next call connects again", async () => {
    const seen = new WeakMap<Socket, number>();
    let connections = 0;
    const sockPath = await peer((req, sock) => {
      if (!seen.has(sock)) seen.set(sock, ++connections);
      // the first connection dies with a request pending (ovsdb-server restarted); the next answers
      if (seen.get(sock) === 1) sock.destroy();
      else sock.write(JSON.stringify({ id: req.id, result: [{ rows: [] }], error: null }));
    });
    const c = new OvsdbClient(sockPath, 2000);
    const e = await c.transact([{ op: "select", table: "Port", where: [] }]).catch((x: unknown) => x);
    expect(isFerryError(e) && e.code).toBe("Unavailable");
    expect(await c.transact([{ op: "select", table: "Port", where: [] }])).toEqual([{ rows: [] }]);
    expect(connections).toBe(2);
    c.close();
  });

  it("no server, or no answer in time: Unavailable; a late server still serves the next call", async () => {
    dir = mkdtempSync(path.join(tmpdir(), "ferry-ovsdb-"));
    const missing = new OvsdbClient(path.join(dir, "none.sock"), 500);
    const e1 = await missing.transact([{ op: "select", table: "Port", where: [] }]).catch((x: unknown) => x);
    expect(isFerryError(e1) && e1.code).toBe("Unavailable");

    let answer = false;
    const sockPath = await peer((req, sock) => {
      if (answer) sock.write(JSON.stringify({ id: req.id, result: [{ rows: [] }], error: null }));
    });
    const c = new OvsdbClient(sockPath, 200);
    const e2 = await c.transact([{ op: "select", table: "Port", where: [] }]).catch((x: unknown) => x);
    expect(isFerryError(e2) && e2.code).toBe("Unavailable");
    expect(String((e2 as Error).message)).toMatch(/did not answer "transact" within 200 ms/);
    answer = true;
    expect(await c.transact([{ op: "select", table: "Port", where: [] }])).toEqual([{ rows: [] }]);
    c.close();
  });
});
