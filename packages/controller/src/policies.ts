import { Policy, Resource } from "@ferry/api/controller";
import { FerryError, validateName } from "@ferry/common";
import { validate as validateCron } from "node-cron";
import { randomBytes } from "node:crypto";
import { mkdir, readFile, rename, writeFile } from "node:fs/promises";
import { join } from "node:path";

export const DEFAULT_SUSTAINED_SAMPLES = 3;
export const DEFAULT_COOLDOWN_SECONDS = 300;
/** node-cron with seconds: every 10 s. */
export const DEFAULT_SCHEDULE = "*/10 * * * * *";

/**
 * Checks a policy field by field and fills the defaults (3 samples, 300 s cool-down, every 10 s).
 * `hostExists` tells whether a named host is registered.
 */
export function normalizePolicy(p: Policy | undefined, hostExists: (name: string) => boolean): Policy {
  if (!p) throw FerryError.invalid("policy", "is required", "give the policy's name, resource and threshold");
  validateName("policy.name", p.name);
  if (![Resource.RESOURCE_CPU, Resource.RESOURCE_MEMORY, Resource.RESOURCE_DISK].includes(p.resource)) {
    throw FerryError.invalid("policy.resource", "is not set", "use cpu, memory or disk");
  }
  if (!(p.threshold > 0 && p.threshold <= 1)) {
    throw FerryError.invalid("policy.threshold", `${p.threshold} is not a share in (0, 1]`, "use e.g. 0.8 for 80%");
  }
  if (p.host) {
    validateName("policy.host", p.host);
    if (!hostExists(p.host))
      throw FerryError.notFound("host", p.host, "register the host first, or leave policy.host empty for every host");
  }
  if (p.container) validateName("policy.container", p.container);
  const sustained = p.sustainedSamples || DEFAULT_SUSTAINED_SAMPLES;
  if (sustained > 1000) throw FerryError.invalid("policy.sustained_samples", `${sustained} is over 1000`, "use a few samples, e.g. 3");
  const schedule = p.schedule || DEFAULT_SCHEDULE;
  if (!validateCron(schedule)) {
    throw FerryError.invalid(
      "policy.schedule",
      `"${schedule}" is not a cron expression`,
      'use node-cron syntax, e.g. "*/10 * * * * *" (every 10 s)',
    );
  }
  return {
    ...p,
    sustainedSamples: sustained,
    cooldownSeconds: p.cooldownSeconds || DEFAULT_COOLDOWN_SECONDS,
    schedule,
  };
}

/** The monitoring policies, persisted in `<stateDir>/policies.json` (Policy.toJSON form). */
export class PolicyStore {
  private readonly policies = new Map<string, Policy>();
  private chain: Promise<void> = Promise.resolve();

  constructor(private readonly stateDir?: string) {}

  async load(): Promise<void> {
    if (!this.stateDir) return;
    try {
      const raw = JSON.parse(await readFile(join(this.stateDir, "policies.json"), "utf8")) as unknown[];
      for (const j of raw) {
        const p = Policy.fromJSON(j);
        this.policies.set(p.name, p);
      }
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return;
      throw new FerryError("DataLoss", `policies.json unreadable: ${(e as Error).message}`, {
        fix: "fix or remove <state-dir>/policies.json",
      });
    }
  }

  list(): Policy[] {
    return [...this.policies.values()].sort((a, b) => a.name.localeCompare(b.name)).map((p) => ({ ...p }));
  }

  get(name: string): Policy | undefined {
    const p = this.policies.get(name);
    return p ? { ...p } : undefined;
  }

  async set(p: Policy): Promise<void> {
    this.policies.set(p.name, { ...p });
    await this.save();
  }

  async delete(name: string): Promise<void> {
    if (!this.policies.delete(name)) throw FerryError.notFound("policy", name, "list policies with `ferry policy list`");
    await this.save();
  }

  private save(): Promise<void> {
    const dir = this.stateDir;
    if (!dir) return Promise.resolve();
    const body = JSON.stringify(
      this.list().map((p) => Policy.toJSON(p)),
      null,
      1,
    );
    this.chain = this.chain
      .catch(() => undefined)
      .then(async () => {
        await mkdir(dir, { recursive: true, mode: 0o700 });
        const tmp = join(dir, `policies.json.tmp-${process.pid}-${randomBytes(3).toString("hex")}`);
        await writeFile(tmp, body, { mode: 0o600 });
        await rename(tmp, join(dir, "policies.json"));
      });
    return this.chain;
  }
}
