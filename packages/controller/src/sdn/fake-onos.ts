/**
 * A FAKE ONOS REST server for tests: node:http on port 0. It is NOT ONOS. It was built from ONOS's
 * source (opennetworkinglab/onos) to answer like ONOS's REST API does, for the endpoints Ferry uses:
 *
 * - auth: HTTP basic (default users onos/rocks and karaf/karaf), else 401 (Karaf's realm).
 * - POST /onos/v1/intents (IntentsWebResource.createIntent + IntentCodec/PointToPointIntentCodec/
 *   HostToHostIntentCodec/ConnectivityIntentCodec decode): "type" required, "appId" required and
 *   registered (else 404 "Application ID is not found": nullIsNotFound → EntityNotFoundMapper),
 *   P2P needs ingressPoint/egressPoint, H2H one/two ("MAC/VLAN"); missing members → 400
 *   "<member> member is required in Intent" (nullIsIllegal → IllegalArgumentExceptionMapper).
 *   "key" "0x.." is a LongKey, else a StringKey; no key → LongKey(id). A key already present is
 *   replaced (IntentService.submit). 201, Location <base>/intents/<appId>/<id fingerprint, decimal>.
 * - GET /intents, GET and DELETE /intents/{appId}/{key}: unknown app → 404 "Application Id not
 *   found"; string key first, then Long.decode(key) (a non-numeric absent key → 400 "For input
 *   string: ..."); GET absent → 404 "Intent is not found"; DELETE absent → 204.
 * - POST /flows/{deviceId}?appId= (FlowsWebResource.createFlow + FlowRuleCodec): body deviceId must
 *   match (400), "priority" and "isPermanent" required, "timeout" when temporary; 201, Location
 *   <base>/flows/<deviceId>/<flowId decimal, 64-bit>. DELETE /flows/{deviceId}/{flowId}: 404
 *   "Device is not found" when the device has no flows, else 204.
 * - GET /devices, GET /hosts (fixtures), GET /applications/ids/entry?name=, DELETE
 *   /applications/{name}/active (204).
 * - Error bodies {"code":N,"message":"..."} (AbstractMapper).
 *
 * Every request is recorded (method, path, query, authorization, parsed JSON body, status) so
 * tests can assert the exact JSON a client sent. Intents become INSTALLED at once unless
 * `intentState` says otherwise.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";

export interface FakeOnosRequest {
  method: string;
  path: string;
  query: Record<string, string>;
  authorization: string | undefined;
  contentType: string | undefined;
  body: unknown;
  status: number;
}

export interface FakeOnosIntent {
  appId: string;
  /** "0x..." for a LongKey, else the string key. */
  key: string;
  /** Intent id, decimal (as in Location). */
  id: string;
  state: string;
  json: Record<string, unknown>;
}

export interface FakeOnosFlow {
  deviceId: string;
  flowId: string;
  appId: string;
  json: Record<string, unknown>;
}

export interface FakeOnosOptions {
  users?: Record<string, string>;
  /** Registered application names (CoreService.getAppId). */
  apps?: string[];
  devices?: Record<string, unknown>[];
  hosts?: Record<string, unknown>[];
  /** The state a submitted intent is reported in; "INSTALLED" by default. */
  intentState?: (intent: Record<string, unknown>) => string;
}

class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

const bad = (m: string): HttpError => new HttpError(400, m);
const notFound = (m: string): HttpError => new HttpError(404, m);
const MISSING = " member is required in Intent";
const MISSING_FLOW = " member is required in FlowRule";

export class FakeOnos {
  readonly requests: FakeOnosRequest[] = [];
  readonly intents = new Map<string, FakeOnosIntent>();
  readonly flows = new Map<string, FakeOnosFlow>();
  readonly apps: Set<string>;
  readonly deactivated: string[] = [];
  devices: Record<string, unknown>[];
  hosts: Record<string, unknown>[];
  intentState: (intent: Record<string, unknown>) => string;
  private readonly users: Record<string, string>;
  private server?: Server;
  private nextIntentId = 0x10;
  // ONOS flow ids carry the app id in the top 16 bits: well above 2^53.
  private nextFlowId = 0x00c8_0000_1234_0000n;

