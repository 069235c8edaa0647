import { runInNetns } from "@ferry/testbed";

/** busybox ping from inside a namespace, 0.2 s apart: how many replies came, and their average RTT (NaN for none). */
export async function pingFrom(netnsPath: string, ip: string, count: number, waitS = 1): Promise<{ received: number; avgMs: number }> {
  const r = await runInNetns(netnsPath, "busybox", ["ping", "-c", String(count), "-i", "0.2", "-W", String(waitS), ip], {
    okCodes: [0, 1],
  });
  const rec = /(\d+) packets received/.exec(r.stdout);
  const rtt = /= [\d.]+\/([\d.]+)\//.exec(r.stdout);
  return { received: rec ? Number(rec[1]) : 0, avgMs: rtt ? Number(rtt[1]) : NaN };
}
