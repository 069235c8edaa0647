import { FerryError, validateMac, validateName } from "@ferry/common";
import type { PathSwitch, Placement, Sdn, SdnResult } from "./types.js";

/*
 * Backend "onos": ONOS's REST API (http://<onos>:8181/onos/v1, HTTP basic auth), doing what MIRA!
 * did (MOSAIC-LAB-AALTO/MIRA- MIRA/onosMirai.py): point-to-point intents between each peer's
 * attachment point and the container's, forward and return, the return at a higher priority
 * (MIRA: 100 and 300); a path switch withdraws the old path's intents, then submits the new ones.
 *
 * Checked against ONOS's source (opennetworkinglab/onos):
 * - web/api/.../IntentsWebResource.java: POST /intents decodes with IntentCodec, submits, answers
 *   201 with Location <base>/intents/<appId>/<intent id fingerprint, decimal> (the intent's ID, not
 *   its key). DELETE /intents/{appId}/{key}: unknown app -> 404 "Application Id not found"; looks up
 *   Key.of(key) as a string key, then Key.of(Long.decode(key)); absent -> 204; else withdraw, wait
 *   up to 5 s, purge, 204. Long.decode of a non-numeric key that is absent throws
 *   NumberFormatException -> 400 "For input string: ..." (IllegalArgumentExceptionMapper): this
 *   client treats that 400 as "absent" on DELETE and GET. GET /intents/{appId}/{key} likewise.
 * - core/common/.../IntentCodec.java intentAttributes: "appId" required (400 "appId member is
 *   required in Intent"), unknown app -> nullIsNotFound -> 404 "Application ID is not found";
 *   "priority" optional; "key" (newer ONOS; see the copy in the openroadm codec IntentCodecUtils):
 *   "0x..." -> LongKey, anything else -> StringKey. Ferry's keys are strings "ferry:<container>:...".
 * - PointToPointIntentCodec: ingressPoint/egressPoint required ({"device","port"}, ConnectPointCodec;
 *   port read with asText, so strings); HostToHostIntentCodec: "one"/"two" required ("MAC/VLAN").
 * - ConnectivityIntentCodec: optional "selector" {"criteria":[...]}, "treatment", "constraints";
 *   DecodeCriterionCodecHelper: ETH_SRC/ETH_DST take "mac", IPV4_DST "ip", ETH_TYPE int or "0x0800".
 * - FlowsWebResource.createFlow: POST /flows/{deviceId}?appId=, body deviceId must match the path
 *   (else 400), 201 with Location <base>/flows/<deviceId>/<flow id, decimal signed 64-bit: kept as a
 *   string, it exceeds 2^53>; DELETE /flows/{deviceId}/{flowId} -> 204, 404 "Device is not found"
 *   when the device has no flows. FlowRuleCodec: "priority" and "isPermanent" required, "timeout"
 *   when not permanent; any appId is registered on the fly.
 * - ApplicationsWebResource: DELETE /applications/{name}/active -> 204 (also for an unknown app);
 *   GET /applications/ids/entry?name= -> 404 "Application ID is not found" when not registered.
 * - HostCodec: hosts have "locations":[{elementId,port}]; older ONOS (definitions/Host.json) had a
 *   single "location": both are accepted.
 * - utils/rest/.../AbstractMapper.java: error bodies are {"code":<status>,"message":"..."}.
 */

// ---------------------------------------------------------------------------------------------
// JSON shapes (as ONOS's codecs read them)

export interface OnosConnectPoint {
  device: string;
  port: string;
}

export type OnosCriterion = { type: string } & Record<string, string | number>;

export interface OnosSelector {
  criteria: OnosCriterion[];
}

export interface OnosTreatment {
  instructions: ({ type: string } & Record<string, string | number>)[];
}

interface IntentBase {
  appId: string;
  key?: string;
  priority?: number;
  selector?: OnosSelector;
  treatment?: OnosTreatment;
  constraints?: Record<string, unknown>[];
}

export interface PointToPointIntent extends IntentBase {
  type: "PointToPointIntent";
  ingressPoint: OnosConnectPoint;
  egressPoint: OnosConnectPoint;
}

