import { describe, expect, it } from "vitest";
import { isFerryError } from "@ferry/common";
import { flowLine, parseDumpFlows, setFlowsFile, validateFlow } from "./ovs.js";
import { CRIU_LOCK_RULES, CRIU_UNLOCK_CHAIN, CRIU_UNLOCK_JUMPS, HOLD_LOCK_RULES, UNLOCK_RULES } from "./lock.js";
import { portNameFor } from "./netns.js";

const flow = { table: 0, priority: 100, cookie: 0xfe0a4d000a, match: "ip,nw_dst=10.77.0.10", actions: "output:5" };

describe("ovs flow text", () => {
  it("renders a flow_mod line and a bundle file that replaces rules by cookie", () => {
    expect(flowLine(flow)).toBe("add table=0,priority=100,cookie=0xfe0a4d000a,ip,nw_dst=10.77.0.10,actions=output:5");
    expect(flowLine({ ...flow, match: "" })).toBe("add table=0,priority=100,cookie=0xfe0a4d000a,actions=output:5");
    const file = setFlowsFile([flow, { ...flow, match: "arp,arp_tpa=10.77.0.10" }, { ...flow, cookie: 7 }]);
    expect(file.split("\n")).toEqual([
      "delete cookie=0xfe0a4d000a/-1",
      "delete cookie=0x7/-1",
      "add table=0,priority=100,cookie=0xfe0a4d000a,ip,nw_dst=10.77.0.10,actions=output:5",
      "add table=0,priority=100,cookie=0xfe0a4d000a,arp,arp_tpa=10.77.0.10,actions=output:5",
      "add table=0,priority=100,cookie=0x7,ip,nw_dst=10.77.0.10,actions=output:5",
      "",
    ]);
  });

  it("parses dump-flows with and without statistics", () => {
    const out = [
      "OFPST_FLOW reply (OF1.4) (xid=0x2):",
      " cookie=0xfe0a4d000a, duration=12.345s, table=0, n_packets=3, n_bytes=294, idle_age=1, priority=100,ip,nw_dst=10.77.0.10 actions=output:5",
      " cookie=0x7, table=3, priority=10,arp,arp_tpa=10.77.0.10 actions=output:1001",
      " priority=0 actions=NORMAL",
      " cookie=0x1, duration=1s, table=0, n_packets=0, n_bytes=0, idle_timeout=10, actions=drop",
      "",
    ].join("\n");
    expect(parseDumpFlows(out)).toEqual([
      flow,
      { table: 3, priority: 10, cookie: 7, match: "arp,arp_tpa=10.77.0.10", actions: "output:1001" },
      { table: 0, priority: 0, cookie: 0, match: "", actions: "NORMAL" },
      { table: 0, priority: 32768, cookie: 1, match: "", actions: "drop" },
    ]);
  });

  it("refuses flow text that could inject another flow_mod or shell syntax, naming the field", () => {
    const bad: Array<[Partial<typeof flow>, string]> = [
      [{ match: "ip\nadd actions=NORMAL" }, "flows[2].match"],
      [{ match: "ip # comment" }, "flows[2].match"],
      [{ match: "ip,priority=1" }, "flows[2].match"],
      [{ actions: "output:1;reboot" }, "flows[2].actions"],
      [{ actions: "$(id)" }, "flows[2].actions"],
      [{ actions: " " }, "flows[2].actions"],
      [{ table: 255 }, "flows[2].table"],
      [{ priority: 70000 }, "flows[2].priority"],
      [{ cookie: 2 ** 60 }, "flows[2].cookie"],
      [{ cookie: 0 }, "flows[2].cookie"],
    ];
    for (const [patch, field] of bad) {
      let err: unknown;
      try {
        validateFlow({ ...flow, ...patch }, "flows[2]");
      } catch (e) {
        err = e;
      }
      expect(isFerryError(err, "InvalidArgument") && err.field === field, `${JSON.stringify(patch)} → ${String(err)}`).toBe(true);
    }
    expect(() => validateFlow({ ...flow, actions: "load:0x1->NXM_NX_REG0[],resubmit(,1)" })).not.toThrow();
  });
});

describe("netns constants", () => {
  it("port names are short, stable and per prefix", () => {
    expect(portNameFor("ferry-", "web")).toMatch(/^fv[0-9a-f]{8}$/);
    expect(portNameFor("ferry-", "web")).toBe(portNameFor("ferry-", "web"));
    expect(portNameFor("ferry-edge-a-", "web")).not.toBe(portNameFor("ferry-edge-b-", "web"));
  });

  it("the lock is CRIU 4.2.1's text, plus a hold for what comes from elsewhere; the unlock removes exactly what it adds", () => {
    expect(CRIU_LOCK_RULES).toBe(
      "*filter\n:CRIU - [0:0]\n-I INPUT -j CRIU\n-I OUTPUT -j CRIU\n-A CRIU -m mark --mark 0xC114 -j ACCEPT\n-A CRIU -j DROP\nCOMMIT\n",
    );
    expect(HOLD_LOCK_RULES).toBe(
      "*filter\n:CRIU - [0:0]\n-I INPUT -j CRIU\n-I OUTPUT -j CRIU\n-A CRIU -m mark --mark 0xC114 -j ACCEPT\n" +
        "-A CRIU -m addrtype ! --src-type LOCAL -j NFQUEUE --queue-num 49428\n-A CRIU -j DROP\nCOMMIT\n",
    );
    expect(CRIU_UNLOCK_JUMPS).toContain("-D INPUT -j CRIU\n-D OUTPUT -j CRIU\n");
    expect(CRIU_UNLOCK_CHAIN).toContain("-X CRIU\n");
    // Ferry's unlock: both of CRIU's halves in one transaction
    expect(UNLOCK_RULES).toBe("*filter\n:CRIU - [0:0]\n-D INPUT -j CRIU\n-D OUTPUT -j CRIU\n-X CRIU\nCOMMIT\n");
  });
});
