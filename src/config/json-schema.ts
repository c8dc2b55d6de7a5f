// `smartproxy schema`: a JSON Schema of the config file for editors (Taplo / Even Better TOML),
// generated from the zod schema so the two cannot drift. It describes the *input* side, what is
// written in the file: durations and addresses are strings there. zod renders a value that a
// transform parses as a bare string, so the strings are recognised by what they accept (the
// schema's own parsers are the judge) and get a description, a pattern an editor can check while
// typing, and their default written as in the file ("5s", not 5000).
//
// Draft 4: Taplo documents Draft 4 as what its validator supports.
import * as z from 'zod';
import { configFileSchema } from './schema.ts';
import { formatDuration } from './dump.ts';

type JsonSchema = Record<string, unknown>;

interface StringKind {
  /** Whether a string schema (its transform included) parses like this kind. */
  readonly accepts: (schema: z.ZodType) => boolean;
  /** A superset of what the kind accepts: an editor flags a value outside it while typing. */
  readonly pattern: string;
  /** A default value of the parsed type, written as in the file. */
  readonly unparse?: (value: unknown) => unknown;
}

const parses = (schema: z.ZodType, text: string): unknown => {
  const result = schema.safeParse(text);
  return result.success ? result.data : undefined;
};

const HOST_PORT = String.raw`(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):[0-9]{1,5}`;

const DURATION: StringKind = {
  accepts: (schema) => typeof parses(schema, '1m30s') === 'number',
  // Units largest first, each at most once (minLength keeps out the empty string).
  pattern: '^([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?$',
  unparse: (value) => (typeof value === 'number' ? formatDuration(value) : value),
};

// In the order they are tried; the first that accepts a string schema describes it.
const STRING_KINDS: readonly StringKind[] = [
  DURATION,
  // [cluster] redis: a Redis URL or unix:/path.
  {
    accepts: (schema) => parses(schema, 'redis://127.0.0.1:6379/0') !== undefined,
    pattern: '^(rediss?://.+|unix:/.+)$',
  },
  // [admin] listen: host:port or unix:/path.
  {
    accepts: (schema) => parses(schema, 'unix:/run/smartproxy/admin.sock') !== undefined,
    pattern: `^(unix:/.+|${HOST_PORT})$`,
  },
  // bind and backends.
  {
    accepts: (schema) => parses(schema, '127.0.0.1:8443') !== undefined,
    pattern: `^${HOST_PORT}$`,
  },
  // firewall lists and proxy_protocol.trusted.
  {
    accepts: (schema) => parses(schema, '10.0.0.0/8') !== undefined,
    pattern: '^[0-9A-Fa-f:.]+(/[0-9]{1,3})?$',
  },
  // sni.
  {
    accepts: (schema) => parses(schema, '*.example.com') !== undefined,
    pattern: String.raw`^(\*\.)?[A-Za-z0-9_.-]+$`,
  },
];

/** The wording the schema uses for a value of the wrong type ("a duration such as ..."). */
function expected(schema: z.ZodType): string | undefined {
  const result = schema.safeParse(null);
  const message = result.success ? undefined : result.error.issues[0]?.message;
  return message === undefined ? undefined : /^expected (.+), got null$/.exec(message)?.[1];
}

function isStringPipe(schema: z.ZodType): schema is z.ZodPipe<z.ZodString, z.ZodType> {
  return schema instanceof z.ZodPipe && schema.in instanceof z.ZodString;
}

function kindOf(schema: z.ZodType): StringKind | undefined {
  return STRING_KINDS.find((kind) => kind.accepts(schema));
}

/** The JSON Schema of a config file, as `smartproxy schema` prints it. */
export function configJsonSchema(): JsonSchema {
  const generated = z.toJSONSchema(configFileSchema, {
    target: 'draft-4',
    io: 'input',
    override: ({ zodSchema, jsonSchema }) => {
      const schema = zodSchema as unknown as z.ZodType;
      if (isStringPipe(schema)) {
        const kind = kindOf(schema);
        if (kind === undefined) throw new Error(`a string with a transform that is no known kind: ${JSON.stringify(jsonSchema)}`);
        jsonSchema.pattern = kind.pattern;
        jsonSchema.minLength = 1;
        const description = expected(schema);
        const notZero = kind === DURATION && parses(schema, '0s') === undefined ? ', greater than 0' : '';
        if (description !== undefined) jsonSchema.description = `${description}${notZero}`;
      }
      // "one or a list", "auto" or a number: say so once, above the alternatives.
      if (schema instanceof z.ZodUnion) {
        const description = expected(schema);
        if (description !== undefined) jsonSchema.description = description;
      }
      // zod leaves out the default of a transformed value (it is of the parsed type): write it as in the file.
      if (schema instanceof z.ZodDefault && !('default' in jsonSchema)) {
        const inner = schema.unwrap() as z.ZodType;
        const value: unknown = schema._zod.def.defaultValue;
        const kind = isStringPipe(inner) ? kindOf(inner) : undefined;
        if (kind?.unparse !== undefined) jsonSchema.default = kind.unparse(value);
        else if (Array.isArray(value) && value.length === 0) jsonSchema.default = [];
      }
    },
  }) as JsonSchema;
  return {
    $schema: generated.$schema,
    title: 'smartproxy configuration',
    description: 'The TOML file read by smartproxy serve and check-config. Generated by `smartproxy schema` from the schema check-config uses.',
    ...generated,
  };
}

/** The schema as the committed file holds it: two-space JSON and a final newline. */
export function configJsonSchemaText(): string {
  return `${JSON.stringify(configJsonSchema(), null, 2)}\n`;
}
