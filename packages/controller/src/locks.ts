import { FerryError } from "@ferry/common";

/**
 * "shared": any number of shared holders at once (several migrations through one host: MIRA's
 * parallel migrations). "exclusive": one holder, no shared ones (a container's migration; a
 * host's drain or removal).
 */
export type LockMode = "shared" | "exclusive";

export interface LockRequest {
  /** "<kind>:<name>", e.g. "container:web", "host:edge-a". */
  key: string;
  /** "exclusive" when absent. */
  mode?: LockMode;
}

export interface LockHolder {
  key: string;
  mode: LockMode;
  /** Who holds it, e.g. the migration id "m-123". */
  owner: string;
  /** How people should read the owner: "migration m-123 (edge-a → edge-b)". */
  what: string;
  /** The verb for an exclusive hold: `container "web" is being <doing> by <what>`; "used" by default and for shared holds. */
  doing: string;
  since: Date;
}

export interface AcquireOptions {
  /** See LockHolder.doing, e.g. "migrated", "drained", "removed". */
  doing?: string;
}

/** Releases what `tryAcquire` took; calling it again does nothing. */
export type Release = () => void;

/** A container lock: exclusive. */
export const containerLock = (name: string): LockRequest => ({ key: `container:${name}`, mode: "exclusive" });
/** A host lock: shared for migrations, exclusive for drain / remove. */
export const hostLock = (name: string, mode: LockMode = "shared"): LockRequest => ({ key: `host:${name}`, mode });

/**
 * Keyed locks per resource (STYLE.md point 11): a conflicting operation is refused at once with an
 * error that says who holds what, never queued silently. Not re-entrant: an owner asking again for
 * a key it holds exclusively is refused like anyone else.
 */
export class LockTable {
  private readonly held = new Map<string, LockHolder[]>();

  /**
   * Takes every key or none, synchronously (no await between the check and the take, so two
   * requests cannot both pass). Throws FailedPrecondition naming the holder on a conflict.
   */
  tryAcquire(keys: readonly (string | LockRequest)[], owner: string, what: string, opts: AcquireOptions = {}): Release {
    const wanted = new Map<string, LockMode>();
    for (const k of keys) {
      const r = typeof k === "string" ? { key: k } : k;
      if (!/^[a-z]+:\S+$/.test(r.key))
        throw FerryError.invalid("key", `lock key "${r.key}" is not "<kind>:<name>"`, 'use e.g. "container:web"');
      const mode = r.mode ?? "exclusive";
      // The same key twice in one request: the stronger mode wins.
      if (wanted.get(r.key) !== "exclusive") wanted.set(r.key, mode);
    }
    for (const [key, mode] of wanted) {
      const holders = this.held.get(key) ?? [];
      const blocker = holders.find((h) => mode === "exclusive" || h.mode === "exclusive");
      if (blocker) throw conflict(key, mode, blocker);
    }
    const since = new Date();
    const taken: LockHolder[] = [];
    for (const [key, mode] of wanted) {
      const h: LockHolder = { key, mode, owner, what, doing: opts.doing ?? "used", since };
      const list = this.held.get(key);
      if (list) list.push(h);
      else this.held.set(key, [h]);
      taken.push(h);
    }
    let released = false;
    return () => {
      if (released) return;
      released = true;
      for (const h of taken) {
        const list = this.held.get(h.key);
        if (!list) continue;
        const rest = list.filter((x) => x !== h);
        if (rest.length) this.held.set(h.key, rest);
        else this.held.delete(h.key);
      }
    };
  }

  /** Who holds the key (several when shared), or an empty list. */
  holders(key: string): LockHolder[] {
    return [...(this.held.get(key) ?? [])];
  }

  /** The first holder of the key, or undefined: what `ps` shows as "migrating <owner>". */
  holder(key: string): LockHolder | undefined {
    return this.held.get(key)?.[0];
  }

  /** Every held lock, for diagnostics. */
  all(): LockHolder[] {
    return [...this.held.values()].flat();
  }
}

function conflict(key: string, wanted: LockMode, h: LockHolder): FerryError {
  const i = key.indexOf(":");
  const kind = key.slice(0, i);
  const name = key.slice(i + 1);
  const shared = h.mode === "shared" && wanted === "exclusive" ? " (shared; this operation needs it alone)" : "";
  return new FerryError(
    "FailedPrecondition",
    // A shared hold is one user among several: "used", whatever the holder does with its other keys.
    `${kind} "${name}" is being ${h.mode === "shared" ? "used" : h.doing} by ${h.what}${shared}; retry when it ends or cancel it`,
    { data: { key, owner: h.owner, mode: h.mode, wanted } },
  );
}
