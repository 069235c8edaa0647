#!/usr/bin/env node
// ferry-controller: sequences migrations, holds the locks, watches the hosts.
import { parseArgs } from "node:util";
import { asFerryError, createLogger, securityFromFlags } from "@ferry/common";
import { startController } from "./controller.js";

const HELP = `usage: ferry-controller [--listen ADDR] [--state-dir DIR] (--tls-dir DIR [--tls-name NAME] | --insecure)

  --listen ADDR      gRPC address for admins (default 0.0.0.0:7440)
  --state-dir DIR    the migration journal (default /var/lib/ferry/controller)
  --tls-dir DIR      CA and certificates made by deploy/certs.sh; presents <tls-name>.crt to
                     admins and to agents
  --tls-name NAME    certificate name in --tls-dir (default: controller)
  --insecure         no TLS anywhere: local experiments only
`;

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      listen: { type: "string", default: "0.0.0.0:7440" },
      "state-dir": { type: "string", default: "/var/lib/ferry/controller" },
      "tls-dir": { type: "string" },
      "tls-name": { type: "string" },
      insecure: { type: "boolean", default: false },
      help: { type: "boolean", short: "h" },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(HELP);
    return;
  }
  const log = createLogger("ferry-controller");
  const security = securityFromFlags(values, "controller");
  const ctl = await startController({ listen: values.listen, security, agentSecurity: security, stateDir: values["state-dir"], log });
  log.info({ port: ctl.port, security: security.mode }, "controller listening");
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
