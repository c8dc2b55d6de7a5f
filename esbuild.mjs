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
  // V8's young generation: see README "Memory"; the same flag is in package.json and the systemd unit.
  banner: { js: '#!/usr/bin/env -S node --max-semi-space-size=2 --initial-old-space-size=64' },
  logLevel: 'warning',
});
import { chmodSync } from 'node:fs';
chmodSync('dist/smartproxy.js', 0o755);
