// The agent and the controller speak mTLS only: a client without a certificate from Ferry's CA
// is refused at the handshake, and a certificate of the wrong role is refused per RPC.
import { mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import * as agentApi from "@ferry/api/agent";
import { AgentServiceService } from "@ferry/api/agent";
import * as controllerApi from "@ferry/api/controller";
import { ControllerServiceService } from "@ferry/api/controller";
import { startAgent, type RunningAgent } from "@ferry/agent";
import { run } from "@ferry/cli";
import { startController, type RunningController } from "@ferry/controller";
import { type FerryError, connect, type Security } from "@ferry/common";
import { makePki, type TestPki } from "../helpers/certs.js";

const agentMessages = agentApi as unknown as Record<string, unknown>;
const controllerMessages = controllerApi as unknown as Record<string, unknown>;

let pki: TestPki;
let other: TestPki;
let state: string;
let agent: RunningAgent;
let controller: RunningController;

beforeAll(async () => {
  pki = await makePki(["controller:controller", "admin:admin", "agent:edge-a", "agent:edge-b"]);
  // A second CA with the same identities: right names, wrong issuer.
  other = await makePki(["controller:controller", "admin:admin"]);
  state = await mkdtemp(path.join(os.tmpdir(), "ferry-mtls-"));
  agent = await startAgent({
    name: "edge-a",
    listen: "127.0.0.1:0",
    stateDir: path.join(state, "agent"),
    security: pki.security("edge-a"),
    criuPath: "criu",
    runcPath: "runc",
    netnsPrefix: "ferry-tmtls-",
    ovs: { rundir: path.join(state, "ovs"), dbSock: path.join(state, "ovs/db.sock") },
    bridge: "br-ferry",
    pageServerAddress: "127.0.0.1",
  });
  const ctl = pki.security("controller");
  controller = await startController({
    listen: "127.0.0.1:0",
    security: ctl,
    agentSecurity: ctl,
    stateDir: path.join(state, "controller"),
  });
});

afterAll(async () => {
  await controller?.close();
  await agent?.close();
  await rm(state, { recursive: true, force: true });
  await pki?.cleanup();
  await other?.cleanup();
});

function agentClient(security: Security) {
  return connect(AgentServiceService, agentMessages, { address: `127.0.0.1:${agent.port}`, security, serverName: "edge-a" });
}

async function refusal(p: Promise<unknown>): Promise<FerryError> {
  const r = await p.then(
    () => undefined,
    (e: unknown) => e as FerryError,
  );
  if (!r) throw new Error("the call was expected to be refused");
  return r;
}

describe("mTLS", () => {
  it("the controller reaches the agent with its certificate", async () => {
    const c = agentClient(pki.security("controller"));
    const caps = await c.getCapabilities({});
    c.close();
    expect(caps.hostname).toBe("edge-a");
    expect(caps.criu?.version).toMatch(/^\d+\.\d+/);
  });

  it("refuses a client with no certificate at all", async () => {
    const c = agentClient({ mode: "insecure" });
    const e = await refusal(c.getCapabilities({}, { timeoutMs: 5000 }));
    c.close();
    expect(e.code).toBe("Unavailable");
  });

  it("refuses a certificate from another CA", async () => {
    const c = agentClient(other.security("controller"));
    const e = await refusal(c.getCapabilities({}, { timeoutMs: 5000 }));
    c.close();
    expect(e.code).toBe("Unavailable");
  });

  it("refuses an admin certificate on the agent: agents accept only the controller", async () => {
    const c = agentClient(pki.security("admin"));
    const e = await refusal(c.getCapabilities({}));
    c.close();
    expect(e.code).toBe("PermissionDenied");
    expect(e.message).toContain("admin certificate");
  });

  it("lets a peer agent read blobs but nothing else", async () => {
    const c = agentClient(pki.security("edge-b"));
    const denied = await refusal(c.getResources({}));
    expect(denied.code).toBe("PermissionDenied");
    // ReadBlob is allowed for agents: the refusal, if any, is about the blob, not the caller.
    const e = await refusal(
      (async () => {
        for await (const _ of c.readBlob({ digest: "sha256:" + "0".repeat(64) })) break;
      })(),
    );
    c.close();
    expect(e.code).not.toBe("PermissionDenied");
  });

  it("admins drive the controller, which drives the agent; the CLI prints the host", async () => {
    const admin = connect(ControllerServiceService, controllerMessages, {
      address: `127.0.0.1:${controller.port}`,
      security: pki.security("admin"),
      serverName: "controller",
    });
    const { host } = await admin.registerHost({ name: "edge-a", address: `127.0.0.1:${agent.port}`, tlsServerName: "edge-a" });
    expect(host?.capabilities?.criu?.checkOk).toBe(true);
    admin.close();

    let out = "";
    const env = { FERRY_CONTROLLER: `127.0.0.1:${controller.port}`, FERRY_TLS_DIR: pki.dir };
    const code = await run(["hosts", "--json"], env, { out: (s) => (out += s), err: () => undefined });
    expect(code).toBe(0);
    const hosts = JSON.parse(out) as { name: string; address: string }[];
    expect(hosts.map((h) => h.name)).toEqual(["edge-a"]);
  });

  it("refuses an agent certificate on the controller", async () => {
    const c = connect(ControllerServiceService, controllerMessages, {
      address: `127.0.0.1:${controller.port}`,
      security: pki.security("edge-b"),
      serverName: "controller",
    });
    const e = await refusal(c.listHosts({}));
    c.close();
    expect(e.code).toBe("PermissionDenied");
  });

  it("the CLI says why and exits non-zero without a valid certificate", async () => {
    let err = "";
    const env = { FERRY_CONTROLLER: `127.0.0.1:${controller.port}`, FERRY_TLS_DIR: other.dir };
    const code = await run(["hosts"], env, { out: () => undefined, err: (s) => (err += s) });
    expect(code).not.toBe(0);
    expect(err).toMatch(/^ferry: /);
  });

  it("serves standard health checking and reflection", async () => {
    const { Client, credentials } = await import("@grpc/grpc-js");
    const tls = pki.security("controller");
    if (tls.mode !== "mtls") throw new Error("unreachable");
    const client = new Client(`127.0.0.1:${agent.port}`, credentials.createSsl(tls.tls.ca, tls.tls.key, tls.tls.cert), {
      "grpc.ssl_target_name_override": "edge-a",
    });
    // grpc.health.v1.HealthCheckRequest { service = "" } is an empty message.
    const status = await new Promise<Buffer>((resolve, reject) =>
      client.makeUnaryRequest(
        "/grpc.health.v1.Health/Check",
        (b: Buffer) => b,
        (b: Buffer) => b,
        Buffer.alloc(0),
        (e, r) => (e ? reject(e) : resolve(r!)),
      ),
    );
    // HealthCheckResponse { status = SERVING (1) }: field 1, varint 1.
    expect([...status]).toEqual([0x08, 0x01]);
    client.close();
  });
});
