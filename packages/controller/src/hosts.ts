import * as agentApi from "@ferry/api/agent";
import { AgentServiceService } from "@ferry/api/agent";
import { HostState, type Host, type RegisterHostRequest } from "@ferry/api/controller";
import { FerryError, connect, validateName, type Logger, type PromiseClient, type Security } from "@ferry/common";

export type AgentClient = PromiseClient<typeof AgentServiceService>;

/** Opens a client to an agent; injected so that tests can point the controller at fakes. */
export type AgentConnector = (address: string, serverName: string) => AgentClient;

export function mtlsAgentConnector(security: Security): AgentConnector {
  return (address, serverName) =>
    connect(AgentServiceService, agentApi as unknown as Record<string, unknown>, {
      address,
      security,
      serverName,
      options: { "grpc-node.flow_control_window": 16 * 1024 * 1024 },
    });
}

interface Entry {
  host: Host;
  client: AgentClient;
}

/** The edge hosts the controller knows, each with one long-lived channel to its agent. */
export class HostRegistry {
  private readonly hosts = new Map<string, Entry>();

  constructor(
    private readonly connectAgent: AgentConnector,
    private readonly log: Logger,
  ) {}

  async register(req: RegisterHostRequest): Promise<Host> {
    validateName("name", req.name);
    if (!/^[^\s/]+:\d{1,5}$/.test(req.address)) {
      throw FerryError.invalid("address", `"${req.address}" is not host:port`, 'give the agent\'s gRPC address, e.g. "10.0.0.2:7441"');
    }
    const serverName = req.tlsServerName || req.name;
    const existing = this.hosts.get(req.name);
    if (existing && existing.host.address !== req.address) {
      throw new FerryError("AlreadyExists", `host "${req.name}" is already registered at ${existing.host.address}`, {
        field: "name",
        fix: "remove it first (RemoveHost) or use another name",
      });
    }
    const client = existing?.client ?? this.connectAgent(req.address, serverName);
    let caps, res;
    try {
      [caps, res] = await Promise.all([client.getCapabilities({}, { timeoutMs: 10_000 }), client.getResources({}, { timeoutMs: 10_000 })]);
    } catch (e) {
      if (!existing) client.close();
      throw new FerryError("Unavailable", `cannot reach the agent of "${req.name}" at ${req.address}: ${(e as Error).message}`, {
        field: "address",
        fix: "check that ferry-agent runs there and that its certificate is issued for tls_server_name by Ferry's CA",
        cause: e,
      });
    }
    const host: Host = {
      name: req.name,
      address: req.address,
      tlsServerName: serverName,
      underlayIp: req.underlayIp,
      state: HostState.HOST_STATE_READY,
      capabilities: caps,
      ...(res.capacity ? { capacity: res.capacity } : {}),
      ...(res.used ? { used: res.used } : {}),
      containers: res.containers.length,
      lastSeen: new Date(),
      labels: req.labels,
    };
    this.hosts.set(req.name, { host, client });
    this.log.info({ host: req.name, address: req.address, criu: caps.criu?.version }, "host registered");
    return host;
  }

  list(): Host[] {
    return [...this.hosts.values()].map((e) => e.host);
  }

  get(name: string): Entry {
    const e = this.hosts.get(name);
    if (!e) throw FerryError.notFound("host", name, "list hosts with `ferry hosts`, register one with `ferry host add`");
    return e;
  }

  remove(name: string): void {
    const e = this.get(name);
    e.client.close();
    this.hosts.delete(name);
  }

  close(): void {
    for (const e of this.hosts.values()) e.client.close();
    this.hosts.clear();
  }
}
