import { ContainerState, type ContainerInfo, type ContainerSpec, type ReadContainerLogResponse } from "@ferry/api/agent";
import type {
  Container,
  HostImage,
  RunContainerRequest,
  StopContainerRequest,
  DeleteContainerRequest,
  ReadContainerLogRequest,
} from "@ferry/api/controller";
import {
  FerryError,
  asFerryError,
  isDigest,
  macFromIp,
  parseIpv4Cidr,
  validateImageName,
  validateMac,
  validateName,
  type Logger,
} from "@ferry/common";
import { randomBytes } from "node:crypto";
import { checkAdmission, type StrategyName } from "./admission.js";
import { OVERLAY_BRIDGE, type HostRegistry } from "./hosts.js";
import { containerLock, hostLock, type LockTable } from "./locks.js";
import type { MigrationScheduler } from "./scheduler.js";
import type { Placement, Sdn } from "./sdn/index.js";

/** Where a container is, as last seen by its agent. */
export interface Located {
  host: string;
  info: ContainerInfo;
}

export interface ContainerServiceDeps {
  hosts: HostRegistry;
  locks: LockTable;
  scheduler: MigrationScheduler;
  sdn: Sdn;
  log: Logger;
  /** The admission strategy for RunContainer (the controller's default). */
  strategy: () => StrategyName;
  /** Deadline of single agent calls; default 30 000. */
  callTimeoutMs?: number;
}

const opKey = (what: string, name: string): string => `${what}-${name}-${Date.now().toString(36)}-${randomBytes(3).toString("hex")}`;

/**
 * Containers across all hosts: run (validated, unique name and overlay IP, admitted, network
 * installed), stop, delete (refused while a migration holds the container), list, locate. Keeps a
 * placement cache name → host, refreshed from the agents.
 */
export class ContainerService {
  /** name → last known placement; entries of an unreachable host are kept until it answers again. */
  private readonly placements = new Map<string, Located>();
  private readonly timeoutMs: number;

  constructor(private readonly d: ContainerServiceDeps) {
    this.timeoutMs = d.callTimeoutMs ?? 30_000;
  }

  /** Asks every reachable host (or one) for its containers and updates the cache. */
  async refresh(only?: string): Promise<Located[]> {
    const names = only ? [only] : this.d.hosts.names();
    const out: Located[] = [];
    await Promise.all(
      names.map(async (host) => {
        if (!this.d.hosts.isReachable(host)) {
          for (const p of this.placements.values()) if (p.host === host) out.push(p);
          return;
        }
        let list: ContainerInfo[];
        try {
          list = (await this.d.hosts.client(host).listContainers({}, { timeoutMs: this.timeoutMs })).containers;
        } catch (e) {
          this.agentFailed(host, e);
          for (const p of this.placements.values()) if (p.host === host) out.push(p);
          return;
        }
        for (const [name, p] of this.placements)
          if (p.host === host && !list.some((c) => c.spec?.name === name)) this.placements.delete(name);
        for (const info of list) {
          const name = info.spec?.name;
          if (!name) continue;
          const l = { host, info };
          out.push(l);
          const cur = this.placements.get(name);
          // Mid-migration both hosts report it: the running copy wins over a checkpointed one.
          const curRunning = cur?.info.state === ContainerState.CONTAINER_STATE_RUNNING;
          if (!cur || cur.host === host || (!curRunning && info.state === ContainerState.CONTAINER_STATE_RUNNING))
            this.placements.set(name, l);
        }
      }),
    );
    return out;
  }

  /** Where the container is: the cache, else a refresh. NotFound when no host has it. */
  async locate(name: string): Promise<Located> {
    validateName("name", name);
    let p = this.placements.get(name);
    if (!p) {
      await this.refresh();
      p = this.placements.get(name);
    }
    if (!p) throw FerryError.notFound("container", name, "list containers with `ferry ps`");
    return p;
  }

  /** After a migration: the container is now on `host` (with the destination's view of it). */
  placed(name: string, host: string, info?: ContainerInfo): void {
    const cur = this.placements.get(name);
    const i = info ?? cur?.info;
    if (i) this.placements.set(name, { host, info: i });
  }

  /**
   * Re-installs every known container's flows on every reachable host: a host that was just
   * registered, or was unreachable while containers were created or moved, gets the current paths.
   * Containers held by a migration are left to it.
   */
  async resyncFlows(): Promise<number> {
    await this.refresh();
    let n = 0;
    for (const [name, p] of this.placements) {
      const net = p.info.spec?.network;
      if (!net?.ipCidr || !net.ofport || this.d.locks.holder(containerLock(name).key)) continue;
      const placement: Placement = {
        container: name,
        ip: net.ipCidr.split("/")[0]!,
        mac: net.mac,
        host: p.host,
        ofport: net.ofport,
        opId: opKey("resync", name),
      };
      try {
        await this.d.sdn.install(placement, AbortSignal.timeout(this.timeoutMs));
        n++;
      } catch (e) {
        this.d.log.warn({ container: name, host: p.host, err: asFerryError(e).message }, "flows not re-installed");
      }
    }
    return n;
  }

