// ferry: the admin's client of the controller. Tables for people, --json for scripts; any error
// is one clear line on stderr and a non-zero exit status (10 + the gRPC status code; a migration
// that rolled back exits 3, one that failed and needs an operator exits 4).
import { parseArgs } from "node:util";
import * as controllerApi from "@ferry/api/controller";
import {
  AdmissionStrategy,
  Container,
  ControllerServiceService,
  Host,
  HostImage,
  HostState,
  Migration,
  MigrationMode,
  MigrationState,
  Policy,
  Resource,
  type StepRecord,
  StepState,
} from "@ferry/api/controller";
import { ContainerState } from "@ferry/api/agent";
import { FerryError, connect, fromServiceError, parseSize, securityFromFlags, statusOf, type PromiseClient } from "@ferry/common";
import { bytes, ms, table } from "./table.js";

export type ControllerClient = PromiseClient<typeof ControllerServiceService>;

const HELP = `usage: ferry [global flags] COMMAND [ARGS]

hosts
  hosts [--json]                                the edge hosts and their resources
  host add NAME ADDRESS [--server-name N] [--underlay-ip IP]
  host rm NAME                                  forget a host
  host drain NAME [--cordon-only]               migrate everything off a host (or only stop
                                                new containers and migrations landing there)
  images [--host H] [--json]                    images on each host

containers
  run NAME --host H --image IMAGE --ip A.B.C.D/N [--mac MAC] [--cpus N] [--memory SIZE]
      [--env K=V]... -- CMD [ARG...]
  ps [--host H] [--json]                        containers and where they run
  logs NAME [--follow]                          a container's output
  stop NAME                                     stop a container
  rm NAME [--force]                             delete a container

migrations
  migrate NAME --to H [--strategy conservative|semi-conservative|live]
      [--mode stop-and-copy|page-server] [--detach] [--json]
                                                move a container, its memory and its TCP
                                                connections; shows each step as it happens
  migrations [--container NAME] [--json]        recent migrations
  migration ID [--json]                         one migration with its per-step breakdown
  cancel ID                                     roll a running migration back

monitoring
  watch [--host H]                              metrics as the agents stream them
  policy list [--json]
  policy set NAME --resource cpu|memory|disk --threshold 0..1 [--host H] [--container C]
      [--samples N] [--cooldown SECONDS] [--strategy S] [--schedule CRON] [--disabled]
  policy rm NAME

global flags (or environment):
  --controller ADDR   the controller's address (FERRY_CONTROLLER, default 127.0.0.1:7440)
  --tls-dir DIR       CA and admin certificate (FERRY_TLS_DIR)
  --tls-name NAME     certificate name in --tls-dir (FERRY_TLS_NAME, default admin)
  --insecure          no TLS (FERRY_INSECURE=1): local experiments only
  --json              machine-readable output
`;

export interface Io {
  out: (s: string) => void;
  err: (s: string) => void;
}

const lower = (s: string | undefined, prefix: string): string => (s ?? "unknown").replace(prefix, "").toLowerCase().replaceAll("_", "-");
const hostState = (s: HostState): string => lower(HostState[s], "HOST_STATE_");
const containerState = (s: ContainerState): string => lower(ContainerState[s], "CONTAINER_STATE_");
const migrationState = (s: MigrationState): string => lower(MigrationState[s], "MIGRATION_STATE_");
const stepState = (s: StepState): string => lower(StepState[s], "STEP_STATE_");

const STRATEGIES: Record<string, AdmissionStrategy> = {
  conservative: AdmissionStrategy.ADMISSION_STRATEGY_CONSERVATIVE,
  "semi-conservative": AdmissionStrategy.ADMISSION_STRATEGY_SEMI_CONSERVATIVE,
  live: AdmissionStrategy.ADMISSION_STRATEGY_LIVE,
};
const MODES: Record<string, MigrationMode> = {
  "stop-and-copy": MigrationMode.MIGRATION_MODE_STOP_AND_COPY,
  "pre-copy": MigrationMode.MIGRATION_MODE_PRE_COPY,
  "page-server": MigrationMode.MIGRATION_MODE_PAGE_SERVER,
};
const RESOURCES: Record<string, Resource> = { cpu: Resource.RESOURCE_CPU, memory: Resource.RESOURCE_MEMORY, disk: Resource.RESOURCE_DISK };