  constructor(opts: FakeOnosOptions = {}) {
    this.users = opts.users ?? { onos: "rocks", karaf: "karaf" };
    this.apps = new Set(opts.apps ?? ["org.onosproject.ovsdb", "org.onosproject.cli", "org.onosproject.fwd", "org.onosproject.rest"]);
    this.devices = opts.devices ?? [];
    this.hosts = opts.hosts ?? [];
    this.intentState = opts.intentState ?? (() => "INSTALLED");
  }

  /** Listen on 127.0.0.1, port 0; returns the REST base URL ".../onos/v1". */
  async start(): Promise<string> {
    this.server = createServer((req, res) => void this.handle(req, res));
    await new Promise<void>((resolve) => this.server!.listen(0, "127.0.0.1", resolve));
    return this.url;
  }

  get url(): string {
    const a = this.server!.address() as AddressInfo;
    return `http://127.0.0.1:${a.port}/onos/v1`;
  }

  async stop(): Promise<void> {
    const s = this.server;
    if (!s) return;
    this.server = undefined;
    s.closeAllConnections();
    await new Promise<void>((resolve) => s.close(() => resolve()));
  }

  /** Requests whose path starts with `prefix` (e.g. "/intents"), method optional. */
  sent(method?: string, prefix = ""): FakeOnosRequest[] {
    return this.requests.filter((r) => (!method || r.method === method) && r.path.startsWith(prefix));
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    for await (const c of req) chunks.push(c as Buffer);
    const raw = Buffer.concat(chunks).toString("utf8");
    const u = new URL(req.url ?? "/", "http://fake");
    const rec: FakeOnosRequest = {
      method: req.method ?? "GET",
      path: u.pathname.replace(/^\/onos\/v1/, ""),
      query: Object.fromEntries(u.searchParams),
      authorization: req.headers.authorization,
      contentType: req.headers["content-type"],
      body: undefined,
      status: 0,
    };
    this.requests.push(rec);
    const send = (status: number, body?: unknown, headers: Record<string, string> = {}): void => {
      rec.status = status;
      const text = body === undefined ? "" : typeof body === "string" ? body : JSON.stringify(body);
      res.writeHead(status, {
        ...(text ? { "Content-Type": typeof body === "string" ? "text/html" : "application/json" } : {}),
        ...headers,
      });
      res.end(text);
    };
    if (!this.authorized(req.headers.authorization)) {
      return send(401, "<html><body><h2>HTTP ERROR 401</h2><p>Unauthorized</p></body></html>", {
        "WWW-Authenticate": 'Basic realm="karaf"',
      });
    }
    if (!u.pathname.startsWith("/onos/v1/")) return send(404, "<html><body>Not Found</body></html>");
    try {
      if (raw) {
        try {
          rec.body = JSON.parse(raw);
        } catch (e) {
          // Jackson's readTree fails → IOException → IllegalArgumentException → 400.
          throw bad(`Unexpected character: ${(e as Error).message}`);
        }
      }
      const base = `http://${req.headers.host ?? "127.0.0.1"}/onos/v1`;
      const r = this.route(rec, base);
      send(r.status, r.body, r.headers);
    } catch (e) {
      if (e instanceof HttpError) return send(e.status, { code: e.status, message: e.message });
      send(500, { code: 500, message: (e as Error).message });
    }
  }

  private authorized(h: string | undefined): boolean {
    if (!h?.startsWith("Basic ")) return false;
    const [user, ...rest] = Buffer.from(h.slice(6), "base64").toString("utf8").split(":");
    return user !== undefined && this.users[user] === rest.join(":");
  }