export interface HostToHostIntent extends IntentBase {
  type: "HostToHostIntent";
  /** "MAC/VLAN", "-1" for none: "46:E4:3C:A4:17:C8/-1". */
  one: string;
  two: string;
}

export type OnosIntent = PointToPointIntent | HostToHostIntent;

/** An intent as GET /intents encodes it (type, id, key, appId, state, ... plus the type's fields). */
export type OnosIntentInfo = { type: string; id?: string; key?: string; appId: string; state?: string } & Record<string, unknown>;

export interface OnosFlowRule {
  priority: number;
  timeout: number;
  isPermanent: boolean;
  deviceId: string;
  tableId?: number;
  treatment?: OnosTreatment;
  selector?: OnosSelector;
}

export interface OnosHostLocation {
  elementId: string;
  port: string;
}

export interface OnosHost {
  id: string;
  mac: string;
  vlan: string;
  ipAddresses: string[];
  /** ONOS ≥ 1.12. */
  locations?: OnosHostLocation[];
  /** Older ONOS. */
  location?: OnosHostLocation;
}

/** A host's attachment points, whichever of `locations` / `location` this ONOS sends. */
export function hostLocations(h: OnosHost): OnosHostLocation[] {
  if (Array.isArray(h.locations) && h.locations.length) return h.locations;
  return h.location ? [h.location] : [];
}

/** "of:0000000000000002", "ovsdb:10.0.0.1", ... */
const DEVICE_ID = /^[a-z][a-z0-9]*:[A-Za-z0-9:._/-]{1,128}$/;
const PORT = /^([1-9][0-9]{0,9}|[A-Z_]{1,16})$/;

export function validateDeviceId(field: string, v: string): string {
  if (!DEVICE_ID.test(v))
    throw FerryError.invalid(field, `"${v}" is not an ONOS device id`, 'write it as ONOS shows it, e.g. "of:0000000000000002"');
  return v;
}

function portString(field: string, v: string | number): string {
  const s = String(v);
  if (!PORT.test(s)) throw FerryError.invalid(field, `"${s}" is not an ONOS port number`, 'give the OpenFlow port number, e.g. 3 or "3"');
  return s;
}

/** ONOS's host id for a MAC without VLAN: upper-case MAC + "/-1" (HostId.toString). */
export function onosHostId(mac: string): string {
  return `${mac.toUpperCase()}/-1`;
}

// ---------------------------------------------------------------------------------------------
// REST client

export interface OnosClientOptions {
  /** "http://10.0.0.5:8181/onos/v1" (see {@link onosBaseUrl}). */
  url: string;
  user: string;
  password: string;
  /** Per request; ONOS's DELETE /intents alone may wait 5 s for the withdrawal. Default 15 s. */
  timeoutMs?: number;
  /** Injected for tests; the global fetch of Node 20 by default. */
  fetch?: typeof fetch;
}

/** "10.0.0.5" → "http://10.0.0.5:8181/onos/v1". */
export function onosBaseUrl(host: string, port = 8181): string {
  return `http://${host}:${port}/onos/v1`;
}

interface OnosResponse {
  status: number;
  headers: Headers;
  text: string;
}

/** The ONOS message of an error body ({"code","message"} from AbstractMapper), else the raw text. */
function onosMessage(text: string): string {
  try {
    const j = JSON.parse(text) as { message?: unknown };
    if (typeof j.message === "string") return j.message;
  } catch {
    // not JSON (Jetty's own 401/404 pages)
  }
  return text
    .replace(/<[^>]*>/g, " ")
    .replace(/\s+/g, " ")
    .trim()
    .slice(0, 300);
}

/** True for the 400 ONOS answers when a non-numeric intent key is absent (Long.decode fallback). */
function isAbsentKey400(r: OnosResponse): boolean {
  return r.status === 400 && /^For input string/.test(onosMessage(r.text));
}

/** A small, typed client for the parts of ONOS's REST API Ferry uses. Errors are FerryErrors. */
export class OnosClient {
  private readonly base: string;
  private readonly auth: string;
  private readonly timeoutMs: number;
  private readonly fetchFn: typeof fetch;

