// Where a TOML path is written in the file. @iarna/toml returns values without positions, so this
// scans the source text itself: tables `[a.b]`, arrays of tables `[[a.b]]` counted in order,
// dotted keys, inline tables and arrays (an element's line is where the element starts), strings
// of all four kinds (a `#`, `[` or `=` inside one is text) and comments. It is not a parser: it
// runs after @iarna/toml has accepted the text, records a line for every key, table and array
// element, and keeps only the paths that exist in the parsed document, so a scanning mistake
// loses a line instead of printing a wrong one. A path it has no line for falls back to its
// closest enclosing key or table.
import { formatPath } from './issues.ts';

type Segment = string | number;

/** TOML path (as `formatPath` prints it) -> 1-based line where it is written. */
export type LineIndex = ReadonlyMap<string, number>;

class ScanError extends Error {}

interface Statement {
  readonly path: readonly Segment[];
  /** The line it starts on. */
  readonly line: number;
}

// One pass over the text, statement by statement. `found` is called once per key, table and
// array element with the line it starts on; `exact` is false for a table only implied by a
// longer header or dotted key (`[a.b]` implies `a`).
class Scanner {
  pos = 0;
  line = 1;
  /** The statement being scanned (key = value or header), once its key is known. */
  open: Statement | undefined;
  private table: Segment[] = [];
  private readonly arrays = new Map<string, number>();

  constructor(
    private readonly text: string,
    private readonly found: (path: readonly Segment[], line: number, exact: boolean) => void,
  ) {}

  /**
   * Scans statements to the end, or until one starts after line `stopAfter`; `done` gets each
   * statement with the line it ends on and may stop the scan by returning true.
   */
  run(stopAfter = Infinity, done?: (statement: Statement, lastLine: number) => boolean): void {
    for (;;) {
      this.open = undefined;
      this.skipBlank();
      if (this.pos >= this.text.length || this.line > stopAfter) return;
      if (this.text.startsWith('[[', this.pos)) this.arrayHeader();
      else if (this.peek() === '[') this.tableHeader();
      else this.keyValue();
      const lastLine = this.line;
      this.endOfLine();
      if (this.open !== undefined && done?.(this.open, lastLine) === true) return;
    }
  }

  private tableHeader(): void {
    const line = this.line;
    this.pos++;
    const keys = this.key();
    const path = this.resolve(keys);
    this.open = { path, line };
    this.expect(']');
    this.implied(path, line);
    this.found(path, line, true);
    this.table = path;
  }

  private arrayHeader(): void {
    const line = this.line;
    this.pos += 2;
    const keys = this.key();
    const parent = this.resolve(keys.slice(0, -1));
    const array = [...parent, keys[keys.length - 1]!];
    const index = this.arrays.get(formatPath(array)) ?? 0;
    this.arrays.set(formatPath(array), index + 1);
    const path = [...array, index];
    this.open = { path, line };
    this.expect(']');
    this.expect(']');
    this.implied(path, line);
    this.found(path, line, true);
    this.table = path;
  }

  /** Header keys -> path: a key naming an array of tables means its last element so far. */
  private resolve(keys: readonly string[]): Segment[] {
    const path: Segment[] = [];
    for (const key of keys) {
      path.push(key);
      const count = this.arrays.get(formatPath(path));
      if (count !== undefined) path.push(count - 1);
    }
    return path;
  }

  private keyValue(): void {
    const line = this.line;
    const path = [...this.table, ...this.key()];
    this.open = { path, line };
    this.assignment(path, line);
  }

  /** `= value` after a key at `path` (written on `line`). */
  private assignment(path: readonly Segment[], line: number): void {
    this.implied(path, line);
    this.found(path, line, true);
    this.skipSpace();
    this.expect('=');
    this.skipSpace();
    this.value(path);
  }

  /** Records the enclosing tables of `path` (those not written down themselves). */
  private implied(path: readonly Segment[], line: number): void {
    for (let length = 1; length < path.length; length++) this.found(path.slice(0, length), line, false);
  }

  private value(path: readonly Segment[]): void {
    const c = this.peek();
    if (c === '"' || c === "'") this.string();
    else if (c === '[') this.array(path);
    else if (c === '{') this.inlineTable(path);
    else this.scalar();
  }