function choose<T>(field: string, value: string | undefined, options: Record<string, T>): T | undefined {
  if (value === undefined) return undefined;
  const v = options[value];
  if (v === undefined) throw FerryError.invalid(field, `"${value}" is not one of the choices`, `use ${Object.keys(options).join(", ")}`);
  return v;
}

function need(field: string, value: string | undefined, example: string): string {
  if (!value) throw FerryError.invalid(field, "is required", `add ${field} ${example}`);
  return value;
}

const hostHeaders = ["NAME", "ADDRESS", "STATE", "CRIU", "KERNEL", "CPUS", "MEMORY", "USED", "CONTAINERS"];
function hostRow(h: Host): string[] {
  const cap = h.capacity;
  return [
    h.name,
    h.address,
    hostState(h.state),
    h.capabilities?.criu?.version ?? "",
    h.capabilities?.kernel ?? "",
    cap ? `${cap.cpuCores}` : "",
    cap ? bytes(cap.memoryBytes) : "",
    h.used && cap ? `${Math.round((100 * h.used.memoryBytes) / Math.max(1, cap.memoryBytes))}% mem` : "",
    `${h.containers}`,
  ];
}

function containerRow(c: Container): string[] {
  const i = c.info;
  const s = i?.spec;
  return [
    s?.name ?? "",
    c.host,
    c.migrating ? `migrating (${c.migrating})` : containerState(i?.state ?? ContainerState.CONTAINER_STATE_UNSPECIFIED),
    s?.network?.ipCidr ?? "",
    s?.image ?? "",
    i?.usage ? bytes(i.usage.memoryBytes) : "",
    (s?.args ?? []).join(" "),
  ];
}

function stepLine(s: StepRecord): string {
  const extra = [
    s.bytes ? bytes(s.bytes) : "",
    s.attempts > 1 ? `${s.attempts} attempts` : "",
    s.inDowntime ? "downtime" : "",
    s.group ? `‖ ${s.group}` : "",
  ]
    .filter(Boolean)
    .join(", ");
  return `  ${stepState(s.state).padEnd(11)} ${s.name.padEnd(22)} ${ms(s.durationMs).padStart(8)}${extra ? `  (${extra})` : ""}${s.error ? `\n      error: ${s.error}` : ""}`;
}

/** A migration's per-step breakdown, as a person reads it. */
export function breakdown(m: Migration): string {
  const head = `migration ${m.id}: ${m.container} ${m.source} → ${m.destination}  ${migrationState(m.state)}`;
  const steps = table(
    ["STEP", "STATE", "TIME", "BYTES", "GROUP", "DOWNTIME"],
    m.steps.map((s) => [s.name, stepState(s.state), ms(s.durationMs), s.bytes ? bytes(s.bytes) : "", s.group, s.inDowntime ? "yes" : ""]),
  );
  const totals =
    `total ${ms(m.totalMs)}, downtime ${ms(m.downtimeMs)}, control overhead ${ms(m.controlOverheadMs)}` +
    ` (${m.totalMs ? ((100 * m.controlOverheadMs) / m.totalMs).toFixed(1) : "0"}%), moved ${bytes(m.bytesTransferred)}${m.partial ? " (partial: base image already there)" : ""}`;
  return `${head}\n${steps}${totals}\n${m.error ? `error: ${m.error}\n` : ""}`;
}

function migrationRow(m: Migration): string[] {
  return [
    m.id,
    m.container,
    `${m.source} → ${m.destination}`,
    migrationState(m.state),
    ms(m.totalMs),
    ms(m.downtimeMs),
    m.reason,
    m.createdAt?.toISOString() ?? "",
  ];
}

function migrationExit(m: Migration): number {
  if (m.state === MigrationState.MIGRATION_STATE_SUCCEEDED) return 0;
  return m.state === MigrationState.MIGRATION_STATE_ROLLED_BACK ? 3 : 4;
}

/** Split `run ... -- CMD ARGS` so the container's own flags never reach our parser. */
function splitCommand(argv: string[]): [string[], string[]] {
  const i = argv.indexOf("--");
  return i < 0 ? [argv, []] : [argv.slice(0, i), argv.slice(i + 1)];
}

