// sshd in each emulated host's network namespace, for the COAT baseline: its own host key, config
// and pidfile under the host's state dir, key-only root login with one generated client key.
import { spawn, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import { mkdir, writeFile } from "node:fs/promises";
import path from "node:path";
import { FerryError, exec } from "@ferry/common";
import type { EmulatedHost } from "@ferry/testbed";

/** ssh options COAT-style: a fresh connection per command, no host-key bookkeeping, no multiplexing. */
export const SSH_OPTS = [
  "-o",
  "StrictHostKeyChecking=no",
  "-o",
  "UserKnownHostsFile=/dev/null",
  "-o",
  "LogLevel=ERROR",
  "-o",
  "BatchMode=yes",
];

interface Daemon {
  host: EmulatedHost;
  child: ChildProcess;
  exited: Promise<unknown>;
}

export class SshFleet {
  private readonly daemons: Daemon[] = [];
  private constructor(readonly clientKey: string) {}

  /** A client key pair in `workDir` (ed25519, no passphrase). */
  static async create(workDir: string): Promise<SshFleet> {
    const key = path.join(workDir, "coat_id_ed25519");
    await exec("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", "ferry-bench", "-f", key]);
    // sshd refuses to start without its privilege-separation dir.
    await mkdir("/run/sshd", { recursive: true, mode: 0o755 });
    return new SshFleet(key);
  }

  /** Start sshd on `host`'s underlay address, port 22, in its namespace. */
  async start(host: EmulatedHost): Promise<void> {
    const dir = path.join(host.stateDir, "sshd");
    await mkdir(dir, { recursive: true, mode: 0o700 });
    await exec("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", path.join(dir, "host_ed25519")]);
    await exec("cp", [`${this.clientKey}.pub`, path.join(dir, "authorized_keys")]);
    const cfg = path.join(dir, "sshd_config");
    await writeFile(
      cfg,
      [
        "Port 22",
        `ListenAddress ${host.underlayIp}`,
        `HostKey ${dir}/host_ed25519`,
        `PidFile ${dir}/sshd.pid`,
        `AuthorizedKeysFile ${dir}/authorized_keys`,
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PrintMotd no",
        "UseDNS no",
        "MaxStartups 100:30:200",
        "Subsystem sftp internal-sftp",
        "LogLevel ERROR",
        "",
      ].join("\n"),
    );
    // -D: stay a child of ours (stopped by its pid, never by name); -e: log to stderr.
    const child = spawn("nsenter", [`--net=${host.netnsPath}`, "/usr/sbin/sshd", "-D", "-e", "-f", cfg], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    let err = "";
    child.stderr.on("data", (d: Buffer) => (err = (err + d.toString()).slice(-4000)));
    const exited = once(child, "exit");
    this.daemons.push({ host, child, exited });
    // Ready when a TCP connect to port 22 succeeds from inside the namespace.
    for (let i = 0; i < 100; i++) {
      const r = await exec("nsenter", [`--net=${host.netnsPath}`, "bash", "-c", `exec 3<>/dev/tcp/${host.underlayIp}/22`], {
        okCodes: [0, 1],
      });
      if (r.exitCode === 0) return;
      if (child.exitCode !== null) break;
      await new Promise((res) => setTimeout(res, 50));
    }
    throw new FerryError("Unavailable", `sshd on ${host.name} did not start: ${err}`);
  }

  /** Stop every sshd we started (SIGTERM to our own child). */
  async stop(): Promise<void> {
    for (const d of this.daemons.splice(0)) {
      if (d.child.exitCode === null && d.child.signalCode === null) d.child.kill("SIGTERM");
      await d.exited;
    }
  }
}
