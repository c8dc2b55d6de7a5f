// Command-line wiring only: parses arguments, calls one function, sets the exit code.
// First: refuses an older Node.js before any other module is evaluated.
import './runtime-check.ts';
import { isMainThread } from 'node:worker_threads';
import { Command, Option } from 'commander';
import { dumpConfig } from './config/dump.ts';
import { configJsonSchemaText } from './config/json-schema.ts';
import { formatIssue, loadConfig } from './config/load.ts';
import { VERSION } from './metrics.ts';
import { serve } from './serve.ts';
import { explain, formatExplanation } from './explain.ts';
import { runThread } from './thread.ts';
import { status } from './admin/status.ts';

const program = new Command();
program.name('smartproxy').description('Layer-4 TCP and TLS (SNI passthrough) proxy with connection governance').version(VERSION);
program.addHelpText('after', `
Examples:
  $ smartproxy check-config -c /etc/smartproxy/proxy.toml
  $ smartproxy serve -c /etc/smartproxy/proxy.toml
  $ smartproxy status --admin 127.0.0.1:9901
  $ smartproxy schema > smartproxy.schema.json

"smartproxy help <command>" (or <command> --help) shows its defaults and examples.
`);

program
  .command('serve')
  .description('run the proxy in the foreground (systemd style)')
  .requiredOption('-c, --config <file>', 'configuration file (TOML)')
  .addOption(new Option('--log-level <level>', 'log level (default: [logging] level)').choices(['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent']))
  .addOption(new Option('--log-format <format>', 'log format (default: pretty on a TTY, else json)').choices(['json', 'pretty']))
  .addHelpText('after', `
Defaults:
  --log-level    the file's [logging] level, itself "info" when not set
  --log-format   pretty when stdout is a terminal, else json (one object per line)
  An invalid file or an address that cannot be bound exits 1 before anything is served.
  SIGHUP reloads the file (an invalid one is logged and the running config kept),
  SIGTERM/SIGINT drain for [shutdown] drain_timeout (default "30s") and exit 0.

Examples:
  $ smartproxy serve -c /etc/smartproxy/proxy.toml
  $ smartproxy serve -c smartproxy.example.toml --log-level debug --log-format pretty
`)
  .action(async (opts: { config: string; logLevel?: 'info'; logFormat?: 'json' | 'pretty' }) => {
    process.exitCode = await serve({ configFile: opts.config, logLevel: opts.logLevel, logFormat: opts.logFormat });
  });

program
  .command('check-config')
  .description('validate a configuration file without binding anything; exit 0 when valid')
  .requiredOption('-c, --config <file>', 'configuration file (TOML)')
  .option('--dump', 'print the effective configuration as TOML, every default filled in (as nginx -T)')
  .option('--explain <client>', 'show the path a connection from this client address would take, and where it would be refused')
  .option('--sni <name>', 'with --explain: the server name of its ClientHello (default: none)')
  .option('--listener <name>', 'with --explain: only this listener (default: every listener)')
  .addHelpText('after', `
Defaults:
  Prints one summary line and exits 0 when the file is valid; otherwise prints every
  problem as "path (line N): message" on stderr and exits 1. With --dump, a valid file is
  printed back with every default filled in (a file check-config accepts as it is).
  With --explain, a valid file is read (nothing is bound) and every admission step a
  connection from that client would meet is printed, with the rule that decides it; the
  exit code is 0 whether or not the connection would be refused.

Examples:
  $ smartproxy check-config -c /etc/smartproxy/proxy.toml
  $ smartproxy check-config -c smartproxy.example.toml --dump > effective.toml
  $ smartproxy check-config -c /etc/smartproxy/proxy.toml --explain 203.0.113.7 --sni api.example.com
`)
  .action((opts: { config: string; dump?: boolean; explain?: string; sni?: string; listener?: string }) => {
    const loaded = loadConfig(opts.config);
    if (loaded.ok) {
      if (opts.explain !== undefined) {
        const query = { client: opts.explain, sni: opts.sni ?? null, listener: opts.listener ?? null };
        const result = explain(loaded.config, query);
        if ('error' in result) {
          process.stderr.write(`smartproxy check-config --explain: ${result.error}\n`);
          process.exitCode = 2;
          return;
        }
        process.stdout.write(formatExplanation(query, result));
      } else if (opts.dump === true) process.stdout.write(dumpConfig(loaded.config));
      else {
        const routes = loaded.config.listeners.reduce((n, l) => n + l.routes.length, 0);
        process.stdout.write(`${opts.config}: configuration ok (${loaded.config.listeners.length} listeners, ${routes} routes)\n`);
      }
      process.exitCode = 0;
      return;
    }
    process.stderr.write(`${opts.config}: ${loaded.issues.length} problem${loaded.issues.length === 1 ? '' : 's'}\n`);
    for (const issue of loaded.issues) process.stderr.write(`  ${formatIssue(issue)}\n`);
    process.exitCode = 1;
  });

program
  .command('schema')
  .description('print the JSON Schema of the configuration file, for editors (Taplo, Even Better TOML)')
  .addHelpText('after', `
Defaults:
  Prints JSON Schema Draft 4 on stdout; the same text is config/smartproxy.schema.json.

Examples:
  $ smartproxy schema > /etc/smartproxy/smartproxy.schema.json
  Then make this the first line of the TOML file, for Taplo (Even Better TOML) to use it:
  #:schema ./smartproxy.schema.json
`)
  .action(() => {
    process.stdout.write(configJsonSchemaText());
    process.exitCode = 0;
  });

program
  .command('status')
  .description('show listeners, workers, queues, rejections and top clients from the admin API')
  .option('-c, --config <file>', 'find the admin address in this configuration file (default: /etc/smartproxy/proxy.toml)')
  .option('--admin <address>', 'admin API address: host:port or unix:/path (default: [admin] listen of the file)')
  .option('--watch', 'refresh every second')
  .addHelpText('after', `
Defaults:
  Without --admin, the address is [admin] listen of the -c file (default
  /etc/smartproxy/proxy.toml). Prints the table once and exits 0, or 1 when the admin
  API cannot be reached.

Examples:
  $ smartproxy status --admin 127.0.0.1:9901
  $ smartproxy status -c /etc/smartproxy/proxy.toml --watch
  $ smartproxy status --admin unix:/run/smartproxy/admin.sock
`)
  .action(async (opts: { config?: string; admin?: string; watch?: boolean }) => {
    process.exitCode = await status(opts);
  });

// The same entry script starts the event-loop threads (event-loops.ts spawns it as a Worker).
if (isMainThread) await program.parseAsync(process.argv);
else await runThread();