/** Run one CLI command; returns the exit status. Exported for tests, which pass their own client. */
export async function run(argv: string[], env: NodeJS.ProcessEnv, io: Io, client?: ControllerClient): Promise<number> {
  const [ours, command] = splitCommand(argv);
  let parsed;
  try {
    parsed = parseArgs({
      args: ours,
      allowPositionals: true,
      strict: true,
      options: {
        controller: { type: "string" },
        "tls-dir": { type: "string" },
        "tls-name": { type: "string" },
        insecure: { type: "boolean" },
        json: { type: "boolean", default: false },
        help: { type: "boolean", short: "h" },
        host: { type: "string" },
        "server-name": { type: "string" },
        "underlay-ip": { type: "string" },
        image: { type: "string" },
        ip: { type: "string" },
        mac: { type: "string" },
        cpus: { type: "string" },
        memory: { type: "string" },
        env: { type: "string", multiple: true },
        follow: { type: "boolean", short: "f" },
        force: { type: "boolean" },
        to: { type: "string" },
        strategy: { type: "string" },
        mode: { type: "string" },
        detach: { type: "boolean" },
        container: { type: "string" },
        resource: { type: "string" },
        threshold: { type: "string" },
        samples: { type: "string" },
        cooldown: { type: "string" },
        schedule: { type: "string" },
        disabled: { type: "boolean" },
        "cordon-only": { type: "boolean" },
      },
    });
  } catch (e) {
    io.err(`ferry: ${(e as Error).message} (fix: run \`ferry --help\`)\n`);
    return 2;
  }
  const { values: v, positionals } = parsed;
  const [cmd, ...args] = positionals;
  if (v.help || !cmd) {
    io.out(HELP);
    return cmd || v.help ? 0 : 2;
  }
  let c: ControllerClient | undefined = client;
  const print = (data: unknown, human: () => string): void => io.out(v.json ? JSON.stringify(data, null, 2) + "\n" : human());
  try {
    c ??= connect(ControllerServiceService, controllerApi as unknown as Record<string, unknown>, {
      address: v.controller ?? env.FERRY_CONTROLLER ?? "127.0.0.1:7440",
      security: securityFromFlags(
        {
          "tls-dir": v["tls-dir"] ?? env.FERRY_TLS_DIR,
          "tls-name": v["tls-name"] ?? env.FERRY_TLS_NAME ?? "admin",
          insecure: v.insecure ?? env.FERRY_INSECURE === "1",
        },
        "admin",
      ),
      serverName: env.FERRY_CONTROLLER_NAME ?? "controller",
    });
    const name = args[0];
    switch (cmd) {
      case "hosts": {
        const { hosts } = await c.listHosts({}, { timeoutMs: 10_000 });
        print(
          hosts.map((h) => Host.toJSON(h)),
          () => table(hostHeaders, hosts.map(hostRow)),
        );
        return 0;
      }
      case "host": {
        const [sub, hname, address] = args;
        if (sub === "add" && hname && address) {
          const { host } = await c.registerHost({
            name: hname,
            address,
            tlsServerName: v["server-name"] ?? "",
            underlayIp: v["underlay-ip"] ?? "",
          });
          print(Host.toJSON(host!), () => table(hostHeaders, [hostRow(host!)]));
          return 0;
        }
        if (sub === "rm" && hname) {
          await c.removeHost({ name: hname });
          return 0;
        }
        if (sub === "drain" && hname) {
          const r = await c.drainHost({ name: hname, cordonOnly: v["cordon-only"] === true });
          print(r, () => (r.migrationIds.length ? `started ${r.migrationIds.join(", ")}\n` : "nothing to move\n"));
          return 0;
        }
        throw FerryError.invalid(
          "host",
          `unknown or incomplete sub-command "${args.join(" ")}"`,
          "use `ferry host add NAME ADDRESS`, `host rm NAME` or `host drain NAME`",
        );
      }
      case "images": {
        const { images } = await c.listImages({ host: v.host ?? "" });
        print(
          images.map((i) => HostImage.toJSON(i)),
          () =>
            table(
              ["HOST", "IMAGE", "DIGEST", "SIZE"],
              images.map((i) => [i.host, i.image?.name ?? "", (i.image?.digest ?? "").slice(0, 19), bytes(i.image?.sizeBytes ?? 0)]),
            ),
        );
        return 0;
      }
      case "run": {
        const cname = need("NAME", name, "(ferry run NAME ...)");
        if (command.length === 0)
          throw FerryError.invalid("CMD", "no command given", "end with `-- CMD [ARG...]`, e.g. `-- /bin/ferry-echo 7000`");
        const cpus = v.cpus === undefined ? 0 : Number(v.cpus);
        if (!Number.isFinite(cpus) || cpus < 0)
          throw FerryError.invalid("--cpus", `"${v.cpus}" is not a number of CPUs`, "use e.g. 0.5 or 2");
        const { container } = await c.runContainer({
          host: need("--host", v.host, "H"),
          spec: {
            name: cname,
            image: need("--image", v.image, "IMAGE"),
            args: command,
            env: v.env ?? [],
            cpuMillicores: Math.round(cpus * 1000),
            memoryLimitBytes: v.memory ? parseSize("--memory", v.memory) : 0,
            network: { ipCidr: need("--ip", v.ip, "A.B.C.D/N"), mac: v.mac ?? "" },
          },
        });
        print(Container.toJSON(container!), () =>
          table(["NAME", "HOST", "STATE", "IP", "IMAGE", "MEMORY", "COMMAND"], [containerRow(container!)]),
        );
        return 0;
      }
      case "ps": {
        const { containers } = await c.listContainers({ host: v.host ?? "" });
        print(
          containers.map((x) => Container.toJSON(x)),
          () => table(["NAME", "HOST", "STATE", "IP", "IMAGE", "MEMORY", "COMMAND"], containers.map(containerRow)),
        );
        return 0;
      }
      case "logs": {
        for await (const chunk of c.readContainerLog({ name: need("NAME", name, "(ferry logs NAME)"), follow: v.follow ?? false })) {
          io.out(Buffer.from(chunk.data).toString("utf8"));
        }
        return 0;
      }
      case "stop": {
        const { container } = await c.stopContainer({ name: need("NAME", name, "(ferry stop NAME)") });
        print(Container.toJSON(container!), () => `${name} ${containerState(container?.info?.state ?? 0)}\n`);
        return 0;
      }
      case "rm": {
        await c.deleteContainer({ name: need("NAME", name, "(ferry rm NAME)"), force: v.force ?? false });
        print({ deleted: name }, () => "");
        return 0;
      }
      case "migrate":
        return await migrate(c, need("NAME", name, "(ferry migrate NAME --to H)"), v, io);
      case "migrations": {
        const { migrations } = await c.listMigrations({ container: v.container ?? "", limit: 50 });
        print(
          migrations.map((m) => Migration.toJSON(m)),
          () => table(["ID", "CONTAINER", "PATH", "STATE", "TOTAL", "DOWNTIME", "REASON", "STARTED"], migrations.map(migrationRow)),
        );
        return 0;
      }
      case "migration": {
        const { migration } = await c.getMigration({ id: need("ID", name, "(ferry migration ID)") });
        print(Migration.toJSON(migration!), () => breakdown(migration!));
        return 0;
      }
      case "cancel": {
        const { migration } = await c.cancelMigration({ id: need("ID", name, "(ferry cancel ID)") });
        print(Migration.toJSON(migration!), () => `${migration!.id} ${migrationState(migration!.state)}\n`);
        return 0;
      }
      case "watch": {
        for await (const m of c.watchMetrics({ host: v.host ?? "" })) {
          const x = m.metrics;
          if (v.json) io.out(JSON.stringify(controllerApi.WatchMetricsResponse.toJSON(m)) + "\n");
          else if (x?.capacity && x.used) {
            io.out(
              `${x.sampledAt?.toISOString() ?? ""} ${m.host.padEnd(10)} cpu ${(x.used.cpuMillicores / 1000).toFixed(2)}/${x.capacity.cpuCores}` +
                ` mem ${bytes(x.used.memoryBytes)}/${bytes(x.capacity.memoryBytes)} disk ${bytes(x.used.diskBytes)}/${bytes(x.capacity.diskBytes)}` +
                ` containers ${x.containers.length}\n`,
            );
          }
        }
        return 0;
      }
      case "policy":
        return await policy(c, args, v, io, print);
      default:
        throw FerryError.invalid("command", `unknown command "${cmd}"`, "run `ferry --help` for the list");
    }
  } catch (e) {
    const fe = fromServiceError(e);
    io.err(`ferry: ${fe.message}${fe.fix && !fe.message.includes("fix:") ? ` (fix: ${fe.fix})` : ""}\n`);
    return 10 + (statusOf[fe.code] ?? 13);
  } finally {
    if (!client) c?.close();
  }
}