  private array(path: readonly Segment[]): void {
    this.pos++;
    for (let index = 0; ; index++) {
      this.skipBlank();
      if (this.peek() === ']') break;
      const element = [...path, index];
      this.found(element, this.line, true);
      this.value(element);
      this.skipBlank();
      if (this.peek() !== ',') break;
      this.pos++;
    }
    this.expect(']');
  }

  private inlineTable(path: readonly Segment[]): void {
    this.pos++;
    this.skipSpace();
    if (this.peek() === '}') {
      this.pos++;
      return;
    }
    for (;;) {
      const line = this.line;
      this.assignment([...path, ...this.key()], line);
      this.skipSpace();
      if (this.peek() !== ',') break;
      this.pos++;
      this.skipSpace();
    }
    this.expect('}');
  }

  /** Numbers, booleans, dates: everything up to the next delimiter (a date may hold a space). */
  private scalar(): void {
    const begin = this.pos;
    while (this.pos < this.text.length && !',]}#\r\n'.includes(this.text[this.pos]!)) this.pos++;
    if (this.text.slice(begin, this.pos).trim().length === 0) throw new ScanError(`no value at ${begin}`);
  }

  /** A dotted key: bare, "basic" or 'literal' parts, with optional spaces around the dots. */
  private key(): string[] {
    const parts: string[] = [];
    for (;;) {
      this.skipSpace();
      const c = this.peek();
      if (c === '"' || c === "'") {
        const begin = this.pos;
        this.string();
        const raw = this.text.slice(begin, this.pos);
        parts.push(c === "'" ? raw.slice(1, -1) : basicStringValue(raw));
      } else {
        const bare = /[A-Za-z0-9_-]+/y;
        bare.lastIndex = this.pos;
        const match = bare.exec(this.text);
        if (match === null) throw new ScanError(`no key at ${this.pos}`);
        parts.push(match[0]);
        this.pos = bare.lastIndex;
      }
      this.skipSpace();
      if (this.peek() !== '.') return parts;
      this.pos++;
    }
  }

  /** Any of the four string forms; multi-line ones count the lines they span. */
  private string(): void {
    const quote = this.peek();
    const triple = quote.repeat(3);
    if (this.text.startsWith(triple, this.pos)) {
      this.pos += 3;
      for (;;) {
        if (this.pos >= this.text.length) throw new ScanError('unterminated string');
        if (this.text.startsWith(triple, this.pos)) {
          this.pos += 3;
          // Up to two more quotes belong to the content: """a""""" ends with a" + "".
          for (let extra = 0; extra < 2 && this.peek() === quote; extra++) this.pos++;
          return;
        }
        const c = this.text[this.pos]!;
        if (c === '\\' && quote === '"') this.pos++;
        if (this.text[this.pos] === '\n') this.line++;
        this.pos++;
      }
    }
    this.pos++;
    for (;;) {
      const c = this.text[this.pos];
      if (c === undefined || c === '\n') throw new ScanError('unterminated string');
      this.pos++;
      if (c === quote) return;
      if (c === '\\' && quote === '"') this.pos++;
    }
  }

  private endOfLine(): void {
    this.skipSpace();
    this.skipComment();
    if (this.pos >= this.text.length) return;
    if (this.text.startsWith('\r\n', this.pos)) this.pos++;
    if (this.peek() !== '\n') throw new ScanError(`expected the end of the line at ${this.pos}`);
    this.pos++;
    this.line++;
  }

  /** Spaces, comments and line breaks (between statements, inside arrays). */
  private skipBlank(): void {
    for (;;) {
      this.skipSpace();
      this.skipComment();
      if (this.text.startsWith('\r\n', this.pos)) this.pos++;
      if (this.peek() !== '\n') return;
      this.pos++;
      this.line++;
    }
  }

  private skipSpace(): void {
    while (this.peek() === ' ' || this.peek() === '\t') this.pos++;
  }

  private skipComment(): void {
    if (this.peek() !== '#') return;
    while (this.pos < this.text.length && this.text[this.pos] !== '\n' && this.text[this.pos] !== '\r') this.pos++;
  }

