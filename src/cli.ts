// Command-line wiring only: parses arguments, calls one function, sets the exit code.
// First: refuses an older Node.js before any other module is evaluated.
import './runtime-check.ts';
import { isMainThread } from 'node:worker_threads';
import { Command, Option } from 'commander';
import { formatIssue, loadConfig } from './config/load.ts';
import { VERSION } from './metrics.ts';
import { serve } from './serve.ts';
import { runThread } from './thread.ts';
import { status } from './admin/status.ts';

const program = new Command();
program.name('smartproxy').description('Layer-4 TCP and TLS (SNI passthrough) proxy with connection governance').version(VERSION);

program
  .command('serve')
  .description('run the proxy in the foreground (systemd style)')
  .requiredOption('-c, --config <file>', 'configuration file (TOML)')
  .addOption(new Option('--log-level <level>', 'log level (default: [logging] level)').choices(['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent']))
  .addOption(new Option('--log-format <format>', 'log format (default: pretty on a TTY, else json)').choices(['json', 'pretty']))
  .action(async (opts: { config: string; logLevel?: 'info'; logFormat?: 'json' | 'pretty' }) => {
    process.exitCode = await serve({ configFile: opts.config, logLevel: opts.logLevel, logFormat: opts.logFormat });
  });

program
  .command('check-config')
  .description('validate a configuration file without binding anything; exit 0 when valid')
  .requiredOption('-c, --config <file>', 'configuration file (TOML)')
  .action((opts: { config: string }) => {
    const loaded = loadConfig(opts.config);
    if (loaded.ok) {
      const routes = loaded.config.listeners.reduce((n, l) => n + l.routes.length, 0);
      process.stdout.write(`${opts.config}: configuration ok (${loaded.config.listeners.length} listeners, ${routes} routes)\n`);
      process.exitCode = 0;
      return;
    }
    process.stderr.write(`${opts.config}: ${loaded.issues.length} problem${loaded.issues.length === 1 ? '' : 's'}\n`);
    for (const issue of loaded.issues) process.stderr.write(`  ${formatIssue(issue)}\n`);
    process.exitCode = 1;
  });

program
  .command('status')
  .description('show listeners, workers, queues, rejections and top clients from the admin API')
  .option('-c, --config <file>', 'find the admin address in this configuration file')
  .option('--admin <address>', 'admin API address: host:port or unix:/path')
  .option('--watch', 'refresh every second')
  .action(async (opts: { config?: string; admin?: string; watch?: boolean }) => {
    process.exitCode = await status(opts);
  });

// The same entry script starts the event-loop threads (event-loops.ts spawns it as a Worker).
if (isMainThread) await program.parseAsync(process.argv);
else await runThread();
