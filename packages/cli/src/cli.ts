// ferry: the admin's client of the controller. Tables for people, --json for scripts; any error
// is one clear line on stderr and a non-zero exit status.
import { parseArgs } from "node:util";
import * as controllerApi from "@ferry/api/controller";
import { ControllerServiceService, HostState, type Host } from "@ferry/api/controller";
import { FerryError, connect, fromServiceError, securityFromFlags, statusOf, type PromiseClient } from "@ferry/common";
import { bytes, table } from "./table.js";

export type ControllerClient = PromiseClient<typeof ControllerServiceService>;

const HELP = `usage: ferry [global flags] COMMAND [ARGS]

commands:
  hosts [--json]                                   the edge hosts and their resources
  host add NAME ADDRESS [--server-name N] [--underlay-ip IP]
                                                   register a host's agent
  host rm NAME                                     forget a host

global flags (or environment):
  --controller ADDR   the controller's address (FERRY_CONTROLLER, default 127.0.0.1:7440)
  --tls-dir DIR       CA and admin certificate (FERRY_TLS_DIR)
  --tls-name NAME     certificate name in --tls-dir (FERRY_TLS_NAME, default admin)
  --server-name NAME  name on the controller's certificate (FERRY_CONTROLLER_NAME, default controller)
  --insecure          no TLS (FERRY_INSECURE=1): local experiments only
`;

interface Io {
  out: (s: string) => void;
  err: (s: string) => void;
}

function stateName(s: HostState): string {
  return HostState[s]?.replace("HOST_STATE_", "").toLowerCase() ?? "unknown";
}

function hostRow(h: Host): string[] {
  const cap = h.capacity;
  return [
    h.name,
    h.address,
    stateName(h.state),
    h.capabilities?.criu?.version ?? "",
    h.capabilities?.kernel ?? "",
    cap ? `${cap.cpuCores}` : "",
    cap ? bytes(cap.memoryBytes) : "",
    `${h.containers}`,
  ];
}

/** Run one CLI command; returns the exit status. Exported for tests. */
export async function run(argv: string[], env: NodeJS.ProcessEnv, io: Io, client?: ControllerClient): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    strict: true,
    options: {
      controller: { type: "string" },
      "tls-dir": { type: "string" },
      "tls-name": { type: "string" },
      "server-name": { type: "string" },
      "underlay-ip": { type: "string" },
      insecure: { type: "boolean" },
      json: { type: "boolean", default: false },
      help: { type: "boolean", short: "h" },
    },
  });
  const [cmd, ...args] = positionals;
  if (values.help || !cmd) {
    io.out(HELP);
    return cmd || values.help ? 0 : 2;
  }
  const c =
    client ??
    connect(ControllerServiceService, controllerApi as unknown as Record<string, unknown>, {
      address: values.controller ?? env.FERRY_CONTROLLER ?? "127.0.0.1:7440",
      security: securityFromFlags(
        {
          "tls-dir": values["tls-dir"] ?? env.FERRY_TLS_DIR,
          "tls-name": values["tls-name"] ?? env.FERRY_TLS_NAME ?? "admin",
          insecure: values.insecure ?? env.FERRY_INSECURE === "1",
        },
        "admin",
      ),
      serverName: env.FERRY_CONTROLLER_NAME ?? "controller",
    });
  const print = (data: unknown, human: () => string): void => io.out(values.json ? JSON.stringify(data, null, 2) + "\n" : human());
  try {
    switch (cmd) {
      case "hosts": {
        const { hosts } = await c.listHosts({}, { timeoutMs: 10_000 });
        print(hosts, () => table(["NAME", "ADDRESS", "STATE", "CRIU", "KERNEL", "CPUS", "MEMORY", "CONTAINERS"], hosts.map(hostRow)));
        return 0;
      }
      case "host": {
        const [sub, name, address] = args;
        if (sub === "add" && name && address) {
          const { host } = await c.registerHost({
            name,
            address,
            tlsServerName: values["server-name"] ?? "",
            underlayIp: values["underlay-ip"] ?? "",
          });
          print(host, () => table(["NAME", "ADDRESS", "STATE", "CRIU", "KERNEL", "CPUS", "MEMORY", "CONTAINERS"], [hostRow(host!)]));
          return 0;
        }
        if (sub === "rm" && name) {
          await c.removeHost({ name });
          return 0;
        }
        throw FerryError.invalid(
          "host",
          `unknown or incomplete sub-command "${args.join(" ")}"`,
          "use `ferry host add NAME ADDRESS` or `ferry host rm NAME`",
        );
      }
      default:
        throw FerryError.invalid("command", `unknown command "${cmd}"`, "run `ferry --help` for the list");
    }
  } catch (e) {
    const fe = fromServiceError(e);
    io.err(`ferry: ${fe.message}${fe.fix && !fe.message.includes("fix:") ? ` (fix: ${fe.fix})` : ""}\n`);
    // Distinct exit codes per error kind, so scripts can tell a refusal from an outage.
    return 10 + (statusOf[fe.code] ?? 13);
  } finally {
    if (!client) c.close();
  }
}