  private expect(c: string): void {
    this.skipSpace();
    if (this.peek() !== c) throw new ScanError(`expected ${c} at ${this.pos}`);
    this.pos++;
  }

  private peek(): string {
    return this.text[this.pos] ?? '';
  }
}

/**
 * A quoted key's text. TOML's escapes are JSON's plus \UXXXXXXXX, and a TOML string may hold a
 * raw tab, which JSON may not; anything else JSON refuses throws and empties the index.
 */
function basicStringValue(raw: string): string {
  const json = raw
    .replace(/\t/g, '\\t')
    .replace(/\\U([0-9A-Fa-f]{8})|\\\\/g, (escape: string, hex: string | undefined) =>
      hex === undefined
        ? escape
        : String.fromCodePoint(Number.parseInt(hex, 16)).split('').map((unit) => `\\u${unit.charCodeAt(0).toString(16).padStart(4, '0')}`).join(''));
  return JSON.parse(json) as string;
}

function existsIn(document: unknown, path: readonly Segment[]): boolean {
  let current: unknown = document;
  for (const segment of path) {
    if (typeof segment === 'number') {
      if (!Array.isArray(current) || segment >= current.length) return false;
      current = current[segment];
    } else {
      if (typeof current !== 'object' || current === null || Array.isArray(current) || !Object.hasOwn(current, segment)) return false;
      current = (current as Record<string, unknown>)[segment];
    }
  }
  return true;
}

/**
 * The line of every key, table and array element in `text` (TOML that @iarna/toml parsed into
 * `document`). Only paths present in `document` are kept; a text the scanner cannot follow gives
 * an empty index. Never throws.
 */
export function indexLines(text: string, document: unknown): LineIndex {
  const exact = new Map<string, number>();
  const implied = new Map<string, number>();
  try {
    new Scanner(text, (path, line, isExact) => {
      const key = formatPath(path);
      const into = isExact ? exact : implied;
      if (!into.has(key) && existsIn(document, path)) into.set(key, line);
    }).run();
  } catch {
    return new Map();
  }
  for (const [key, line] of implied) if (!exact.has(key)) exact.set(key, line);
  return exact;
}

/** `listeners[0].routes[1].name` -> its segments; undefined for what formatPath does not print. */
export function parsePath(text: string): Segment[] | undefined {
  const segment = /\[(\d+)\]|(^|\.)([A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*")/y;
  const segments: Segment[] = [];
  while (segment.lastIndex < text.length) {
    const at = segment.lastIndex;
    const match = segment.exec(text);
    if (match === null || (match[2] === '' && at > 0)) return undefined;
    if (match[1] !== undefined) segments.push(Number(match[1]));
    else {
      const key = match[3]!;
      segments.push(key.startsWith('"') ? (JSON.parse(key) as string) : key);
    }
  }
  return segments.length === 0 ? undefined : segments;
}

/** The line of `path` (a formatted TOML path), else of its closest enclosing key or table that has one. */
export function lineOf(index: LineIndex, path: string): number | undefined {
  const segments = parsePath(path);
  if (segments === undefined) return undefined;
  for (let length = segments.length; length > 0; length--) {
    const line = index.get(formatPath(segments.slice(0, length)));
    if (line !== undefined) return line;
  }
  return undefined;
}

/**
 * For a syntax error on `line` (1-based): the path of the key or table whose statement spans
 * that line (`limits.fair_share_above`, `listeners[1]`), if the text before it can be followed.
 */
export function statementAt(text: string, line: number): string | undefined {
  let holder: readonly Segment[] | undefined;
  const scanner = new Scanner(text, () => {});
  try {
    scanner.run(line, (statement, lastLine) => {
      if (statement.line <= line && line <= lastLine) holder = statement.path;
      return holder !== undefined;
    });
  } catch {
    // The scan broke inside a statement that reaches the error's line: that statement holds it.
    // Broken earlier, the scanner lost its way where @iarna/toml did not: name nothing.
    const open = scanner.open;
    if (open !== undefined && open.line <= line && scanner.line >= line) holder = open.path;
  }
  return holder === undefined ? undefined : formatPath(holder);
}
