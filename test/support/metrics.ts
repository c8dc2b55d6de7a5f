// Reading metrics in tests: a strict parser for the Prometheus text exposition (format 0.0.4)
// and lookups of one series, in-process or from scraped text.
import type { Daemon } from '../../src/daemon.ts';

export interface Sample {
  readonly name: string;
  readonly labels: Readonly<Record<string, string>>;
  readonly value: number;
}

export interface Exposition {
  /** Family name -> its HELP text and TYPE. */
  readonly families: ReadonlyMap<string, { help: string; type: string }>;
  readonly samples: readonly Sample[];
}

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
const TYPES = new Set(['counter', 'gauge', 'histogram', 'summary', 'untyped']);

class ExpositionError extends Error {
  constructor(lineNo: number, line: string, problem: string) {
    super(`exposition line ${lineNo}: ${problem}: ${JSON.stringify(line)}`);
  }
}

/**
 * Parses the text exposition, throwing on anything the format does not allow: a sample line that
 * is not `name{label="value",...} value`, a label value with an escape other than \\ \" \n, a
 * series given twice, a family without HELP or TYPE (or with TYPE after its samples), the lines
 * of one family not kept together.
 */
export function parseExposition(text: string): Exposition {
  const families = new Map<string, { help: string | null; type: string | null; sampled: boolean }>();
  const samples: Sample[] = [];
  const seriesSeen = new Set<string>();
  const finished = new Set<string>();
  let current: string | null = null;
  if (!text.endsWith('\n')) throw new Error('exposition does not end with a newline');
  const lines = text.slice(0, -1).split('\n');
  const enter = (family: string, lineNo: number, line: string): void => {
    if (family === current) return;
    if (finished.has(family)) throw new ExpositionError(lineNo, line, `lines of ${family} are not kept together`);
    if (current !== null) finished.add(current);
    current = family;
  };
  lines.forEach((line, i) => {
    const lineNo = i + 1;
    if (line.startsWith('#')) {
      const m = /^# (HELP|TYPE) (\S+) (.*)$/.exec(line);
      if (m === null) {
        if (/^# (HELP|TYPE)\b/.test(line)) throw new ExpositionError(lineNo, line, 'malformed HELP/TYPE');
        return; // an ordinary comment
      }
      const [, kind, name, rest] = m as unknown as [string, 'HELP' | 'TYPE', string, string];
      if (!METRIC_NAME.test(name)) throw new ExpositionError(lineNo, line, 'bad metric name');
      enter(name, lineNo, line);
      const family = families.get(name) ?? { help: null, type: null, sampled: false };
      families.set(name, family);
      if (kind === 'HELP') {
        if (family.help !== null) throw new ExpositionError(lineNo, line, 'second HELP');
        if (!helpEscapesValid(rest)) throw new ExpositionError(lineNo, line, 'bad escape in HELP');
        family.help = rest;
      } else {
        if (family.type !== null) throw new ExpositionError(lineNo, line, 'second TYPE');
        if (family.sampled) throw new ExpositionError(lineNo, line, 'TYPE after samples');
        if (!TYPES.has(rest)) throw new ExpositionError(lineNo, line, 'unknown TYPE');
        family.type = rest;
      }
      return;
    }
    if (line === '') return; // the format ignores empty lines
    const { name, labels, end } = parseSeries(line, lineNo);
    const rest = line.slice(end);
    const m = /^ (\S+)( -?\d+)?$/.exec(rest);
    if (m === null) throw new ExpositionError(lineNo, line, 'expected " value [timestamp]" after the series');
    const value = parseValue(m[1]!);
    if (value === null) throw new ExpositionError(lineNo, line, 'value is not a number');
    const familyName = familyOf(name, families);
    if (familyName === null) throw new ExpositionError(lineNo, line, 'sample of a family without HELP and TYPE');
    enter(familyName, lineNo, line);
    const family = families.get(familyName)!;
    family.sampled = true;
    if (family.type === 'histogram' && name.endsWith('_bucket') && labels.le === undefined) throw new ExpositionError(lineNo, line, 'bucket without le');
    const key = `${name}{${Object.keys(labels).sort().map((k) => `${k}=${JSON.stringify(labels[k])}`).join(',')}}`;
    if (seriesSeen.has(key)) throw new ExpositionError(lineNo, line, 'duplicate series');
    seriesSeen.add(key);
    samples.push({ name, labels, value });
  });
  const out = new Map<string, { help: string; type: string }>();
  for (const [name, f] of families) {
    if (f.help === null || f.type === null) throw new Error(`family ${name} lacks ${f.help === null ? 'HELP' : 'TYPE'}`);
    out.set(name, { help: f.help, type: f.type });
  }
  return { families: out, samples };
}

/** HELP text may escape only a backslash and a newline. */
function helpEscapesValid(text: string): boolean {
  for (let i = 0; i < text.length; i++) {
    if (text[i] !== '\\') continue;
    if (text[i + 1] !== '\\' && text[i + 1] !== 'n') return false;
    i++;
  }
  return true;
}

function familyOf(name: string, families: Map<string, { type: string | null }>): string | null {
  if (families.get(name)?.type != null) return name;
  for (const suffix of ['_bucket', '_sum', '_count']) {
    if (!name.endsWith(suffix)) continue;
    const base = name.slice(0, -suffix.length);
    const type = families.get(base)?.type;
    if (type === 'histogram' || (type === 'summary' && suffix !== '_bucket')) return base;
  }
  return null;
}

/** A float as Go's strconv.ParseFloat reads it (what Prometheus uses): NaN and Inf in any case. */
function parseValue(text: string): number | null {
  if (/^[+]?inf(inity)?$/i.test(text)) return Infinity;
  if (/^-inf(inity)?$/i.test(text)) return -Infinity;
  if (/^nan$/i.test(text)) return NaN;
  if (!/^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(text)) return null;
  return Number(text);
}

/** `name` or `name{a="x",b="y"}` at the start of `line`; `end` is the index after it. */
function parseSeries(line: string, lineNo: number): { name: string; labels: Record<string, string>; end: number } {
  const nameMatch = /^[a-zA-Z_:][a-zA-Z0-9_:]*/.exec(line);
  if (nameMatch === null) throw new ExpositionError(lineNo, line, 'no metric name');
  const name = nameMatch[0];
  const labels: Record<string, string> = {};
  let i = name.length;
  if (line[i] !== '{') return { name, labels, end: i };
  i++;
  for (;;) {
    if (line[i] === '}') return { name, labels, end: i + 1 };
    const labelMatch = /^[^=]*/.exec(line.slice(i))!;
    const label = labelMatch[0];
    if (!LABEL_NAME.test(label)) throw new ExpositionError(lineNo, line, `bad label name ${JSON.stringify(label)}`);
    if (label in labels) throw new ExpositionError(lineNo, line, `label ${label} given twice`);
    i += label.length;
    if (line[i] !== '=' || line[i + 1] !== '"') throw new ExpositionError(lineNo, line, `expected ="..." after ${label}`);
    i += 2;
    let value = '';
    for (;;) {
      const c = line[i];
      if (c === undefined) throw new ExpositionError(lineNo, line, 'unterminated label value');
      if (c === '"') break;
      if (c === '\\') {
        const next = line[i + 1];
        if (next === '\\') value += '\\';
        else if (next === '"') value += '"';
        else if (next === 'n') value += '\n';
        else throw new ExpositionError(lineNo, line, `bad escape \\${next ?? ''} in a label value`);
        i += 2;
        continue;
      }
      value += c;
      i++;
    }
    labels[label] = value;
    i++; // closing quote
    if (line[i] === ',') i++;
    else if (line[i] !== '}') throw new ExpositionError(lineNo, line, 'expected , or } after a label');
  }
}

/**
 * The value of the one series of `name` whose labels include `labels` (0 when there is none;
 * throws when more than one matches, so a lookup can never add up series by accident).
 */
export function valueOf(samples: readonly Sample[], name: string, labels: Record<string, string> = {}): number {
  const found = samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
  if (found.length > 1) throw new Error(`${name} ${JSON.stringify(labels)} matches ${found.length} series`);
  return found[0]?.value ?? 0;
}

/** Scrapes the daemon's registry in-process and parses it strictly. */
export async function scrape(daemon: Daemon): Promise<Exposition> {
  return parseExposition(await daemon.metrics.exposition());
}

/** One series of the daemon's metrics, read in-process. */
export async function metricValue(daemon: Daemon, name: string, labels: Record<string, string> = {}): Promise<number> {
  return valueOf((await scrape(daemon)).samples, name, labels);
}
