// CRC-32C (Castagnoli), the checksum of the PROXY v2 PP2_TYPE_CRC32C TLV. Table-driven, reflected
// polynomial 0x82F63B78; headers are a few hundred bytes, so a byte-at-a-time table is plenty.

const REFLECTED_POLYNOMIAL = 0x82f63b78;

const TABLE: Uint32Array = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let bit = 0; bit < 8; bit++) c = c & 1 ? (c >>> 1) ^ REFLECTED_POLYNOMIAL : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

/**
 * CRC-32C of `buf`. Pass a previous result as `initial` to continue it:
 * `crc32c(b, crc32c(a)) === crc32c(Buffer.concat([a, b]))`.
 */
export function crc32c(buf: Uint8Array, initial = 0): number {
  let crc = ~initial >>> 0;
  for (let i = 0; i < buf.length; i++) {
    crc = TABLE[(crc ^ buf[i]!) & 0xff]! ^ (crc >>> 8);
  }
  return ~crc >>> 0;
}
