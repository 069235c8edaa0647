import type { ContainerSpec } from "@ferry/api/agent";

/** What the bundle needs besides the spec. */
export interface OciOptions {
  /** Network namespace by path (/run/netns/ferry-<name>): Ferry's, not runc's, so CRIU treats it as external. */
  netnsPath: string;
  /** One-level cgroup path, unique per agent on a shared machine: "/ferry-<agent>-<name>". */
  cgroupsPath: string;
  /** Rootfs directory, relative to the bundle. */
  rootfs?: string;
  /** CRIU's configuration file for this container: runc hands it to CRIU on checkpoint and restore. */
  criuConfig?: string;
}

/** The annotation by which runc (1.0 and later) gives CRIU a container's own configuration file. */
export const CRIU_CONFIG_ANNOTATION = "org.criu.config";

const CFS_PERIOD_US = 100_000;
const DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const DEFAULT_CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];

/**
 * The OCI runtime config (config.json) of a Ferry container. Deterministic for a given spec, so a
 * restore re-creates exactly the bundle the checkpoint was taken from.
 *
 * Host facts encoded here: no `rlimits` (they must stay <= the current hard limits, which cannot
 * be raised without CAP_SYS_RESOURCE); `terminal: false` (stdio are pipes, CRIU cannot dump a
 * host tty); the network namespace is given by path; new pid/ipc/uts/mount namespaces.
 */
export function buildOciConfig(spec: ContainerSpec, opts: OciOptions): Record<string, unknown> {
  const env = spec.env.some((e) => e.startsWith("PATH=")) ? [...spec.env] : [DEFAULT_PATH, ...spec.env];
  const resources: Record<string, unknown> = {
    devices: [{ allow: false, access: "rwm" }],
  };
  if (spec.cpuMillicores > 0) {
    resources.cpu = { quota: Math.max(1000, Math.round((spec.cpuMillicores * CFS_PERIOD_US) / 1000)), period: CFS_PERIOD_US };
  }
  if (spec.memoryLimitBytes > 0) resources.memory = { limit: spec.memoryLimitBytes };
  return {
    ociVersion: "1.0.2",
    ...(opts.criuConfig ? { annotations: { [CRIU_CONFIG_ANNOTATION]: opts.criuConfig } } : {}),
    process: {
      terminal: false,
      user: { uid: 0, gid: 0 },
      args: [...spec.args],
      env,
      cwd: spec.cwd || "/",
      capabilities: {
        bounding: DEFAULT_CAPS,
        effective: DEFAULT_CAPS,
        permitted: DEFAULT_CAPS,
      },
      noNewPrivileges: true,
    },
    root: { path: opts.rootfs ?? "rootfs", readonly: false },
    hostname: spec.name,
    mounts: [
      { destination: "/proc", type: "proc", source: "proc" },
      { destination: "/dev", type: "tmpfs", source: "tmpfs", options: ["nosuid", "strictatime", "mode=755", "size=65536k"] },
      {
        destination: "/dev/pts",
        type: "devpts",
        source: "devpts",
        options: ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
      },
      { destination: "/dev/shm", type: "tmpfs", source: "shm", options: ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
      { destination: "/dev/mqueue", type: "mqueue", source: "mqueue", options: ["nosuid", "noexec", "nodev"] },
      { destination: "/sys", type: "sysfs", source: "sysfs", options: ["nosuid", "noexec", "nodev", "ro"] },
    ],
    linux: {
      cgroupsPath: opts.cgroupsPath,
      resources,
      namespaces: [{ type: "pid" }, { type: "ipc" }, { type: "uts" }, { type: "mount" }, { type: "network", path: opts.netnsPath }],
      maskedPaths: [
        "/proc/acpi",
        "/proc/asound",
        "/proc/kcore",
        "/proc/keys",
        "/proc/latency_stats",
        "/proc/timer_list",
        "/proc/timer_stats",
        "/proc/sched_debug",
        "/sys/firmware",
        "/proc/scsi",
      ],
      readonlyPaths: ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    },
  };
}

/** Limits read back from a config (what admission checks compare). */
export function limitsOf(spec: ContainerSpec): { cpuQuotaUs: number; cpuPeriodUs: number; memoryLimitBytes: number } {
  return {
    cpuQuotaUs: spec.cpuMillicores > 0 ? Math.max(1000, Math.round((spec.cpuMillicores * CFS_PERIOD_US) / 1000)) : -1,
    cpuPeriodUs: CFS_PERIOD_US,
    memoryLimitBytes: spec.memoryLimitBytes,
  };
}
