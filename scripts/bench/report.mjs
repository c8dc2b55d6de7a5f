// Medians, spreads and the printed tables. Spread is half the min-max range of the runs as a
// percentage of their median: "±4%" means every run lay within a band 8% wide.

/** Three significant digits, thousands separated. */
export function formatNumber(value) {
  if (!Number.isFinite(value)) return '—';
  const abs = Math.abs(value);
  const digits = abs >= 100 ? 0 : abs >= 10 ? 1 : abs >= 1 ? 2 : 3;
  return value.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });
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
    write('Idle connections: growth of the proxy RSS (VmRSS, whole process tree) per connection held.');
    write('');
    const body = [];
    const notes = [];
    const note = (text) => `[${notes.push(text)}]`;
    for (const { size, rows } of idleSections) {
      rows.forEach((row, i) => {
        const label = i === 0 ? `idle ${size}` : '';
        if (row.kbPerConnection === undefined) {
          body.push([label, row.contender, 'FAILED', '', '', '', note(`idle ${size} ${row.contender}: ${firstLine(row.error)}`)]);
          return;
        }
        body.push([
          label,
          row.contender,
          `${formatNumber(row.kbPerConnection)} KB`,
          row.kbPerConnectionSpread,
          `${formatNumber(row.rssBeforeMb)} MB`,
          `${formatNumber(row.rssAfterMb)} MB`,
          row.error ? `${row.runs} runs ${note(`idle ${size} ${row.contender} stopped early: ${firstLine(row.error)}`)}` : '',
        ]);
      });
    }
    printTable(['scenario', 'contender', 'RSS/conn', '±', 'RSS before', 'RSS after', ''], body, write);
    notes.forEach((text, i) => write(`[${i + 1}] ${text}`));
  }
}
