#!/usr/bin/env node
import { fromServiceError } from "@ferry/common";
import { run } from "./cli.js";

run(process.argv.slice(2), process.env, { out: (s) => process.stdout.write(s), err: (s) => process.stderr.write(s) }).then(
  (code) => process.exit(code),
  (e: unknown) => {
    process.stderr.write(`ferry: ${fromServiceError(e).message}\n`);
    process.exit(2);
  },
);