  constructor(opts: OnosClientOptions) {
    let u: URL;
    try {
      u = new URL(opts.url);
    } catch {
      throw FerryError.invalid("onos.url", `"${opts.url}" is not a URL`, 'use e.g. "http://10.0.0.5:8181/onos/v1"');
    }
    if (u.protocol !== "http:" && u.protocol !== "https:") {
      throw FerryError.invalid("onos.url", `"${opts.url}" is not an http(s) URL`, 'use e.g. "http://10.0.0.5:8181/onos/v1"');
    }
    this.base = opts.url.replace(/\/+$/, "");
    this.auth = "Basic " + Buffer.from(`${opts.user}:${opts.password}`).toString("base64");
    this.timeoutMs = opts.timeoutMs ?? 15_000;
    this.fetchFn = opts.fetch ?? fetch;
  }

  get url(): string {
    return this.base;
  }

  /** POST /intents → 201. Returns the Location and the intent id ONOS put in it. */
  async submitIntent(intent: OnosIntent, signal?: AbortSignal): Promise<{ location: string; intentId: string }> {
    const r = await this.call("POST", "/intents", intent, signal);
    this.expect(r, "POST", "/intents", [201, 200]);
    const location = r.headers.get("location") ?? "";
    const [, id] = lastSegments(location, this.base);
    return { location, intentId: id ?? "" };
  }

  /** GET /intents/{appId}/{key}; undefined when ONOS has no such intent. */
  async getIntent(appId: string, key: string, signal?: AbortSignal): Promise<OnosIntentInfo | undefined> {
    const path = `/intents/${enc(appId)}/${enc(key)}`;
    const r = await this.call("GET", path, undefined, signal);
    if (isAbsentKey400(r) || (r.status === 404 && /Intent is not found/i.test(onosMessage(r.text)))) return undefined;
    this.expect(r, "GET", path, [200]);
    return JSON.parse(r.text) as OnosIntentInfo;
  }

  async listIntents(signal?: AbortSignal): Promise<OnosIntentInfo[]> {
    const r = await this.call("GET", "/intents", undefined, signal);
    this.expect(r, "GET", "/intents", [200]);
    return (JSON.parse(r.text) as { intents?: OnosIntentInfo[] }).intents ?? [];
  }

  /** DELETE /intents/{appId}/{key}: withdraw and purge; fine when absent (idempotent). */
  async withdrawIntent(appId: string, key: string, signal?: AbortSignal): Promise<void> {
    const path = `/intents/${enc(appId)}/${enc(key)}`;
    const r = await this.call("DELETE", path, undefined, signal);
    if (isAbsentKey400(r)) return;
    this.expect(r, "DELETE", path, [204, 200]);
  }

  /** POST /flows/{deviceId}?appId= → 201; the flow id (from Location) stays a string: it is 64-bit. */
  async addFlow(rule: OnosFlowRule, appId?: string, signal?: AbortSignal): Promise<{ deviceId: string; flowId: string }> {
    validateDeviceId("deviceId", rule.deviceId);
    const path = `/flows/${enc(rule.deviceId)}${appId ? `?appId=${encodeURIComponent(appId)}` : ""}`;
    const r = await this.call("POST", path, rule, signal);
    this.expect(r, "POST", path, [201, 200]);
    const location = r.headers.get("location") ?? "";
    const [deviceId, flowId] = lastSegments(location, this.base);
    if (!flowId || !/^-?\d+$/.test(flowId)) {
      throw new FerryError("Internal", `ONOS answered POST ${path} without a flow id in Location ("${location}")`, {
        fix: "check the ONOS version: FlowsWebResource.createFlow sets Location to /flows/<deviceId>/<flowId>",
      });
    }
    return { deviceId: deviceId ?? rule.deviceId, flowId };
  }

  /** DELETE /flows/{deviceId}/{flowId}; a device without flows (404 "Device is not found") counts as done. */
  async deleteFlow(deviceId: string, flowId: string, signal?: AbortSignal): Promise<void> {
    const path = `/flows/${enc(deviceId)}/${enc(flowId)}`;
    const r = await this.call("DELETE", path, undefined, signal);
    if (r.status === 404 && /Device is not found/i.test(onosMessage(r.text))) return;
    this.expect(r, "DELETE", path, [204, 200]);
  }

