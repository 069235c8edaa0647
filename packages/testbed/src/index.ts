/**
 * @ferry/testbed: emulated edge hosts on one machine (network namespaces, one Open vSwitch per
 * host with the userspace datapath, a VXLAN overlay over a private underlay). Used by
 * `make testbed-up` and by the integration tests.
 */
export * from "./testbed.js";
export * from "./flows.js";
export { startDaemon, stopDaemon, type DaemonSpec } from "./daemon.js";
export * from "./agent-process.js";
export * from "./images.js";
export * from "./echo.js";