  private route(r: FakeOnosRequest, base: string): { status: number; body?: unknown; headers?: Record<string, string> } {
    const seg = r.path
      .split("/")
      .filter(Boolean)
      .map((s) => decodeURIComponent(s));
    const m = `${r.method} ${seg[0] ?? ""}`;
    if (m === "POST intents" && seg.length === 1) return this.createIntent(r.body, base);
    if (m === "GET intents" && seg.length === 1)
      return { status: 200, body: { intents: [...this.intents.values()].map((i) => this.encode(i)) } };
    if (m === "GET intents" && seg.length === 3) {
      const i = this.lookupIntent(seg[1]!, seg[2]!);
      if (!i) throw notFound("Intent is not found");
      return { status: 200, body: this.encode(i) };
    }
    if (m === "DELETE intents" && seg.length === 3) {
      const i = this.lookupIntent(seg[1]!, seg[2]!);
      if (i) this.intents.delete(mapKey(i.appId, i.key));
      return { status: 204 };
    }
    if (m === "POST flows" && seg.length === 2) return this.createFlow(seg[1]!, r.query.appId, r.body, base);
    if (m === "DELETE flows" && seg.length === 3) {
      const [deviceId, flowId] = [seg[1]!, seg[2]!];
      if (![...this.flows.values()].some((f) => f.deviceId === deviceId)) throw notFound("Device is not found");
      if (!/^-?\d+$/.test(flowId)) throw notFound("HTTP 404 Not Found"); // @PathParam long that does not parse
      this.flows.delete(`${deviceId}/${flowId}`);
      return { status: 204 };
    }
    if (m === "GET flows" && seg.length === 1)
      return { status: 200, body: { flows: [...this.flows.values()].map((f) => ({ id: f.flowId, appId: f.appId, ...f.json })) } };
    if (m === "GET devices" && seg.length === 1) return { status: 200, body: { devices: this.devices } };
    if (m === "GET hosts" && seg.length === 1) return { status: 200, body: { hosts: this.hosts } };
    if (m === "GET applications" && seg[1] === "ids" && seg[2] === "entry") {
      const name = r.query.name;
      if (!name || !this.apps.has(name)) throw notFound("Application ID is not found");
      return { status: 200, body: { id: [...this.apps].indexOf(name) + 1, name } };
    }
    if (m === "DELETE applications" && seg.length === 3 && seg[2] === "active") {
      this.deactivated.push(seg[1]!);
      return { status: 204 };
    }
    throw notFound("HTTP 404 Not Found");
  }

  /** IntentCodec.decode + the type codecs, then IntentService.submit (same key → replaced). */
  private createIntent(body: unknown, base: string): { status: number; headers: Record<string, string> } {
    if (!isObject(body)) throw bad("JSON cannot be null");
    const type = req(body, "type", MISSING);
    if (type !== "PointToPointIntent" && type !== "HostToHostIntent" && type !== "SinglePointToMultiPointIntent") {
      throw bad(`Intent type ${type} is not supported`);
    }
    const appId = req(body, "appId", MISSING);
    if (!this.apps.has(appId)) throw notFound("Application ID is not found");
    if (body.priority !== undefined && !Number.isInteger(body.priority)) throw bad("priority must be an integer");
    if (body.selector !== undefined) checkCriteria(body.selector);
    if (type === "PointToPointIntent") {
      connectPoint(body, "ingressPoint");
      connectPoint(body, "egressPoint");
    } else if (type === "HostToHostIntent") {
      hostId(req(body, "one", MISSING));
      hostId(req(body, "two", MISSING));
    }
    const id = this.nextIntentId++;
    const key = typeof body.key === "string" || typeof body.key === "number" ? normalizeKey(String(body.key)) : `0x${id.toString(16)}`;
    const intent: FakeOnosIntent = { appId, key, id: String(id), state: "", json: body };
    intent.state = this.intentState(body);
    this.intents.set(mapKey(appId, key), intent);
    return { status: 201, headers: { Location: `${base}/intents/${appId}/${id}` } };
  }

  /** IntentsWebResource's lookup: app, then Key.of(string), then Key.of(Long.decode(key)). */
  private lookupIntent(appId: string, key: string): FakeOnosIntent | undefined {
    if (!this.apps.has(appId)) throw notFound("Application Id not found");
    const byString = this.intents.get(mapKey(appId, key));
    if (byString && !byString.key.startsWith("0x")) return byString;
    const n = javaLongDecode(key);
    return this.intents.get(mapKey(appId, `0x${n.toString(16)}`));
  }

  private encode(i: FakeOnosIntent): Record<string, unknown> {
    const { key: _k, ...rest } = i.json;
    return { ...rest, id: `0x${Number(i.id).toString(16)}`, key: i.key, appId: i.appId, state: i.state, resources: [] };
  }