  async hosts(signal?: AbortSignal): Promise<OnosHost[]> {
    const r = await this.call("GET", "/hosts", undefined, signal);
    this.expect(r, "GET", "/hosts", [200]);
    return (JSON.parse(r.text) as { hosts?: OnosHost[] }).hosts ?? [];
  }

  async devices(signal?: AbortSignal): Promise<Record<string, unknown>[]> {
    const r = await this.call("GET", "/devices", undefined, signal);
    this.expect(r, "GET", "/devices", [200]);
    return (JSON.parse(r.text) as { devices?: Record<string, unknown>[] }).devices ?? [];
  }

  /** GET /applications/ids/entry?name=: the registered app id, or undefined (404). */
  async appId(name: string, signal?: AbortSignal): Promise<{ id: number; name: string } | undefined> {
    const path = `/applications/ids/entry?name=${encodeURIComponent(name)}`;
    const r = await this.call("GET", path, undefined, signal);
    if (r.status === 404) return undefined;
    this.expect(r, "GET", path, [200]);
    return JSON.parse(r.text) as { id: number; name: string };
  }

  /** DELETE /applications/{name}/active: deactivate (204, also when not installed). */
  async deactivateApp(name: string, signal?: AbortSignal): Promise<void> {
    const path = `/applications/${enc(name)}/active`;
    const r = await this.call("DELETE", path, undefined, signal);
    this.expect(r, "DELETE", path, [204, 200]);
  }

