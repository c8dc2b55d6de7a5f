// Medians, spreads and the printed tables. Spread is half the min-max range of the runs as a
// percentage of their median: "±4%" means every run lay within a band 8% wide.

/** Three significant digits, thousands separated. */
export function formatNumber(value) {
  if (!Number.isFinite(value)) return '—';
  const abs = Math.abs(value);
  const digits = abs >= 100 ? 0 : abs >= 10 ? 1 : abs >= 1 ? 2 : 3;
  return value.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

/** A count: whole, thousands separated. */
export function formatCount(value) {
  return Number.isFinite(value) ? Math.round(value).toLocaleString('en-US') : '—';
}

export function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

/** Half the min-max range as a percentage of the median: "±3%". */
function spread(values) {
  if (values.length < 2) return '';
  const m = median(values);
  if (!m) return '';
  const halfRange = (Math.max(...values) - Math.min(...values)) / 2;
  return `±${((halfRange / Math.abs(m)) * 100).toFixed(halfRange / Math.abs(m) < 0.1 ? 1 : 0)}%`;
}

/**
 * One summary row per contender of a rate scenario.
 * @param {import('./scenarios.mjs').RateScenario} scenario
 * @param {Map<string, { runs: any[], error: string | null }>} results
 */
export function summarizeRate(scenario, results) {
  const directRuns = results.get('direct')?.runs ?? [];
  const directRate = directRuns.length ? median(directRuns.map((run) => run.rate)) : null;
  const rows = [];
  for (const [name, { runs, error }] of results) {
    if (!runs.length) {
      rows.push({ contender: name, error: error ?? 'no runs' });
      continue;
    }
    const rates = runs.map((run) => run.rate);
    const proxied = runs.filter((run) => run.proxy);
    const cpuPerOp = proxied.map((run) => (run.proxy.cpuSeconds / run.operations) * scenario.cpuScale);
    const rate = median(rates);
    rows.push({
      contender: name,
      cpuPerOp: cpuPerOp.length ? median(cpuPerOp) : null,
      cpuPerOpSpread: spread(cpuPerOp),
      rate,
      rateSpread: spread(rates),
      vsDirect: directRate ? rate / directRate : null,
      coreBusyPct: proxied.length ? median(proxied.map((run) => (run.proxy.cpuSeconds / run.proxy.wallSeconds) * 100)) : null,
      rssMb: proxied.length ? median(proxied.map((run) => run.proxy.rssKb / 1024)) : null,
      errors: runs.reduce((sum, run) => sum + run.errors, 0),
      runs: runs.length,
      error,
    });
  }
  return rows;
}

/** @param {Map<string, { runs: any[], error: string | null }>} results */
export function summarizeIdle(results) {
  const rows = [];
  for (const [name, { runs, error }] of results) {
    if (!runs.length) {
      rows.push({ contender: name, error: error ?? 'no runs' });
      continue;
    }
    const perConnection = runs.map((run) => run.kbPerConnection);
    rows.push({
      contender: name,
      kbPerConnection: median(perConnection),
      kbPerConnectionSpread: spread(perConnection),
      rssBeforeMb: median(runs.map((run) => run.rssBeforeKb / 1024)),
      rssAfterMb: median(runs.map((run) => run.rssAfterKb / 1024)),
      runs: runs.length,
      error,
    });
  }
  return rows;
}

/**
 * One summary row per contender of the flood scenario: legitimate success over all runs (every
 * request counts), medians of the rest.
 * @param {Map<string, { runs: any[], error: string | null }>} results
 */
export function summarizeFlood(results) {
  const rows = [];
  for (const [name, { runs, error }] of results) {
    if (!runs.length) {
      rows.push({ contender: name, error: error ?? 'no runs' });
      continue;
    }
    const sum = (pick) => runs.reduce((total, run) => total + pick(run), 0);
    const failures = {};
    for (const run of runs) {
      for (const [kind, n] of Object.entries({ ...run.baseline.failures, ...prefixed(run.attack.failures, 'attack ') })) failures[kind] = (failures[kind] ?? 0) + n;
    }
    const p99Ratios = runs.map((run) => run.attack.p99Ms / run.baseline.p99Ms);
    const cpuPerRefused = runs.map((run) => run.cpuPerRefusedUs).filter((us) => us !== null);
    rows.push({
      contender: name,
      baselineOk: sum((run) => run.baseline.ok),
      baselineAttempts: sum((run) => run.baseline.attempts),
      attackOk: sum((run) => run.attack.ok),
      attackAttempts: sum((run) => run.attack.attempts),
      failures,
      baselineP50Ms: median(runs.map((run) => run.baseline.p50Ms)),
      attackP50Ms: median(runs.map((run) => run.attack.p50Ms)),
      baselineP99Ms: median(runs.map((run) => run.baseline.p99Ms)),
      attackP99Ms: median(runs.map((run) => run.attack.p99Ms)),
      attackP99Spread: spread(runs.map((run) => run.attack.p99Ms)),
      attackMaxMs: Math.max(...runs.map((run) => run.attack.maxMs)),
      attackSlow: sum((run) => run.attack.slow),
      p99Ratio: median(p99Ratios),
      attemptsPerSecond: median(runs.map((run) => run.attacker.attempts / run.attacker.seconds)),
      refused: median(runs.map((run) => run.attacker.refused)),
      attackerErrors: sum((run) => Object.values(run.attacker.errors).reduce((a, b) => a + b, 0)),
      held: median(runs.map((run) => run.backendHeld)),
      backendAccepted: median(runs.map((run) => run.backendAccepted)),
      listenDrops: median(runs.map((run) => run.listenDrops)),
      baselineCoreBusyPct: median(runs.map((run) => run.baselineCoreBusyPct)),
      attackCoreBusyPct: median(runs.map((run) => run.attackCoreBusyPct)),
      cpuPerRefusedUs: cpuPerRefused.length ? median(cpuPerRefused) : null,
      cpuPerRefusedSpread: spread(cpuPerRefused),
      rssBeforeMb: median(runs.map((run) => run.rssBeforeKb / 1024)),
      rssPeakMb: median(runs.map((run) => run.rssPeakKb / 1024)),
      rssAfterMb: median(runs.map((run) => run.rssAfterKb / 1024)),
      logLines: median(runs.map((run) => run.logLines)),
      logLinesMax: Math.max(...runs.map((run) => run.logLines)),
      attackSeconds: median(runs.map((run) => run.attackSeconds)),
      lastRunLog: runs.at(-1).loggedText.map(logMessage),
      runs: runs.length,
      error,
    });
  }
  return rows;
}

/** The `msg` of a JSON log line (smartproxy's pino lines), else the line itself, cut short. */
function logMessage(line) {
  let text = line;
  try {
    text = JSON.parse(line).msg ?? line;
  } catch {
    // not JSON: haproxy's lines are plain text
  }
  return text.length > 120 ? text.slice(0, 120) + '…' : text;
}

function prefixed(counts, prefix) {
  return Object.fromEntries(Object.entries(counts).map(([key, n]) => [prefix + key, n]));
}

/**
 * @param {{ what: string, backend: string, rows: any[] }} section
 * @param {(line: string) => void} write
 */
export function printFloodSummary({ what, backend, rows }, write) {
  const percent = (ok, attempts) => (attempts ? `${((ok / attempts) * 100).toFixed(ok === attempts ? 0 : 2)}%` : '—');
  const ms = (value) => `${formatNumber(value)} ms`;
  write('');
  write(`Flood: ${what}.`);
  write(`Backend: ${backend}. Legitimate success counts every request of every run; the rest are medians of the runs.`);
  write('p99 x = attack p99 / baseline p99 (target <= 2); >= 1 s = legitimate round trips under attack that took a second or');
  write('more, over all runs (a SYN the kernel dropped is retried after 1 s). Failures are listed below the tables.');
  write('');
  const notes = [];
  const note = (text) => `[${notes.push(text)}]`;
  const legitBody = [];
  const attackBody = [];
  for (const row of rows) {
    if (row.baselineOk === undefined) {
      legitBody.push([row.contender, 'FAILED', '', '', '', '', '', '', '', '', note(`flood ${row.contender}: ${firstLine(row.error)}`)]);
      continue;
    }
    const stoppedEarly = row.error ? `${row.runs} runs ${note(`flood ${row.contender} stopped early: ${firstLine(row.error)}`)}` : '';
    legitBody.push([
      row.contender,
      percent(row.baselineOk, row.baselineAttempts),
      `${percent(row.attackOk, row.attackAttempts)} (${formatCount(row.attackOk)}/${formatCount(row.attackAttempts)})`,
      ms(row.baselineP50Ms),
      ms(row.attackP50Ms),
      ms(row.baselineP99Ms),
      `${ms(row.attackP99Ms)} ${row.attackP99Spread}`.trim(),
      row.p99Ratio.toFixed(1),
      ms(row.attackMaxMs),
      formatCount(row.attackSlow),
      stoppedEarly,
    ]);
    attackBody.push([
      row.contender,
      `${formatNumber(row.attemptsPerSecond)}/s`,
      formatCount(row.refused),
      formatCount(row.held),
      formatCount(row.backendAccepted),
      formatCount(row.listenDrops),
      `${Math.round(row.baselineCoreBusyPct)}% -> ${Math.round(row.attackCoreBusyPct)}%`,
      row.cpuPerRefusedUs === null ? '—' : `${formatNumber(row.cpuPerRefusedUs)} µs ${row.cpuPerRefusedSpread}`.trim(),
      `${formatNumber(row.rssBeforeMb)} / ${formatNumber(row.rssPeakMb)} / ${formatNumber(row.rssAfterMb)} MB`,
      row.logLines === row.logLinesMax ? String(row.logLines) : `${row.logLines} (max ${row.logLinesMax})`,
    ]);
    const failureText = Object.entries(row.failures).map(([kind, n]) => `${kind} ${n}`).join(', ');
    if (failureText) notes.push(`flood ${row.contender} legitimate failures over all runs: ${failureText}`);
    if (row.lastRunLog.length) notes.push(`flood ${row.contender} log lines of the last attack: ${row.lastRunLog.map((msg) => `"${msg}"`).join('; ')}`);
    if (row.attackerErrors) notes.push(`flood ${row.contender}: ${row.attackerErrors} attacker connects failed outright (see --json)`);
  }
  printTable(['contender', 'legit ok base', 'legit ok attack', 'p50 base', 'p50 attack', 'p99 base', 'p99 attack', 'p99 x', 'max attack', '>= 1 s', ''], legitBody, write);
  if (attackBody.length) {
    write('');
    write('attempts = attacker connects per second; refused = reset or closed before a byte; held = attacker connections the');
    write('backend holds at the end; accepted = connections the backend accepted during the attack (legitimate ones included);');
    write('listen drops = attempts the kernel dropped because the proxy\'s accept queue (backlog 4096) was full: a dropped');
    write('legitimate SYN is retried after 1 s, the usual cause of a p99 near 1,000 ms;');
    write('core% = proxy core busy, baseline -> attack; CPU/refused = extra proxy CPU of the attack per refused attempt;');
    write(`RSS before the attack / peak / end; log = proxy stdout+stderr lines in the attack window (~${formatNumber(rows.find((row) => row.attackSeconds)?.attackSeconds ?? NaN)} s).`);
    write('');
    printTable(['contender', 'attempts', 'refused', 'held', 'accepted', 'listen drops', 'core%', 'CPU/refused', 'RSS', 'log'], attackBody, write);
  }
  notes.forEach((text, i) => write(`[${i + 1}] ${text}`));
}

/** First line of an error, cut to fit a note. */
function firstLine(text, max = 300) {
  const line = text.split('\n').find((l) => l.trim()) ?? text;
  return line.length > max ? line.slice(0, max) + '…' : line;
}

function printTable(header, rows, write) {
  const widths = header.map((title, i) => Math.max(title.length, ...rows.map((row) => (row[i] ?? '').length)));
  const line = (cells) => cells.map((cell, i) => (i < 2 ? cell.padEnd(widths[i]) : cell.padStart(widths[i]))).join('  ').trimEnd();
  write(line(header));
  write(widths.map((w) => '-'.repeat(w)).join('  ').trimEnd());
  for (const row of rows) write(line(row));
}

/**
 * @param {{ scenario: import('./scenarios.mjs').RateScenario, rows: any[] }[]} rateSections
 * @param {{ size: number, rows: any[] }[]} idleSections
 * @param {(line: string) => void} write
 */
export function printSummary(rateSections, idleSections, write) {
  if (rateSections.length) {
    write('');
    write('Rates: medians of the runs. PROXY CPU/op is user+sys of the proxy process(es) per operation; lower is better.');
    write('core% = share of the proxy core in use (near 100%: the proxy is the bottleneck).');
    write('');
    const body = [];
    const notes = [];
    const note = (text) => `[${notes.push(text)}]`;
    for (const { scenario, rows } of rateSections) {
      rows.forEach((row, i) => {
        const label = i === 0 ? scenario.name : '';
        if (row.rate === undefined) {
          body.push([label, row.contender, 'FAILED', '', '', '', '', '', '', '', note(`${scenario.name} ${row.contender}: ${firstLine(row.error)}`)]);
          return;
        }
        body.push([
          label,
          row.contender,
          row.cpuPerOp === null ? '—' : `${formatNumber(row.cpuPerOp)} ${scenario.cpuUnit}`,
          row.cpuPerOpSpread,
          `${formatNumber(row.rate)} ${scenario.rateUnit}`,
          row.rateSpread,
          row.vsDirect === null ? '—' : row.vsDirect.toFixed(2),
          row.coreBusyPct === null ? '—' : `${Math.round(row.coreBusyPct)}%`,
          row.rssMb === null ? '—' : `${formatNumber(row.rssMb)} MB`,
          row.errors ? String(row.errors) : '0',
          row.error ? `${row.runs} runs ${note(`${scenario.name} ${row.contender} stopped early: ${firstLine(row.error)}`)}` : '',
        ]);
      });
    }
    printTable(['scenario', 'contender', 'PROXY CPU/op', '±', 'rate', '±', 'vs direct', 'core%', 'RSS', 'errors', ''], body, write);
    notes.forEach((text, i) => write(`[${i + 1}] ${text}`));
  }
  if (idleSections.length) {
    write('');
    write('Idle connections: growth of the proxy RSS (VmRSS, whole process tree) per connection held;');
    write('marginal = RSS added per connection between this size and the one before (start-up costs cancel out).');
    write('');
    const body = [];
    const notes = [];
    const note = (text) => `[${notes.push(text)}]`;
    /** contender -> { size, growthKb } of the previous (smaller) idle size */
    const previous = new Map();
    for (const { size, rows } of [...idleSections].sort((a, b) => a.size - b.size)) {
      rows.forEach((row, i) => {
        const label = i === 0 ? `idle ${size}` : '';
        if (row.kbPerConnection === undefined) {
          body.push([label, row.contender, 'FAILED', '', '', '', '', note(`idle ${size} ${row.contender}: ${firstLine(row.error)}`)]);
          return;
        }
        const before = previous.get(row.contender);
        const growthKb = row.kbPerConnection * size;
        previous.set(row.contender, { size, growthKb });
        body.push([
          label,
          row.contender,
          `${formatNumber(row.kbPerConnection)} KB`,
          row.kbPerConnectionSpread,
          before ? `${formatNumber((growthKb - before.growthKb) / (size - before.size))} KB` : '—',
          `${formatNumber(row.rssBeforeMb)} MB`,
          `${formatNumber(row.rssAfterMb)} MB`,
          row.error ? `${row.runs} runs ${note(`idle ${size} ${row.contender} stopped early: ${firstLine(row.error)}`)}` : '',
        ]);
      });
    }
    printTable(['scenario', 'contender', 'RSS/conn', '±', 'marginal', 'RSS before', 'RSS after', ''], body, write);
    notes.forEach((text, i) => write(`[${i + 1}] ${text}`));
  }
}

/**
 * The scaling table: per scenario and contender, the rate and proxy CPU per operation with the
 * proxy on k cores (threads = k), and the rate as a multiple of k = 1.
 * @param {{ k: number, scenario: import('./scenarios.mjs').RateScenario, rows: any[] }[]} sections
 * @param {number[]} skipped  k that did not fit this machine
 * @param {number} cores
 * @param {(line: string) => void} write
 */
export function printScaling(sections, skipped, cores, write) {
  write('');
  write('Scaling: the proxy on k cores with threads = k (haproxy nbthread k, nginx worker_processes k), the load on the');
  write('other cores. rate (x = multiple of k = 1) / PROXY CPU per operation; medians of the runs.');
  if (skipped.length) write(`k = ${skipped.join(', ')} not run: this machine has ${cores} cores and the proxy on k cores needs k + 1.`);
  const ks = [...new Set(sections.map((section) => section.k))].sort((a, b) => a - b);
  if (!ks.length) return;
  write('');
  const body = [];
  for (const name of [...new Set(sections.map((section) => section.scenario.name))]) {
    const contenders = [...new Set(sections.filter((s) => s.scenario.name === name).flatMap((s) => s.rows.map((row) => row.contender)))];
    contenders.forEach((contender, i) => {
      const cells = [i === 0 ? name : '', contender];
      let base = null;
      for (const k of ks) {
        const section = sections.find((s) => s.k === k && s.scenario.name === name);
        const row = section?.rows.find((r) => r.contender === contender);
        if (!row || row.rate === undefined) {
          cells.push('FAILED');
          continue;
        }
        base ??= k === ks[0] ? row.rate : null;
        const times = base ? ` x${(row.rate / base).toFixed(2)}` : '';
        const cpu = row.cpuPerOp === null ? '' : ` / ${formatNumber(row.cpuPerOp)} ${section.scenario.cpuUnit}`;
        cells.push(`${formatNumber(row.rate)} ${section.scenario.rateUnit}${times}${cpu}`);
      }
      body.push(cells);
    });
  }
  printTable(['scenario', 'contender', ...ks.map((k) => `k = ${k}`)], body, write);
}
