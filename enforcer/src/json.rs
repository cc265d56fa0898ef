//! Hand-written JSON for the two documents every decision writes (its answer and its ledger
//! line): field names as literals, strings copied between quotes when nothing in them needs
//! escaping, numbers through `serde_json` so that they are its bytes. Each writer is checked
//! byte for byte against `serde_json` of the same value in its unit tests. Why: through serde,
//! every field name and every string went through `serde_json`'s escaper byte by byte, a tenth
//! of the daemon's instructions per decision (`cargo xtask bench daemon`, docs/benchmarks.md).
use serde::Serialize;

/// A JSON string: copied between quotes when nothing in it needs escaping, else serde's.
pub fn string(s: &str, out: &mut Vec<u8>) {
    // What serde_json escapes: control characters, '"' and '\\' (not DEL, not U+2028).
    if s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        return serde(s, out);
    }
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// A string or `null`.
pub fn opt_string(s: Option<&str>, out: &mut Vec<u8>) {
    match s {
        Some(s) => string(s, out),
        None => out.extend_from_slice(b"null"),
    }
}

/// A float as serde_json writes it (its shortest round-trip form; `null` when not finite).
pub fn number(v: f64, out: &mut Vec<u8>) {
    serde(&v, out);
}

/// A float or `null`.
pub fn opt_number(v: Option<f64>, out: &mut Vec<u8>) {
    match v {
        Some(v) => number(v, out),
        None => out.extend_from_slice(b"null"),
    }
}

/// An integer.
pub fn int(v: impl Serialize, out: &mut Vec<u8>) {
    serde(&v, out);
}

/// `true` or `false`.
pub fn boolean(v: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(if v { b"true" } else { b"false" });
}

/// A UUID as its serde form (hyphenated, lower case, quoted).
pub fn uuid(id: &uuid::Uuid, out: &mut Vec<u8>) {
    let mut buf = uuid::Uuid::encode_buffer();
    out.push(b'"');
    out.extend_from_slice(id.hyphenated().encode_lower(&mut buf).as_bytes());
    out.push(b'"');
}

/// A value through serde_json (plain data: it cannot fail; were it to, the document would be
/// unreadable and the writers' tests catch it).
pub fn serde<T: Serialize + ?Sized>(v: &T, out: &mut Vec<u8>) {
    let _ = serde_json::to_writer(out, v);
}