  private async call(method: string, path: string, body: unknown, signal?: AbortSignal): Promise<OnosResponse> {
    const timeout = AbortSignal.timeout(this.timeoutMs);
    const headers: Record<string, string> = { Authorization: this.auth, Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    try {
      const res = await this.fetchFn(this.base + path, {
        method,
        headers,
        ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
        signal: signal ? AbortSignal.any([signal, timeout]) : timeout,
        redirect: "manual",
      });
      return { status: res.status, headers: res.headers, text: await res.text() };
    } catch (e) {
      throw this.transportError(e, method, path, signal, timeout);
    }
  }

  private transportError(e: unknown, method: string, path: string, signal: AbortSignal | undefined, timeout: AbortSignal): FerryError {
    const what = `${method} ${this.base}${path}`;
    if (signal?.aborted) return new FerryError("Cancelled", `${what} cancelled`, { cause: e });
    if (timeout.aborted) {
      return new FerryError("DeadlineExceeded", `${what}: ONOS did not answer within ${this.timeoutMs} ms`, {
        fix: "check that ONOS is up and not overloaded, or raise the ONOS request timeout",
        cause: e,
      });
    }
    const cause = (e as { cause?: { code?: string; message?: string } }).cause;
    const reason = cause?.code ?? cause?.message ?? (e instanceof Error ? e.message : String(e));
    return new FerryError("Unavailable", `${what}: ONOS is unreachable (${reason})`, {
      fix: "check --onos-url and that ONOS is running and listening on port 8181",
      data: { reason },
      cause: e,
    });
  }

  private expect(r: OnosResponse, method: string, path: string, ok: number[]): void {
    if (ok.includes(r.status)) return;
    throw onosError(r.status, r.text, method, path);
  }
}

/** A non-2xx answer of ONOS as a FerryError carrying ONOS's status and message. */
export function onosError(status: number, text: string, method: string, path: string): FerryError {
  const msg = onosMessage(text);
  const data = { status, body: text.slice(0, 2000), method, path };
  const head = `ONOS answered ${status} to ${method} ${path}${msg ? `: ${msg}` : ""}`;
  if (status === 401 || status === 403) {
    return new FerryError("PermissionDenied", head, {
      field: "onos.user",
      fix: "check --onos-user/--onos-password (ONOS's default is onos/rocks)",
      data,
    });
  }
  if (status === 404 && /Application I[Dd] (is )?not found/.test(msg)) {
    return new FerryError("FailedPrecondition", head, {
      field: "onos.appId",
      fix: "Application ID is not found: activate the app in ONOS (onos-app <host> activate <appId>) or set --onos-app-id to an active one",
      data,
    });
  }
  if (status === 404) return new FerryError("NotFound", head, { data });
  if (status === 400 || status === 415 || status === 422) {
    return new FerryError("InvalidArgument", head, { fix: "the request does not match ONOS's JSON codec; see the message", data });
  }
  if (status === 409) return new FerryError("Aborted", head, { data });
  if (status === 502 || status === 503 || status === 504)
    return new FerryError("Unavailable", head, { fix: "ONOS is starting or overloaded; retry", data });
  return new FerryError("Internal", head, { data });
}

/** A path segment as ONOS's docs write them: "of:0000000000000001" keeps its colon (a valid pchar). */
function enc(s: string): string {
  return encodeURIComponent(s).replace(/%3A/gi, ":");
}

/** The last two path segments of a Location header, decoded ("/onos/v1/flows/of:1/42" → ["of:1","42"]). */
export function lastSegments(location: string, base: string): [string | undefined, string | undefined] {
  if (!location) return [undefined, undefined];
  let p: string;
  try {
    p = new URL(location, base + "/").pathname;
  } catch {
    return [undefined, undefined];
  }
  const parts = p
    .split("/")
    .filter(Boolean)
    .map((x) => decodeURIComponent(x));
  return [parts.at(-2), parts.at(-1)];
}

// ---------------------------------------------------------------------------------------------
// The backend

/** Something the container talks to (a client, a gateway): the other end of its intents. */
export interface OnosPeer {
  /** [a-z0-9-]: part of the intent keys. */
  name: string;
  mac: string;
  /** Fallback when GET /hosts does not know the MAC yet. */
  deviceId?: string;
  port?: string | number;
}

export interface OnosSdnConfig {
  url: string;
  user?: string;
  password?: string;
  /** Must be a registered ONOS app (IntentCodec refuses others). Default "org.onosproject.ovsdb". */
  appId?: string;
  /** "p2p": PointToPointIntents forward and return (MIRA!); "h2h": one HostToHostIntent per peer. */
  mode?: "p2p" | "h2h";
  /** Forward (peer → container) intents; default 100 (MIRA's forward priority). */
  priority?: number;
  /** Return (container → peer) intents; must be higher; default 300 (MIRA's return priority). */
  returnPriority?: number;
  /** Ferry host → its ONOS device and, optionally, the port towards the container. */
  hosts?: Record<string, { deviceId: string; port?: string | number }>;
  peers: OnosPeer[];
  /** DELETE /applications/org.onosproject.fwd/active at init, as MIRA! did (reactive forwarding off). */
  disableReactiveForwarding?: boolean;
  /** After submitting, poll until every new intent is INSTALLED, up to this long; 0 = don't wait. Default 5000. */
  waitInstalledMs?: number;
  pollMs?: number;
  requestTimeoutMs?: number;
  fetch?: typeof fetch;
}

export const DEFAULT_ONOS_APP_ID = "org.onosproject.ovsdb";
export const REACTIVE_FORWARDING_APP = "org.onosproject.fwd";

type Role = "fwd" | "ret" | "h2h";

/**
 * The key of one of a container's intents: `ferry:<container>:<host>:<peer>:<fwd|ret|h2h>`.
 * Deterministic, so a revert, a retry or a restarted controller finds and withdraws them; never
 * "0x..." (IntentCodec would read that as a LongKey).
 */
export function intentKey(container: string, host: string, peer: string, role: Role): string {
  return `ferry:${container}:${host}:${peer}:${role}`;
}

/** One operation's view of GET /hosts, fetched at most once. */
class HostDiscovery {
  private hosts?: Promise<OnosHost[]>;
  constructor(
    private readonly client: OnosClient,
    private readonly signal: AbortSignal,
  ) {}

  async locationsOf(mac: string): Promise<OnosHostLocation[]> {
    this.hosts ??= this.client.hosts(this.signal);
    const m = mac.toUpperCase();
    const h = (await this.hosts).find((x) => (x.mac ?? "").toUpperCase() === m || (x.id ?? "").toUpperCase().startsWith(m + "/"));
    return h ? hostLocations(h) : [];
  }
}

export class OnosSdn implements Sdn {
  readonly name = "onos" as const;
  readonly client: OnosClient;
  private readonly appId: string;
  private readonly mode: "p2p" | "h2h";
  private readonly priority: number;
  private readonly returnPriority: number;
  private readonly hosts: Record<string, { deviceId: string; port?: string }>;
  private readonly peers: { name: string; mac: string; deviceId?: string; port?: string }[];
  private readonly waitInstalledMs: number;
  private readonly pollMs: number;

