// `[cluster] redis`: the address of the store, parsed into what the client needs, and the same
// address with its password replaced, the only form that may reach a log, a dump or a message.
// Pure: no I/O.
//
//   redis://[user[:password]@]host[:port][/db]     plain TCP (port 6379, db 0 by default)
//   rediss://...                                   the same over TLS
//   unix:/path/to/redis.sock[?db=N]                a unix socket (a password only from password_file)

export interface RedisTarget {
  readonly host?: string;
  readonly port?: number;
  /** Unix socket path. */
  readonly path?: string;
  readonly tls: boolean;
  readonly db: number;
  readonly username?: string;
  readonly password?: string;
}

export type ParsedRedisUrl = { readonly ok: true; readonly target: RedisTarget } | { readonly ok: false; readonly error: string };

const MAX_DB = 10_000;

/** Parses `[cluster] redis`; the error never repeats the password. */
export function parseRedisUrl(text: string): ParsedRedisUrl {
  if (text.startsWith('unix:')) {
    const [path = '', query = ''] = text.slice('unix:'.length).split('?', 2);
    if (!path.startsWith('/')) return { ok: false, error: 'the socket path must be absolute (e.g. "unix:/run/redis/redis.sock")' };
    const db = query === '' ? 0 : /^db=\d+$/.test(query) ? Number(query.slice(3)) : NaN;
    if (!Number.isInteger(db) || db > MAX_DB) return { ok: false, error: 'the only query allowed is ?db=N' };
    return { ok: true, target: { path, tls: false, db } };
  }
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    return { ok: false, error: 'not a URL such as "redis://127.0.0.1:6379/0"' };
  }
  if (url.protocol !== 'redis:' && url.protocol !== 'rediss:') return { ok: false, error: 'the scheme must be redis://, rediss:// or unix:' };
  if (url.hostname === '') return { ok: false, error: 'no host' };
  if (url.search !== '' || url.hash !== '') return { ok: false, error: 'no query or fragment is allowed' };
  const dbText = url.pathname.replace(/^\//, '');
  if (dbText !== '' && !/^\d+$/.test(dbText)) return { ok: false, error: 'the path must be a database number such as /0' };
  const db = dbText === '' ? 0 : Number(dbText);
  if (db > MAX_DB) return { ok: false, error: 'the database number is too large' };
  const host = url.hostname.startsWith('[') ? url.hostname.slice(1, -1) : url.hostname;
  return {
    ok: true,
    target: {
      host,
      port: url.port === '' ? 6379 : Number(url.port),
      tls: url.protocol === 'rediss:',
      db,
      ...(url.username !== '' ? { username: decodeURIComponent(url.username) } : {}),
      ...(url.password !== '' ? { password: decodeURIComponent(url.password) } : {}),
    },
  };
}

/** The URL with any password replaced by "redacted": what logs, dumps and messages show. */
export function redactRedisUrl(text: string): string {
  // Not through URL: it would normalise (or refuse) what the operator wrote. The user information
  // ends at the *last* "@": a password may hold "@", "/" or "#" (written raw, the URL does not even
  // parse), and a host, port, database or query never holds "@".
  const scheme = /^[A-Za-z][A-Za-z0-9+.-]*:\/\//.exec(text)?.[0];
  const at = text.lastIndexOf('@');
  if (scheme === undefined || at < scheme.length) return text;
  const userinfo = text.slice(scheme.length, at);
  const colon = userinfo.indexOf(':');
  return colon < 0 ? text : `${scheme}${userinfo.slice(0, colon)}:redacted${text.slice(at)}`;
}