type Values = Record<string, string | boolean | string[] | undefined>;

async function migrate(c: ControllerClient, name: string, v: Values, io: Io): Promise<number> {
  const { migration } = await c.startMigration({
    container: name,
    destination: need("--to", v.to as string | undefined, "H"),
    strategy: choose("--strategy", v.strategy as string | undefined, STRATEGIES) ?? AdmissionStrategy.ADMISSION_STRATEGY_UNSPECIFIED,
    mode: choose("--mode", v.mode as string | undefined, MODES) ?? MigrationMode.MIGRATION_MODE_UNSPECIFIED,
  });
  const id = migration!.id;
  if (v.detach) {
    io.out(v.json ? JSON.stringify(Migration.toJSON(migration!), null, 2) + "\n" : `${id}\n`);
    return 0;
  }
  if (!v.json) io.out(`migration ${id}: ${name} ${migration!.source} → ${migration!.destination}\n`);
  let last = migration!;
  for await (const ev of c.watchMigration({ id })) {
    last = ev.migration ?? last;
    const s = ev.step;
    if (!v.json && s && s.state !== StepState.STEP_STATE_RUNNING && s.state !== StepState.STEP_STATE_PENDING) io.out(stepLine(s) + "\n");
  }
  // The stream ends with the migration; read the final record (with its totals) once more.
  last = (await c.getMigration({ id })).migration ?? last;
  if (v.json) io.out(JSON.stringify(Migration.toJSON(last), null, 2) + "\n");
  else io.out("\n" + breakdown(last));
  if (last.state !== MigrationState.MIGRATION_STATE_SUCCEEDED)
    io.err(`ferry: migration ${id} ${migrationState(last.state)}: ${last.error}\n`);
  return migrationExit(last);
}

