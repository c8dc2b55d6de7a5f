// Turning problems into `path: message` lines an operator can act on: TOML paths, values shown
// the way they were written, zod's issues rewritten in our words, "did you mean" for typos.
import * as z from 'zod';
import type { ConfigIssue } from './types.ts';

/** `["listeners", 1, "routes", 0]` -> `listeners[1].routes[0]`; odd keys are quoted. */
export function formatPath(path: readonly PropertyKey[]): string {
  let text = '';
  for (const segment of path) {
    if (typeof segment === 'number') text += `[${segment}]`;
    else {
      const key = String(segment);
      const bare = /^[A-Za-z0-9_-]+$/.test(key) ? key : JSON.stringify(key);
      text += text.length === 0 ? bare : `.${bare}`;
    }
  }
  return text;
}

const MAX_VALUE_CHARS = 80;

/** A value as it would look in TOML (strings quoted, tables inline), cut short when long. */
export function formatValue(value: unknown): string {
  const text = renderValue(value, 0);
  return text.length > MAX_VALUE_CHARS ? `${text.slice(0, MAX_VALUE_CHARS - 3)}...` : text;
}

function renderValue(value: unknown, depth: number): string {
  if (typeof value === 'string') return JSON.stringify(value);
  if (typeof value === 'number') {
    if (Number.isNaN(value)) return 'nan';
    if (!Number.isFinite(value)) return value > 0 ? 'inf' : '-inf';
    return String(value);
  }
  if (typeof value === 'bigint' || typeof value === 'boolean') return String(value);
  if (value instanceof Date) return Number.isNaN(value.getTime()) ? 'a date' : value.toISOString();
  if (value === undefined) return 'nothing';
  if (value === null) return 'null';
  if (depth > 2) return '...';
  if (Array.isArray(value)) return `[${value.map((v) => renderValue(v, depth + 1)).join(', ')}]`;
  if (typeof value === 'object') {
    const entries = Object.entries(value as Record<string, unknown>);
    if (entries.length === 0) return '{}';
    return `{ ${entries.map(([k, v]) => `${formatPath([k])} = ${renderValue(v, depth + 1)}`).join(', ')} }`;
  }
  return typeof value;
}

// Optimal string alignment distance: Levenshtein plus adjacent swaps, so "rotues" is 1 from "routes".
function editDistance(a: string, b: string): number {
  const rows: number[][] = [];
  for (let i = 0; i <= a.length; i++) {
    const row: number[] = [];
    for (let j = 0; j <= b.length; j++) {
      if (i === 0 || j === 0) {
        row.push(i + j);
        continue;
      }
      const above = rows[i - 1] ?? [];
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      let best = Math.min((above[j] ?? 0) + 1, (row[j - 1] ?? 0) + 1, (above[j - 1] ?? 0) + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) {
        best = Math.min(best, (rows[i - 2]?.[j - 2] ?? 0) + 1);
      }
      row.push(best);
    }
    rows.push(row);
  }
  return rows[a.length]?.[b.length] ?? Math.max(a.length, b.length);
}

/** The candidate closest to `word`, if it is close enough (and unique enough) to be a likely typo. */
export function closestMatch(word: string, candidates: readonly string[]): string | undefined {
  const normalized = word.toLowerCase().replace(/-/g, '_');
  let best: string | undefined;
  let bestDistance = Infinity;
  let tied = false;
  for (const candidate of candidates) {
    const distance = editDistance(normalized, candidate.toLowerCase());
    if (distance < bestDistance) {
      best = candidate;
      bestDistance = distance;
      tied = false;
    } else if (distance === bestDistance) tied = true;
  }
  // A guess between two equally close names ("v3": v1 or v2?) would mislead more than help.
  const allowed = Math.max(1, Math.min(3, Math.floor(word.length / 3)));
  return bestDistance <= allowed && !tied ? best : undefined;
}

const EXPECTED: Record<string, string> = {
  string: 'a string',
  number: 'a number',
  int: 'an integer',
  boolean: 'true or false',
  array: 'a list',
  object: 'a table',
};

/** "missing (expected X)" or "expected X, got Y": the one phrasing for every wrong type. */
export function wrongTypeMessage(input: unknown, expected: string): string {
  if (input === undefined) return `missing (expected ${expected})`;
  // The TOML parser hands back integers beyond 2^53 as (possibly wrapped) bigints: not worth echoing.
  if (typeof input === 'bigint') return `integer too large (expected ${expected})`;
  return `expected ${expected}, got ${formatValue(input)}`;
}

/**
 * Per-parse zod error map: our wording for every issue zod raises itself. Schemas that know
 * better (durations, host:port, names) set their own messages and take precedence.
 */
