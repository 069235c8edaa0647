import { defineConfig } from "vitest/config";

export default defineConfig({
  resolve: {
    // Workspace packages resolve to their TypeScript sources, never to a stale dist/.
    conditions: ["source"],
  },
  ssr: { resolve: { conditions: ["source"] } },
  test: {
    include: ["packages/*/src/**/*.test.ts", "test/**/*.test.ts"],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // Integration suites share one machine's namespaces, OVS daemons and CRIU: one file at a time.
    fileParallelism: false,
    reporters: ["default"],
  },
});