async function policy(
  c: ControllerClient,
  args: string[],
  v: Values,
  io: Io,
  print: (d: unknown, h: () => string) => void,
): Promise<number> {
  const [sub, name] = args;
  const str = (k: string): string | undefined => v[k] as string | undefined;
  if (sub === "list" || sub === undefined) {
    const { policies } = await c.listPolicies({});
    print(
      policies.map((p) => Policy.toJSON(p)),
      () =>
        table(
          ["NAME", "RESOURCE", "THRESHOLD", "HOST", "CONTAINER", "SAMPLES", "COOLDOWN", "SCHEDULE", "ENABLED"],
          policies.map((p) => [
            p.name,
            lower(Resource[p.resource], "RESOURCE_"),
            `${Math.round(p.threshold * 100)}%`,
            p.host || "*",
            p.container || "(busiest)",
            `${p.sustainedSamples}`,
            `${p.cooldownSeconds}s`,
            p.schedule,
            p.enabled ? "yes" : "no",
          ]),
        ),
    );
    return 0;
  }
  if (sub === "set" && name) {
    const threshold = Number(need("--threshold", str("threshold"), "0.8"));
    if (!(threshold > 0 && threshold <= 1))
      throw FerryError.invalid("--threshold", `"${str("threshold")}" is not a share in (0, 1]`, "use e.g. 0.8 for 80%");
    const { policy: p } = await c.setPolicy({
      policy: {
        name,
        resource: choose("--resource", need("--resource", str("resource"), "cpu|memory|disk"), RESOURCES)!,
        threshold,
        host: str("host") ?? "",
        container: str("container") ?? "",
        sustainedSamples: Number(str("samples") ?? 0),
        cooldownSeconds: Number(str("cooldown") ?? 0),
        strategy: choose("--strategy", str("strategy"), STRATEGIES) ?? AdmissionStrategy.ADMISSION_STRATEGY_UNSPECIFIED,
        schedule: str("schedule") ?? "",
        enabled: !v.disabled,
      },
    });
    print(Policy.toJSON(p!), () => `policy ${p!.name} set\n`);
    return 0;
  }
  if (sub === "rm" && name) {
    await c.deletePolicy({ name });
    return 0;
  }
  throw FerryError.invalid(
    "policy",
    `unknown or incomplete sub-command "${args.join(" ")}"`,
    "use `ferry policy list`, `policy set NAME ...` or `policy rm NAME`",
  );
}