  constructor(private readonly cfg: OnosSdnConfig) {
    this.client = new OnosClient({
      url: cfg.url,
      user: cfg.user ?? "onos",
      password: cfg.password ?? "rocks",
      ...(cfg.requestTimeoutMs ? { timeoutMs: cfg.requestTimeoutMs } : {}),
      ...(cfg.fetch ? { fetch: cfg.fetch } : {}),
    });
    this.appId = cfg.appId ?? DEFAULT_ONOS_APP_ID;
    this.mode = cfg.mode ?? "p2p";
    this.priority = cfg.priority ?? 100;
    this.returnPriority = cfg.returnPriority ?? 300;
    if (this.mode !== "p2p" && this.mode !== "h2h")
      throw FerryError.invalid("onos.mode", `"${String(this.mode)}" is not a mode`, 'use "p2p" or "h2h"');
    for (const [f, v] of [
      ["onos.priority", this.priority],
      ["onos.returnPriority", this.returnPriority],
    ] as const) {
      if (!Number.isInteger(v) || v < 1 || v > 65535) throw FerryError.invalid(f, `${v} is out of range`, "use 1-65535");
    }
    if (this.returnPriority <= this.priority) {
      throw FerryError.invalid(
        "onos.returnPriority",
        `${this.returnPriority} is not above the forward priority ${this.priority}`,
        "give return intents a higher priority than forward ones (MIRA: 300 over 100)",
      );
    }
    this.hosts = {};
    for (const [h, v] of Object.entries(cfg.hosts ?? {})) {
      this.hosts[h] = {
        deviceId: validateDeviceId(`onos.hosts.${h}.deviceId`, v.deviceId),
        ...(v.port !== undefined ? { port: portString(`onos.hosts.${h}.port`, v.port) } : {}),
      };
    }
    if (!cfg.peers?.length) {
      throw FerryError.invalid(
        "onos.peers",
        "no peers",
        "name at least one peer (client or gateway MAC) the container's intents connect to",
      );
    }
    this.peers = cfg.peers.map((p, i) => ({
      name: validateName(`onos.peers[${i}].name`, p.name),
      mac: validateMac(`onos.peers[${i}].mac`, p.mac),
      ...(p.deviceId ? { deviceId: validateDeviceId(`onos.peers[${i}].deviceId`, p.deviceId) } : {}),
      ...(p.port !== undefined ? { port: portString(`onos.peers[${i}].port`, p.port) } : {}),
    }));
    this.waitInstalledMs = cfg.waitInstalledMs ?? 5000;
    this.pollMs = cfg.pollMs ?? 50;
  }

  /** Check the app id is registered (fail at start-up, not mid-migration); optionally turn fwd off. */
  async init(signal: AbortSignal): Promise<void> {
    if (!(await this.client.appId(this.appId, signal))) {
      throw new FerryError("FailedPrecondition", `ONOS has no application "${this.appId}": Application ID is not found`, {
        field: "onos.appId",
        fix: `activate the app in ONOS (onos-app <host> activate ${this.appId}) or set --onos-app-id to an active one`,
      });
    }
    if (this.cfg.disableReactiveForwarding) await this.client.deactivateApp(REACTIVE_FORWARDING_APP, signal);
  }

  async install(p: Placement, signal: AbortSignal): Promise<SdnResult> {
    const t0 = performance.now();
    const intents = await this.intentsAt(p, p.host, p.ofport, new HostDiscovery(this.client, signal));
    const t1 = performance.now();
    await this.submitAll(intents, signal);
    const t2 = performance.now();
    await this.waitInstalled(intents, signal);
    const t3 = performance.now();
    return { durationMs: t3 - t0, details: { resolve_ms: t1 - t0, submit_ms: t2 - t1, installed_ms: t3 - t2, intents: intents.length } };
  }

