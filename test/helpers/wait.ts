import type { ChildProcess } from "node:child_process";
import { openTcpTables } from "@ferry/agent";

/** Polls `ok` every 100 ms until it holds; fails naming `what` after `ms`. */
export async function waitFor(what: string, ok: () => Promise<boolean> | boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await ok()) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/**
 * Waits for a ferry-echo-client to print "connected serial=1" (its first connection). Fails at
 * once if the client exits first, and in either case with what the client printed.
 */
export async function echoConnected(client: { child: ChildProcess; stderr(): string }, ms = 15_000): Promise<void> {
  const end = Date.now() + ms;
  while (!/connected serial=1 /.test(client.stderr())) {
    const exited = client.child.exitCode !== null || client.child.signalCode !== null;
    if (exited || Date.now() > end) {
      const how = exited ? `exited (${client.child.exitCode ?? client.child.signalCode})` : `is not connected after ${ms} ms`;
      throw new Error(`the echo client ${how}; it printed: ${client.stderr().trim() || "nothing"}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * Waits until TCP `port` listens in the network namespace of process `pid` (a container's init):
 * a just-started server is not listening yet, and a client started then is refused.
 */
export async function waitListening(pid: number, port: number, ms = 15_000): Promise<void> {
  await waitFor(
    `port ${port} to listen in the namespace of pid ${pid}`,
    async () => (await (await openTcpTables(pid)).read("listen")).some((s) => s.localPort === port),
    ms,
  );
}