  /** FlowsWebResource.createFlow + FlowRuleCodec.decode. */
  private createFlow(
    deviceId: string,
    appIdParam: string | undefined,
    body: unknown,
    base: string,
  ): { status: number; headers: Record<string, string> } {
    if (!isObject(body)) throw bad("JSON cannot be null");
    if (body.deviceId !== undefined && asText(body.deviceId) !== deviceId) throw bad("Invalid deviceId in flow creation request");
    const appId = appIdParam ?? (typeof body.appId === "string" ? body.appId : "org.onosproject.rest");
    this.apps.add(appId); // FlowRuleCodec registers the app on the fly
    if (body.priority === undefined || body.priority === null) throw bad("priority" + MISSING_FLOW);
    if (body.isPermanent === undefined || body.isPermanent === null) throw bad("isPermanent" + MISSING_FLOW);
    if (body.isPermanent !== true && (body.timeout === undefined || body.timeout === null))
      throw bad("timeout" + MISSING_FLOW + " if the flow is temporary");
    if (body.selector !== undefined) checkCriteria(body.selector);
    const flowId = (this.nextFlowId++).toString();
    this.flows.set(`${deviceId}/${flowId}`, { deviceId, flowId, appId, json: { ...body, deviceId } });
    return { status: 201, headers: { Location: `${base}/flows/${deviceId}/${flowId}` } };
  }
}

/** Jackson's JsonNode.asText: the value of a scalar, "" for objects and arrays. */
function asText(v: unknown): string {
  return typeof v === "string" || typeof v === "number" || typeof v === "boolean" ? String(v) : "";
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function req(o: Record<string, unknown>, f: string, suffix: string): string {
  const v = o[f];
  if (v === undefined || v === null) throw bad(f + suffix);
  return asText(v);
}

/** ConnectPointCodec: {"device"|"host", "port"}; the fake refuses what ONOS would choke on later. */
function connectPoint(o: Record<string, unknown>, f: string): void {
  const cp = o[f];
  if (cp === undefined || cp === null) throw bad(f + MISSING);
  if (!isObject(cp) || (cp.device === undefined && cp.host === undefined) || cp.port === undefined) {
    throw bad(`${f} must be {"device": "...", "port": "..."}`);
  }
  if (cp.device !== undefined && !/^[a-z][a-z0-9]*:\S+$/.test(asText(cp.device))) throw bad(`Invalid device id ${asText(cp.device)}`);
}

/** HostId.hostId("MAC/VLAN"). */
function hostId(s: string): void {
  if (!/^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}\/(-1|None|\d{1,4})$/.test(s)) throw bad(`Invalid host id ${s}`);
}

/** TrafficSelectorCodec + DecodeCriterionCodecHelper, for the criteria Ferry may send. */
function checkCriteria(sel: unknown): void {
  if (!isObject(sel)) throw bad("selector must be an object");
  const criteria = sel.criteria;
  if (criteria === undefined) return;
  if (!Array.isArray(criteria)) throw bad("criteria must be an array");
  for (const c of criteria) {
    if (!isObject(c)) throw bad("criterion must be an object");
    const type = req(c, "type", " member is required in Criterion");
    const field: Record<string, string> = {
      ETH_SRC: "mac",
      ETH_DST: "mac",
      ETH_TYPE: "ethType",
      IPV4_SRC: "ip",
      IPV4_DST: "ip",
      IP_PROTO: "protocol",
      TCP_DST: "tcpPort",
      TCP_SRC: "tcpPort",
      IN_PORT: "port",
      ARP_TPA: "ip",
      ARP_SPA: "ip",
    };
    const f = field[type];
    if (!f) throw bad(`Unsupported criterion type ${type}`);
    req(c, f, " member is required in Criterion");
  }
}

/** IntentCodec: "0x..." → LongKey (printed "0x<hex>"), anything else a StringKey. */
function normalizeKey(k: string): string {
  if (!k.startsWith("0x")) return k;
  if (!/^0x[0-9A-Fa-f]{1,16}$/.test(k)) throw bad(`For input string: "${k.slice(2)}" under radix 16`);
  return `0x${BigInt(k).toString(16)}`;
}

function mapKey(appId: string, key: string): string {
  return `${appId}\u0000${key}`;
}

/** java.lang.Long.decode: decimal, 0x/#hex, 0 octal, with sign; NumberFormatException → 400. */
function javaLongDecode(s: string): bigint {
  const m = /^([+-]?)(0[xX]|#|0(?=[0-7]))?([0-9A-Fa-f]+)$/.exec(s);
  const radix = m?.[2] ? (m[2] === "0" ? 8 : 16) : 10;
  const digits = m?.[3] ?? "";
  const valid = m && (radix === 16 ? /^[0-9A-Fa-f]+$/ : radix === 8 ? /^[0-7]+$/ : /^[0-9]+$/).test(digits);
  if (!valid) throw bad(`For input string: "${s}"`);
  const v = BigInt((radix === 16 ? "0x" : radix === 8 ? "0o" : "") + digits);
  return m[1] === "-" ? -v : v;
}
