// Bundles the CLI and its runtime dependencies into one executable file: starting it opens this
// file and nothing under node_modules/ (a few hundred files before, enough to fail with EMFILE
// under a low open-file limit). pino-pretty is imported as a stream (src/logging/logger.ts), not
// loaded by name as a pino transport in a worker thread, so it bundles like the rest.
// `node esbuild.mjs [--outfile FILE]` (default dist/smartproxy.js; the tests build elsewhere).
import { build } from 'esbuild';
import { chmodSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const pkg = JSON.parse(readFileSync(new URL('./package.json', import.meta.url), 'utf8'));

const { values: args } = parseArgs({ options: { outfile: { type: 'string', default: 'dist/smartproxy.js' } } });

await build({
  entryPoints: [fileURLToPath(new URL('./src/cli.ts', import.meta.url))],
  outfile: args.outfile,
  bundle: true,
  platform: 'node',
  target: 'node24',
  format: 'esm',
  sourcemap: true,
  define: { SMARTPROXY_VERSION: JSON.stringify(pkg.version) },
  // Bundled CommonJS (commander, pino, prom-client, ...) calls require() for node: built-ins.
  banner: { js: "#!/usr/bin/env node\nimport { createRequire as __smartproxyCreateRequire } from 'node:module';\nconst require = __smartproxyCreateRequire(import.meta.url);" },
  logLevel: 'warning',
});
chmodSync(args.outfile, 0o755);