  async switchPath(p: PathSwitch, signal: AbortSignal): Promise<SdnResult> {
    return this.move(p, p.to, p.from.host, signal);
  }

  async revert(p: PathSwitch, signal: AbortSignal): Promise<void> {
    await this.move(p, p.from, p.to.host, signal);
  }

  async remove(p: Placement, signal: AbortSignal): Promise<void> {
    validateName("container", p.container);
    await this.withdrawAt(p.container, p.host, signal);
  }

  /**
   * MIRA's order: withdraw the old path, then submit the new one. Not both at once: ONOS's flow
   * rule id hashes device, priority and selector but not the output, so overlapping intents would
   * share the ingress rule and withdrawing the old one would remove the new one's rule. The gap is
   * inside the downtime window (the container is frozen, the destination is network-locked).
   */
  private async move(p: PathSwitch, target: { host: string; ofport?: number }, previous: string, signal: AbortSignal): Promise<SdnResult> {
    const t0 = performance.now();
    // Resolve everything before touching ONOS, so a bad mapping fails with the old path intact.
    const intents = await this.intentsAt(p, target.host, target.ofport, new HostDiscovery(this.client, signal));
    const t1 = performance.now();
    if (previous !== target.host) await this.withdrawAt(p.container, previous, signal);
    const t2 = performance.now();
    await this.submitAll(intents, signal);
    const t3 = performance.now();
    await this.waitInstalled(intents, signal);
    const t4 = performance.now();
    return {
      durationMs: t4 - t0,
      details: { resolve_ms: t1 - t0, withdraw_ms: t2 - t1, submit_ms: t3 - t2, installed_ms: t4 - t3, intents: intents.length },
    };
  }

  /** Every intent key a container has (or may have) at `host`. */
  keysAt(container: string, host: string): string[] {
    const roles: Role[] = this.mode === "p2p" ? ["fwd", "ret"] : ["h2h"];
    return this.peers.flatMap((peer) => roles.map((r) => intentKey(container, host, peer.name, r)));
  }

  private async withdrawAt(container: string, host: string, signal: AbortSignal): Promise<void> {
    await Promise.all(this.keysAt(container, host).map((k) => this.client.withdrawIntent(this.appId, k, signal)));
  }

  private async submitAll(intents: OnosIntent[], signal: AbortSignal): Promise<void> {
    await Promise.all(intents.map((i) => this.client.submitIntent(i, signal)));
  }

  /** The intents that connect every peer with the container at `host`. */
  async intentsAt(
    c: { container: string; mac: string },
    host: string,
    ofport: number | undefined,
    disc: HostDiscovery = new HostDiscovery(this.client, AbortSignal.timeout(30_000)),
  ): Promise<OnosIntent[]> {
    validateName("container", c.container);
    validateName("host", host);
    const mac = validateMac("mac", c.mac).toUpperCase();
    if (this.mode === "h2h") {
      // ONOS finds both ends itself (host tracking); the key still names the host, so a switch
      // withdraws and re-submits, which makes ONOS recompile the path.
      return this.peers.map((peer) => ({
        type: "HostToHostIntent",
        appId: this.appId,
        key: intentKey(c.container, host, peer.name, "h2h"),
        priority: this.priority,
        one: onosHostId(peer.mac),
        two: onosHostId(mac),
      }));
    }
    const here = await this.containerPoint(host, mac, ofport, disc);
    const out: OnosIntent[] = [];
    for (const peer of this.peers) {
      const there = await this.peerPoint(peer, disc);
      const peerMac = peer.mac.toUpperCase();
      out.push({
        type: "PointToPointIntent",
        appId: this.appId,
        key: intentKey(c.container, host, peer.name, "fwd"),
        priority: this.priority,
        selector: {
          criteria: [
            { type: "ETH_SRC", mac: peerMac },
            { type: "ETH_DST", mac },
          ],
        },
        ingressPoint: there,
        egressPoint: here,
      });
      out.push({
        type: "PointToPointIntent",
        appId: this.appId,
        key: intentKey(c.container, host, peer.name, "ret"),
        priority: this.returnPriority,
        selector: {
          criteria: [
            { type: "ETH_SRC", mac },
            { type: "ETH_DST", mac: peerMac },
          ],
        },
        ingressPoint: here,
        egressPoint: there,
      });
    }
    return out;
  }

