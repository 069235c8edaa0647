#!/usr/bin/env node
import { fromServiceError } from "@ferry/common";
import { run } from "./cli.js";

/** Exits once what was written has reached stdout and stderr: a pipe takes 64 KiB at a time. */
function exitAfterFlush(code: number): void {
  let left = 2;
  const done = (): void => {
    if (--left === 0) process.exit(code);
  };
  process.stdout.write("", done);
  process.stderr.write("", done);
}

run(process.argv.slice(2), process.env, { out: (s) => process.stdout.write(s), err: (s) => process.stderr.write(s) }).then(
  (code) => exitAfterFlush(code),
  (e: unknown) => {
    process.stderr.write(`ferry: ${fromServiceError(e).message}\n`);
    exitAfterFlush(2);
  },
);
