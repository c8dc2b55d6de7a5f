// Bundles the CLI into one executable file. Runtime dependencies stay external:
// pino loads its transports (pino-pretty) by name in a worker thread, which a bundle cannot see.
import { build } from 'esbuild';
import { readFileSync } from 'node:fs';

const pkg = JSON.parse(readFileSync(new URL('./package.json', import.meta.url), 'utf8'));

await build({
  entryPoints: ['src/cli.ts'],
  outfile: 'dist/smartproxy.js',
  bundle: true,
  platform: 'node',
  target: 'node20',
  format: 'esm',
  sourcemap: true,
  packages: 'external',
  define: { SMARTPROXY_VERSION: JSON.stringify(pkg.version) },
  banner: { js: '#!/usr/bin/env node' },
  logLevel: 'warning',
});
import { chmodSync } from 'node:fs';
chmodSync('dist/smartproxy.js', 0o755);