  /** The migration holding the container's lock, if any. */
  migratingId(name: string): string {
    const h = this.d.locks.holder(containerLock(name).key);
    return h && h.owner.startsWith("m-") ? h.owner : "";
  }

  async run(req: RunContainerRequest): Promise<Container> {
    const host = validateName("host", req.host);
    const spec = validateSpec(req.spec);
    const name = spec.name;
    this.d.hosts.requireReady("host", host, true);
    const release = this.d.locks.tryAcquire(
      [containerLock(name), hostLock(host)],
      opKey("run", name),
      `a request to run "${name}" on ${host}`,
      {
        doing: "created",
      },
    );
    try {
      const all = await this.refresh();
      const same = all.find((c) => c.info.spec?.name === name);
      if (same) {
        throw new FerryError("AlreadyExists", `container "${name}" already exists on ${same.host}`, {
          field: "spec.name",
          fix: "pick another name, or delete the old container first",
        });
      }
      const ip = spec.network!.ipCidr.split("/")[0]!;
      const clash = all.find((c) => (c.info.spec?.network?.ipCidr ?? "").split("/")[0] === ip);
      if (clash) {
        throw new FerryError(
          "AlreadyExists",
          `overlay address ${ip} is already used by container "${clash.info.spec?.name}" on ${clash.host}`,
          {
            field: "spec.network.ip_cidr",
            fix: "pick a free address on the overlay",
          },
        );
      }
      const client = this.d.hosts.client(host);
      const resources = await this.agentCall(host, () => client.getResources({}, { timeoutMs: this.timeoutMs }));
      checkAdmission({
        host,
        resources,
        strategy: this.d.strategy(),
        reserved: this.d.scheduler.reserved(host),
        incoming: {
          name,
          cpuMillicores: spec.cpuMillicores,
          memoryLimitBytes: spec.memoryLimitBytes,
          imageBytes: 0,
          upperBytes: 0,
          checkpointBytes: 0,
        },
      });
      const key = opKey("run", name);
      const created = await this.agentCall(host, () =>
        client.createContainer({ operationKey: `${key}/create`, spec, createNetns: true }, { timeoutMs: this.timeoutMs }),
      );
      let info = created.container;
      try {
        const ofport = info?.spec?.network?.ofport ?? 0;
        const placement: Placement = { container: name, ip, mac: spec.network!.mac, host, ofport, opId: key };
        await this.d.sdn.install(placement, AbortSignal.timeout(this.timeoutMs));
        info = (
          await this.agentCall(host, () => client.startContainer({ operationKey: `${key}/start`, name }, { timeoutMs: this.timeoutMs }))
        ).container;
      } catch (e) {
        // Undo: nothing half-made stays behind (the flows are removed, the container and its netns deleted).
        const undo = AbortSignal.timeout(this.timeoutMs);
        await this.d.sdn.remove({ container: name, ip, mac: spec.network!.mac, host, opId: `${key}/undo` }, undo).catch(() => undefined);
        await client.deleteContainer({ operationKey: `${key}/undo`, name, force: true }, { signal: undo }).catch((err: unknown) => {
          this.d.log.error({ container: name, host, err: asFerryError(err).message }, "run: undo failed, delete the container by hand");
        });
        throw e;
      }
      if (!info) throw new FerryError("Internal", `the agent of ${host} returned no container for "${name}"`);
      this.placements.set(name, { host, info });
      this.d.log.info({ container: name, host, ip }, "container running");
      return { host, info, migrating: "" };
    } finally {
      release();
    }
  }

  async stop(req: StopContainerRequest): Promise<Container> {
    const p = await this.locate(req.name);
    const release = this.d.locks.tryAcquire([containerLock(req.name)], opKey("stop", req.name), `a request to stop "${req.name}"`, {
      doing: "stopped",
    });
    try {
      const client = this.d.hosts.client(p.host);
      const r = await this.agentCall(p.host, () =>
        client.stopContainer(
          { operationKey: opKey("stop", req.name), name: req.name, timeoutMs: req.timeoutMs || 5000 },
          { timeoutMs: this.timeoutMs + (req.timeoutMs || 5000) },
        ),
      );
      if (r.container) this.placements.set(req.name, { host: p.host, info: r.container });
      return { host: p.host, info: r.container, migrating: "" };
    } finally {
      release();
    }
  }

  async delete(req: DeleteContainerRequest): Promise<void> {
    const p = await this.locate(req.name);
    const release = this.d.locks.tryAcquire([containerLock(req.name)], opKey("rm", req.name), `a request to delete "${req.name}"`, {
      doing: "deleted",
    });
    try {
      const key = opKey("rm", req.name);
      const client = this.d.hosts.client(p.host);
      await this.agentCall(p.host, () =>
        client.deleteContainer({ operationKey: key, name: req.name, force: req.force }, { timeoutMs: this.timeoutMs }),
      );
      this.placements.delete(req.name);
      const net = p.info.spec?.network;
      if (net?.ipCidr) {
        const ip = net.ipCidr.split("/")[0]!;
        await this.d.sdn
          .remove({ container: req.name, ip, mac: net.mac, host: p.host, opId: key }, AbortSignal.timeout(this.timeoutMs))
          .catch((e: unknown) => {
            this.d.log.warn({ container: req.name, err: asFerryError(e).message }, "flows not removed");
          });
      }
    } finally {
      release();
    }
  }

