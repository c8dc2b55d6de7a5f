// Refuses to run on a Node.js older than package.json "engines" with one line saying how to run it.
// cli.ts imports this module first: ESM evaluates imports in order, so this runs before any other
// module of the daemon (or of its bundled dependencies) is evaluated. Keep it free of imports
// beyond node: built-ins and of syntax newer than the oldest node it must talk to.
import { fileURLToPath } from 'node:url';

const MINIMUM_MAJOR = 24;

const major = Number.parseInt(process.versions.node.split('.')[0] ?? '0', 10);
if (major < MINIMUM_MAJOR) {
  // src/ and dist/ are both one level below the project, where npm puts the node it carries.
  const carried = fileURLToPath(new URL('../node_modules/.bin/node', import.meta.url));
  const entry = process.argv[1] ?? 'dist/smartproxy.js';
  process.stderr.write(
    `smartproxy: needs Node.js ${MINIMUM_MAJOR} or newer (this is ${process.version}); run it with the node the project carries (npm ci installs it): ${carried} ${entry} ..., or npm start\n`,
  );
  process.exit(1);
}
