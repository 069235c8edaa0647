import { afterAll, beforeAll, describe, expect, it } from "vitest";
import * as agentApi from "@ferry/api/agent";
import { AgentServiceService } from "@ferry/api/agent";
import { FerryError } from "./errors.js";
import { connect, serve, type RunningServer, type ServiceImpl } from "./grpc.js";
import { PROTO_ROOT } from "@ferry/api/proto-root";

// The generic server/client layer, over a real gRPC server on port 0 (insecure: mTLS has its own test).
let server: RunningServer;
const impl = {
  getCapabilities: async () => {
    await new Promise((r) => setTimeout(r, 30));
    return agentApi.GetCapabilitiesResponse.fromPartial({ hostname: "h" });
  },
  inspectContainer: (req: { name: string }) => Promise.reject(FerryError.invalid("name", `"${req.name}" is bad`, "use another")),
  readContainerLog: async function* (req: { name: string }) {
    for (let i = 0; i < 3; i++) yield { data: Buffer.from(`${req.name}${i}`), nextOffset: i + 1 };
  },
} as unknown as ServiceImpl<typeof AgentServiceService>;

beforeAll(async () => {
  server = await serve({
    address: "127.0.0.1:0",
    security: { mode: "insecure" },
    services: [{ name: "ferry.agent.v1.AgentService", definition: AgentServiceService, impl, access: { allow: ["controller"] } }],
    protoFiles: ["ferry/agent/v1/agent.proto"],
    protoRoot: PROTO_ROOT,
  });
});
afterAll(async () => {
  await server.close();
});

const client = () =>
  connect(AgentServiceService, agentApi as unknown as Record<string, unknown>, {
    address: `127.0.0.1:${server.port}`,
    security: { mode: "insecure" },
  });

describe("grpc layer", () => {
  it("reports the server's own time in a trailer", async () => {
    const c = client();
    let serverMs = -1;
    const caps = await c.getCapabilities({}, { onServerMs: (ms) => (serverMs = ms) });
    c.close();
    expect(caps.hostname).toBe("h");
    expect(serverMs).toBeGreaterThanOrEqual(25);
    expect(serverMs).toBeLessThan(1000);
  });

  it("carries a FerryError's code, field and fix to the client", async () => {
    const c = client();
    const e = (await c.inspectContainer({ name: "x" }).catch((x: unknown) => x)) as FerryError;
    c.close();
    expect(e).toBeInstanceOf(FerryError);
    expect(e.code).toBe("InvalidArgument");
    expect(e.field).toBe("name");
    expect(e.message).toContain("fix: use another");
  });

  it("streams server-side iterables to the client in order", async () => {
    const c = client();
    const got: string[] = [];
    for await (const m of c.readContainerLog({ name: "n" })) got.push(Buffer.from(m.data).toString());
    c.close();
    expect(got).toEqual(["n0", "n1", "n2"]);
  });

  it("answers a method the implementation lacks with an error, not a hang", async () => {
    const c = client();
    const e = (await c.getResources({}, { timeoutMs: 5000 }).catch((x: unknown) => x)) as FerryError;
    c.close();
    expect(e).toBeInstanceOf(FerryError);
    expect(e.code).toBe("Internal");
  });
});