  /**
   * The container's attachment point at `host`: the configured device with the port the agent
   * reported (authoritative); else ONOS's own record of the MAC (on the configured device, if any);
   * else the configured port. ONOS learns a moved MAC only from its traffic, so for a destination
   * the explicit ofport is what works.
   */
  private async containerPoint(host: string, mac: string, ofport: number | undefined, disc: HostDiscovery): Promise<OnosConnectPoint> {
    const cfg = this.hosts[host];
    if (cfg && ofport !== undefined) return { device: cfg.deviceId, port: portString("ofport", ofport) };
    const seen = (await disc.locationsOf(mac)).filter((l) => !cfg || l.elementId === cfg.deviceId);
    if (seen.length === 1 || (seen.length > 1 && cfg)) return { device: seen[0]!.elementId, port: String(seen[0]!.port) };
    if (cfg?.port !== undefined) return { device: cfg.deviceId, port: cfg.port };
    throw new FerryError("FailedPrecondition", `no ONOS attachment point for container MAC ${mac} on host "${host}"`, {
      field: `onos.hosts.${host}`,
      fix: `map host "${host}" to its ONOS device (onos.hosts.${host}.deviceId) and pass the container's ofport, or let ONOS learn the MAC (GET /hosts)`,
    });
  }

  /** A peer's attachment point: discovered by MAC in GET /hosts, else configured. */
  private async peerPoint(
    peer: { name: string; mac: string; deviceId?: string; port?: string },
    disc: HostDiscovery,
  ): Promise<OnosConnectPoint> {
    const seen = await disc.locationsOf(peer.mac);
    if (seen.length) return { device: seen[0]!.elementId, port: String(seen[0]!.port) };
    if (peer.deviceId && peer.port !== undefined) return { device: peer.deviceId, port: peer.port };
    throw new FerryError(
      "FailedPrecondition",
      `ONOS does not know peer "${peer.name}" (${peer.mac}) and no device/port is configured for it`,
      {
        field: "onos.peers",
        fix: `set deviceId and port for peer "${peer.name}", or make it send traffic so ONOS learns it (GET /hosts)`,
      },
    );
  }

  /** Poll until every intent is INSTALLED; FAILED fails at once (ONOS found no path). */
  private async waitInstalled(intents: OnosIntent[], signal: AbortSignal): Promise<void> {
    if (this.waitInstalledMs <= 0) return;
    const deadline = performance.now() + this.waitInstalledMs;
    let pending = intents.map((i) => i.key!);
    const states = new Map<string, string>();
    while (pending.length) {
      const got = await Promise.all(pending.map((k) => this.client.getIntent(this.appId, k, signal)));
      const next: string[] = [];
      got.forEach((info, i) => {
        const key = pending[i]!;
        const state = info?.state ?? "ABSENT";
        states.set(key, state);
        if (state === "FAILED") {
          throw new FerryError("FailedPrecondition", `ONOS could not install intent ${key} (state FAILED)`, {
            fix: "check that ONOS sees a path between the peer's and the container's devices (GET /links) and the ports exist",
            data: { key },
          });
        }
        if (state !== "INSTALLED") next.push(key);
      });
      pending = next;
      if (!pending.length) return;
      if (performance.now() >= deadline) {
        throw new FerryError(
          "DeadlineExceeded",
          `ONOS did not install ${pending.length} intent(s) within ${this.waitInstalledMs} ms: ${pending.map((k) => `${k}=${states.get(k)}`).join(", ")}`,
          {
            fix: 'check ONOS\'s intent state (GET /intents); ABSENT means this ONOS ignores intent keys (needs a version whose IntentCodec reads "key")',
          },
        );
      }
      await sleep(this.pollMs, signal);
    }
  }
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(new FerryError("Cancelled", "cancelled while waiting for ONOS"));
    const t = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = (): void => {
      clearTimeout(t);
      reject(new FerryError("Cancelled", "cancelled while waiting for ONOS"));
    };
    signal.addEventListener("abort", onAbort, { once: true });
  });
}