export function zodMessage(issue: z.core.$ZodRawIssue): string {
  const got = formatValue(issue.input);
  switch (issue.code) {
    case 'invalid_type': {
      const expected = EXPECTED[issue.expected] ?? issue.expected;
      return wrongTypeMessage(issue.input, expected);
    }
    case 'too_small': {
      if (issue.origin === 'array') return `${Number(issue.minimum) <= 1 ? 'must not be empty' : `needs at least ${issue.minimum} entries`}, got ${got}`;
      const bound = issue.inclusive === false ? `greater than ${issue.minimum}` : `at least ${issue.minimum}`;
      return `must be ${bound}, got ${got}`;
    }
    case 'too_big': {
      if (issue.origin === 'array') return `has more than ${issue.maximum} entries`;
      const bound = issue.inclusive === false ? `less than ${issue.maximum}` : `at most ${issue.maximum}`;
      return `must be ${bound}, got ${got}`;
    }
    case 'invalid_value': {
      const choices = issue.values.map((v) => formatValue(v)).join(', ');
      const hint = typeof issue.input === 'string' ? closestMatch(issue.input, issue.values.map(String)) : undefined;
      return `${got} is not one of ${choices}${hint === undefined ? '' : ` (did you mean "${hint}"?)`}`;
    }
    case 'invalid_format':
      return `${got} has the wrong format`;
    case 'not_multiple_of':
      return `must be a multiple of ${issue.divisor}, got ${got}`;
    case 'unrecognized_keys':
      return 'unknown key';
    case 'custom':
      return typeof issue.message === 'string' ? issue.message : `${got} is not allowed`;
    default:
      return `${got} is not valid here`;
  }
}

/** The keys a table at `path` may hold, found by walking the schema (empty if not a table). */
export function knownKeysAt(schema: z.ZodType, path: readonly PropertyKey[]): string[] {
  const candidates = schemasAt(schema, path);
  const keys = new Set<string>();
  for (const candidate of candidates) {
    for (const inner of unwrap(candidate)) {
      if (inner instanceof z.ZodObject) for (const key of Object.keys(inner.shape)) keys.add(key);
    }
  }
  return [...keys];
}

// Optional, default, prefault and transform layers around the schema that does the checking;
// a union yields each of its options.
function unwrap(schema: z.ZodType): z.ZodType[] {
  if (schema instanceof z.ZodOptional || schema instanceof z.ZodDefault || schema instanceof z.ZodPrefault) {
    return unwrap(schema.unwrap() as z.ZodType);
  }
  if (schema instanceof z.ZodPipe) return unwrap(schema.in as z.ZodType);
  if (schema instanceof z.ZodUnion) return (schema.options as z.ZodType[]).flatMap(unwrap);
  return [schema];
}

function schemasAt(schema: z.ZodType, path: readonly PropertyKey[]): z.ZodType[] {
  let current = [schema];
  for (const segment of path) {
    const next: z.ZodType[] = [];
    for (const candidate of current.flatMap(unwrap)) {
      if (typeof segment === 'number' && candidate instanceof z.ZodArray) next.push(candidate.element as z.ZodType);
      if (typeof segment === 'string' && candidate instanceof z.ZodObject) {
        const child = (candidate.shape as Record<string, z.ZodType>)[segment];
        if (child !== undefined) next.push(child);
      }
    }
    current = next;
  }
  return current;
}

function unknownKeyMessage(key: string, known: readonly string[]): string {
  const suggestion = closestMatch(key, known);
  if (suggestion !== undefined) return `unknown key (did you mean "${suggestion}"?)`;
  if (known.length === 0) return 'unknown key';
  return `unknown key (expected one of: ${known.join(', ')})`;
}

function isTypeMismatchAtRoot(issue: z.core.$ZodIssue): boolean {
  if (issue.path.length !== 0) return false;
  if (issue.code === 'invalid_type') return true;
  // A union (a backend: "host:port" or a table) that the value fits none of by type.
  return issue.code === 'invalid_union' && issue.errors.every((branch) => branch.some(isTypeMismatchAtRoot));
}

/**
 * zod issues -> our issues: one per unknown key (with a suggestion), and for "one or a list"
 * unions the errors of the branch whose type the value had instead of a report from both.
 */
export function fromZodIssues(
  issues: readonly z.core.$ZodIssue[],
  schema: z.ZodType,
  prefix: readonly PropertyKey[] = [],
): ConfigIssue[] {
  const result: ConfigIssue[] = [];
  for (const issue of issues) {
    const path = [...prefix, ...issue.path];
    if (issue.code === 'unrecognized_keys') {
      const known = knownKeysAt(schema, path);
      for (const key of issue.keys) result.push({ path: formatPath([...path, key]), message: unknownKeyMessage(key, known) });
      continue;
    }
    if (issue.code === 'invalid_union') {
      const branches = issue.errors.filter((branch) => !branch.some(isTypeMismatchAtRoot));
      const [onlyBranch] = branches;
      if (branches.length === 1 && onlyBranch !== undefined) {
        result.push(...fromZodIssues(onlyBranch, schema, path));
        continue;
      }
    }
    result.push({ path: formatPath(path), message: issue.message });
  }
  return result;
}