  async list(host?: string): Promise<Container[]> {
    if (host) this.d.hosts.get(host);
    const all = await this.refresh(host || undefined);
    return all
      .map((c) => ({ host: c.host, info: c.info, migrating: this.migratingId(c.info.spec?.name ?? "") }))
      .sort((a, b) => (a.info.spec?.name ?? "").localeCompare(b.info.spec?.name ?? "") || a.host.localeCompare(b.host));
  }

  async where(name: string): Promise<Container> {
    let p = await this.locate(name);
    try {
      const r = await this.d.hosts.client(p.host).inspectContainer({ name }, { timeoutMs: this.timeoutMs });
      if (r.container) p = { host: p.host, info: r.container };
    } catch (e) {
      const fe = asFerryError(e);
      if (fe.code !== "NotFound") this.agentFailed(p.host, e);
      else {
        this.placements.delete(name);
        p = await this.locate(name);
      }
    }
    return { host: p.host, info: p.info, migrating: this.migratingId(name) };
  }

  async *readLog(req: ReadContainerLogRequest, signal: AbortSignal): AsyncIterable<ReadContainerLogResponse> {
    const p = await this.locate(req.name);
    yield* this.d.hosts.client(p.host).readContainerLog({ name: req.name, offset: req.offset, follow: req.follow }, { signal });
  }

  async images(host?: string): Promise<HostImage[]> {
    const names = host ? [this.d.hosts.get(host).saved.name] : this.d.hosts.names().filter((h) => this.d.hosts.isReachable(h));
    const lists = await Promise.all(
      names.map(async (h) => {
        const { images } = await this.agentCall(h, () => this.d.hosts.client(h).listImages({}, { timeoutMs: this.timeoutMs }));
        return images.map((image) => ({ host: h, image }));
      }),
    );
    return lists.flat();
  }

  /** Runs an agent call; an Unavailable answer marks the host unreachable. */
  async agentCall<T>(host: string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      this.agentFailed(host, e);
      throw e;
    }
  }

  private agentFailed(host: string, e: unknown): void {
    const fe = asFerryError(e);
    if (fe.code === "Unavailable") this.d.hosts.markUnreachable(host, fe);
  }
}

/** Checks a RunContainer spec field by field; returns it with defaults (MAC from the IP, the overlay bridge). */
export function validateSpec(s: ContainerSpec | undefined): ContainerSpec {
  if (!s) throw FerryError.invalid("spec", "is required", "give the container's name, image, command and network");
  validateName("spec.name", s.name);
  if (!s.image) throw FerryError.invalid("spec.image", "is required", 'give an image name or "sha256:<hex>"');
  if (!isDigest(s.image)) validateImageName("spec.image", s.image);
  if (s.args.length === 0)
    throw FerryError.invalid("spec.args", "no command given", 'give the command to run, e.g. ["/bin/ferry-echo", "7000"]');
  s.env.forEach((e, i) => {
    if (!/^[A-Za-z_][A-Za-z0-9_]*=/.test(e)) throw FerryError.invalid(`spec.env[${i}]`, `"${e}" is not KEY=VALUE`, "write it as KEY=VALUE");
  });
  if (s.cwd && !s.cwd.startsWith("/"))
    throw FerryError.invalid("spec.cwd", `"${s.cwd}" is not absolute`, "use an absolute path inside the image");
  if (!s.network?.ipCidr) throw FerryError.invalid("spec.network.ip_cidr", "is required", 'give the overlay address, e.g. "10.77.0.10/24"');
  const { ip } = parseIpv4Cidr("spec.network.ip_cidr", s.network.ipCidr);
  const mac = s.network.mac ? validateMac("spec.network.mac", s.network.mac) : macFromIp(ip);
  if (s.network.bridge && s.network.bridge !== OVERLAY_BRIDGE) {
    throw FerryError.invalid(
      "spec.network.bridge",
      `"${s.network.bridge}" is not the overlay bridge`,
      `leave it empty or use "${OVERLAY_BRIDGE}"`,
    );
  }
  for (const [k, v] of Object.entries(s.labels)) {
    if (!/^[A-Za-z0-9._/-]{1,63}$/.test(k))
      throw FerryError.invalid("spec.labels", `label key "${k}" is not valid`, "use letters, digits, '.', '_', '/' or '-'");
    if (v.length > 256) throw FerryError.invalid(`spec.labels.${k}`, "is over 256 characters", "shorten it");
  }
  return { ...s, network: { ...s.network, mac, bridge: OVERLAY_BRIDGE, ofport: 0 } };
}
