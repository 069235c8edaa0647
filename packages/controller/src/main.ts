#!/usr/bin/env node
// ferry-controller: sequences migrations, holds the locks, watches the hosts.
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { FerryError, asFerryError, createLogger, securityFromFlags } from "@ferry/common";
import type { StrategyName } from "./admission.js";
import { startController } from "./controller.js";
import type { OnosSdnConfig } from "./sdn/index.js";

const HELP = `usage: ferry-controller [--listen ADDR] [--state-dir DIR] (--tls-dir DIR [--tls-name NAME] | --insecure)
                        [--sdn ovs|onos [--onos-url URL --onos-user U --onos-password P --onos-app-id ID --onos-config FILE]]
                        [--strategy conservative|semi-conservative|live] [--max-parallel N] [--metrics-interval MS]

  --listen ADDR        gRPC address for admins (default 0.0.0.0:7440)
  --state-dir DIR      hosts, policies and the migration journal (default /var/lib/ferry/controller)
  --tls-dir DIR        CA and certificates made by deploy/certs.sh; presents <tls-name>.crt to
                       admins and to agents
  --tls-name NAME      certificate name in --tls-dir (default: controller)
  --insecure           no TLS anywhere: local experiments only
  --sdn BACKEND        ovs (default: agents program their OVS bridges) or onos (REST intents)
  --onos-url URL       ONOS REST base, e.g. http://10.0.0.5:8181/onos/v1
  --onos-user U        default onos
  --onos-password P    default rocks
  --onos-app-id ID     default org.onosproject.ovsdb
  --onos-config FILE   JSON with the rest of the ONOS settings (hosts, peers, mode, priorities)
  --strategy S         default admission strategy (default conservative)
  --max-parallel N     migrations at once (default 4)
  --metrics-interval MS  agents' metrics stream interval (default 1000)
`;

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      listen: { type: "string", default: "0.0.0.0:7440" },
      "state-dir": { type: "string", default: "/var/lib/ferry/controller" },
      "tls-dir": { type: "string" },
      "tls-name": { type: "string" },
      insecure: { type: "boolean", default: false },
      sdn: { type: "string", default: "ovs" },
      "onos-url": { type: "string" },
      "onos-user": { type: "string" },
      "onos-password": { type: "string" },
      "onos-app-id": { type: "string" },
      "onos-config": { type: "string" },
      strategy: { type: "string", default: "conservative" },
      "max-parallel": { type: "string", default: "4" },
      "metrics-interval": { type: "string", default: "1000" },
      help: { type: "boolean", short: "h" },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(HELP);
    return;
  }
  const sdn = values.sdn;
  if (sdn !== "ovs" && sdn !== "onos") throw FerryError.invalid("--sdn", `"${sdn}" is not a backend`, "use ovs or onos");
  const maxParallel = Number(values["max-parallel"]);
  if (!Number.isInteger(maxParallel) || maxParallel < 1)
    throw FerryError.invalid("--max-parallel", `"${values["max-parallel"]}" is not a count ≥ 1`, "use e.g. 4");
  const metricsIntervalMs = Number(values["metrics-interval"]);
  if (!Number.isInteger(metricsIntervalMs) || (metricsIntervalMs !== 0 && (metricsIntervalMs < 100 || metricsIntervalMs > 60_000))) {
    throw FerryError.invalid("--metrics-interval", `"${values["metrics-interval"]}" is not 100..60000 (or 0)`, "use e.g. 1000");
  }
  let onos: OnosSdnConfig | undefined;
  if (sdn === "onos") {
    const extra = values["onos-config"] ? (JSON.parse(readFileSync(values["onos-config"], "utf8")) as Partial<OnosSdnConfig>) : {};
    const url = values["onos-url"] ?? extra.url;
    if (!url) throw FerryError.invalid("--onos-url", "is required with --sdn onos", "e.g. --onos-url http://10.0.0.5:8181/onos/v1");
    onos = {
      peers: [],
      ...extra,
      url,
      ...(values["onos-user"] ? { user: values["onos-user"] } : {}),
      ...(values["onos-password"] ? { password: values["onos-password"] } : {}),
      ...(values["onos-app-id"] ? { appId: values["onos-app-id"] } : {}),
    };
  }
  const log = createLogger("ferry-controller");
  const security = securityFromFlags(values, "controller");
  const ctl = await startController({
    listen: values.listen,
    security,
    agentSecurity: security,
    stateDir: values["state-dir"],
    log,
    sdn,
    ...(onos ? { onos } : {}),
    strategy: values.strategy as StrategyName,
    maxParallel,
    metricsIntervalMs,
  });
  log.info({ port: ctl.port, security: security.mode, sdn, resumed: ctl.controller.resumed }, "controller listening");
  process.stdout.write(`ferry-controller ready port=${ctl.port}\n`);
  const stop = (): void => {
    void ctl.close().then(() => process.exit(0));
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((e: unknown) => {
  process.stderr.write(`ferry-controller: ${asFerryError(e).fullMessage}\n`);
  process.exit(1);
});
