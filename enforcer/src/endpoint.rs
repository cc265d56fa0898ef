//! Endpoints in normal form: the one spelling of a request path that is priced, answered and
//! recorded.
//!
//! Upstream routers normalise paths before they route them (Envoy's `normalize_path` and
//! `merge_slashes`, nginx's `merge_slashes`), so `/generate-report/`, `//generate-report`,
//! `/%67enerate-report` and `/x/../generate-report` all reach the same handler. Pricing the raw
//! string would make every such spelling a way around the price. [`Endpoint::parse`] applies the
//! RFC 3986 §6 normalisations Envoy applies, in one pass, before anything is priced:
//!
//! 1. the query (`?…`) and fragment (`#…`) are dropped;
//! 2. percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, every other
//!    percent-encoding is kept with upper-case hex (`%2f` → `%2F`: an encoded slash is not a
//!    separator, as in Envoy; it is never decoded);
//! 3. `\` is a separator like `/` (Envoy's path canonicaliser treats it so);
//! 4. characters a path may not carry raw (space, `"`, `<`, `>`, `^`, `` ` ``, `{`, `|`, `}`,
//!    non-ASCII) are percent-encoded (UTF-8 bytes), so `/a b` and `/a%20b` are one endpoint;
//! 5. repeated slashes are merged, `.` and `..` segments resolved (`..` at the root stays there);
//! 6. a trailing slash is dropped ([`TrailingSlash::Strip`], the default) or kept; `/` stays `/`.
//!
//! Refused, with a clear error and before anything is debited: control characters anywhere
//! (raw, or percent-encoded as `%00`–`%1F` / `%7F`), a `%` not followed by two hex digits, a
//! path that does not start with `/`, and inputs too long (see [`MAX_RAW_LEN`],
//! [`MAX_ENDPOINT_LEN`]). The normal form is printable ASCII without spaces, so it is safe in
//! audit rows, logs and header values.
use serde::Deserialize;
use std::fmt;

/// Longest endpoint accepted as given (path, query and fragment), bytes.
pub const MAX_RAW_LEN: usize = 8192;
/// Longest endpoint in normal form, bytes.
pub const MAX_ENDPOINT_LEN: usize = 2048;

/// What a trailing slash means (`[pricing] trailing_slash`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrailingSlash {
    /// `/a/` is `/a` (most routers serve both alike).
    #[default]
    Strip,
    /// `/a/` and `/a` are different endpoints.
    Keep,
}

/// Why an endpoint was refused.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    /// Empty, or not starting with `/`.
    #[error("endpoint must be a path starting with /")]
    NotAbsolute,
    /// Longer than [`MAX_RAW_LEN`] as given, or [`MAX_ENDPOINT_LEN`] in normal form.
    #[error(
        "endpoint must be at most {MAX_RAW_LEN} bytes, and at most {MAX_ENDPOINT_LEN} in normal form"
    )]
    TooLong,
    /// A control character, raw or percent-encoded.
    #[error("endpoint contains a control character (raw, or percent-encoded as %00-%1F or %7F)")]
    ControlCharacter,
    /// A `%` that does not start a two-hex-digit escape.
    #[error("endpoint contains a % that is not followed by two hex digits")]
    BadPercentEncoding,
}

/// A request path in normal form (see the module docs). Only [`Endpoint::parse`] makes one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint(String);

impl Endpoint {
    /// Normalises `raw` (a request target: path, optionally a query and a fragment).
    pub fn parse(raw: &str, trailing: TrailingSlash) -> Result<Self, EndpointError> {
        if raw.len() > MAX_RAW_LEN {
            return Err(EndpointError::TooLong);
        }
        // Anywhere, the query included: control characters never enter a decision.
        if raw.chars().any(char::is_control) {
            return Err(EndpointError::ControlCharacter);
        }
        let path = raw.split(['?', '#']).next().unwrap_or_default();
        if !path.starts_with('/') {
            return Err(EndpointError::NotAbsolute);
        }
        // `out` always ends with '/' between segments; a segment is decoded onto its end and
        // then kept, dropped (`.`, empty) or dropped with its parent (`..`). The work is bounded
        // by MAX_RAW_LEN (a segment grows at most threefold); the result's length is checked
        // once at the end, since `..` can shorten what came before.
        let mut out = String::with_capacity(path.len());
        out.push('/');
        let mut ends_in_directory = false;
        for segment in path[1..].split(['/', '\\']) {
            let start = out.len();
            decode_segment(segment, &mut out)?;
            match &out[start..] {
                "" => ends_in_directory = true,
                "." => {
                    out.truncate(start);
                    ends_in_directory = true;
                }
                ".." => {
                    out.truncate(start);
                    if out.len() > 1 {
                        let parent = out[..out.len() - 1].rfind('/').unwrap_or(0);
                        out.truncate(parent + 1);
                    }
                    ends_in_directory = true;
                }
                _ => {
                    out.push('/');
                    ends_in_directory = false;
                }
            }
        }
        if out.len() > 1 && !(ends_in_directory && trailing == TrailingSlash::Keep) {
            out.pop();
        }
        if out.len() > MAX_ENDPOINT_LEN {
            return Err(EndpointError::TooLong);
        }
        Ok(Self(out))
    }

    /// The normal form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<Endpoint> for String {
    fn from(e: Endpoint) -> Self {
        e.0
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `path` is already in normal form under `trailing` (configured paths must be).
pub fn is_normal(path: &str, trailing: TrailingSlash) -> bool {
    Endpoint::parse(path, trailing).is_ok_and(|e| e.0 == path)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Characters Envoy's canonicaliser percent-encodes when they appear raw in a path.
fn must_be_encoded(b: u8) -> bool {
    !b.is_ascii()
        || matches!(
            b,
            b' ' | b'"' | b'<' | b'>' | b'^' | b'`' | b'{' | b'|' | b'}'
        )
}

fn push_encoded(b: u8, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0x0f)]));
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// Appends one segment (no separators in it) in normal form.
fn decode_segment(segment: &str, out: &mut String) -> Result<(), EndpointError> {
    let bytes = segment.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(EndpointError::BadPercentEncoding);
            };
            let v = hi << 4 | lo;
            if v.is_ascii_control() {
                return Err(EndpointError::ControlCharacter);
            }
            if is_unreserved(v) {
                out.push(char::from(v));
            } else {
                push_encoded(v, out);
            }
            i += 3;
        } else {
            if must_be_encoded(b) {
                push_encoded(b, out);
            } else {
                out.push(char::from(b));
            }
            i += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use TrailingSlash::{Keep, Strip};

    fn norm(raw: &str, t: TrailingSlash) -> Result<String, EndpointError> {
        Endpoint::parse(raw, t).map(String::from)
    }

    #[test]
    fn every_spelling_of_a_path_has_one_normal_form() {
        let cases: &[(&str, &str)] = &[
            ("/generate-report", "/generate-report"),
            ("/generate-report/", "/generate-report"),
            ("//generate-report", "/generate-report"),
            ("/generate-report//", "/generate-report"),
            ("///generate-report///", "/generate-report"),
            ("/%67enerate-report", "/generate-report"),
            ("/%67ENERATE%2dREPORT", "/gENERATE-REPORT"),
            ("/./generate-report", "/generate-report"),
            ("/generate-report/.", "/generate-report"),
            ("/generate-report/./", "/generate-report"),
            ("/cheap/../generate-report", "/generate-report"),
            ("/a/b/../../generate-report", "/generate-report"),
            ("/../generate-report", "/generate-report"),
            ("/../../../generate-report", "/generate-report"),
            ("/%2e%2e/generate-report", "/generate-report"),
            ("/x/%2E%2e/generate-report", "/generate-report"),
            ("/x/.%2e/generate-report", "/generate-report"),
            ("/x\\..\\generate-report", "/generate-report"),
            ("/generate-report?format=pdf", "/generate-report"),
            ("/generate-report#part", "/generate-report"),
            ("/generate-report/?a=/../b", "/generate-report"),
            ("/generate-report?x#y", "/generate-report"),
            ("/", "/"),
            ("//", "/"),
            ("/.", "/"),
            ("/..", "/"),
            ("/./..//.", "/"),
            ("/?q", "/"),
            ("/a/b/..", "/a"),
            ("/a/b/.", "/a/b"),
            // Not dot segments: dots inside a name.
            ("/.well-known/x", "/.well-known/x"),
            ("/a/..b/c.", "/a/..b/c."),
            ("/a/.../b", "/a/.../b"),
            // Encoded slashes (and backslashes) are data, not separators: never decoded.
            ("/a%2Fb", "/a%2Fb"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2f..%2Fb", "/a%2F..%2Fb"),
            ("/a%5c..", "/a%5C.."),
            // Reserved and other characters stay encoded, with upper-case hex.
            ("/a%3ab%3D", "/a%3Ab%3D"),
            ("/%25", "/%25"),
            ("/%252e%252e", "/%252e%252e"),
            ("/a%7e%41%7A%30%5f", "/a~Az0_"),
            // Characters a path may not carry raw are encoded.
            ("/a b", "/a%20b"),
            ("/a%20b", "/a%20b"),
            ("/{x}|\"<>^`", "/%7Bx%7D%7C%22%3C%3E%5E%60"),
            ("/café", "/caf%C3%A9"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            // Sub-delimiters, ':' and '@' are kept as they are.
            ("/a:b@c!$&'()*+,;=", "/a:b@c!$&'()*+,;="),
        ];
        for (raw, want) in cases {
            assert_eq!(norm(raw, Strip).as_deref(), Ok(*want), "{raw:?}");
        }
    }

    #[test]
    fn a_kept_trailing_slash_is_its_own_endpoint() {
        for (raw, want) in [
            ("/generate-report/", "/generate-report/"),
            ("/generate-report//", "/generate-report/"),
            ("/generate-report/.", "/generate-report/"),
            ("/a/b/..", "/a/"),
            ("/a/..", "/"),
            ("/generate-report", "/generate-report"),
            ("/", "/"),
            ("//", "/"),
        ] {
            assert_eq!(norm(raw, Keep).as_deref(), Ok(want), "{raw:?}");
        }
    }

    #[test]
    fn bad_endpoints_are_refused() {
        use EndpointError::*;
        let cases: &[(&str, EndpointError)] = &[
            ("", NotAbsolute),
            ("generate-report", NotAbsolute),
            ("?/x", NotAbsolute),
            ("\\generate-report", NotAbsolute),
            ("http://host/x", NotAbsolute),
            ("/a\u{0}b", ControlCharacter),
            ("/a\u{7}", ControlCharacter),
            ("/a\tb", ControlCharacter),
            ("/a\r\nx-api-key: k", ControlCharacter),
            ("/a\u{7f}", ControlCharacter),
            ("/a\u{85}", ControlCharacter),
            ("/a?q=\u{0}", ControlCharacter),
            ("/a%00", ControlCharacter),
            ("/a%0a", ControlCharacter),
            ("/a%1F", ControlCharacter),
            ("/a%7f", ControlCharacter),
            ("/a%zz", BadPercentEncoding),
            ("/a%4", BadPercentEncoding),
            ("/a%", BadPercentEncoding),
            ("/a%%34%31", BadPercentEncoding),
            ("/a%g0", BadPercentEncoding),
        ];
        for (raw, want) in cases {
            assert_eq!(norm(raw, Strip), Err(*want), "{raw:?}");
        }
    }

    #[test]
    fn lengths_are_bounded_as_given_and_in_normal_form() {
        // Decoding shrinks: 3 bytes per character as given, 1 in normal form.
        let encoded = |n: usize| format!("/{}", "%61".repeat(n));
        let ok = norm(&encoded(MAX_ENDPOINT_LEN - 1), Strip).expect("2048 in normal form");
        assert_eq!(ok.len(), MAX_ENDPOINT_LEN);
        assert_eq!(
            norm(&encoded(MAX_ENDPOINT_LEN), Strip),
            Err(EndpointError::TooLong)
        );
        // Dot segments can make a long input short; the input itself is still bounded.
        let dots = format!("{}/x", "/a/..".repeat(1000));
        assert_eq!(norm(&dots, Strip).as_deref(), Ok("/x"));
        let huge = format!("/x?{}", "q".repeat(MAX_RAW_LEN));
        assert_eq!(norm(&huge, Strip), Err(EndpointError::TooLong));
        // Encoding grows: raw characters that must be encoded count three times.
        let spaces = format!("/{}", " ".repeat(MAX_ENDPOINT_LEN / 3 + 1));
        assert_eq!(norm(&spaces, Strip), Err(EndpointError::TooLong));
    }

    #[test]
    fn normal_forms_are_fixed_points() {
        for raw in [
            "/generate-report/",
            "//a/./b/../c/%7e%2f",
            "/x y/{z}",
            "/a/b/..",
        ] {
            for t in [Strip, Keep] {
                let once = norm(raw, t).expect("valid");
                assert_eq!(norm(&once, t).as_deref(), Ok(once.as_str()), "{raw:?}");
                assert!(is_normal(&once, t));
            }
        }
        assert!(!is_normal("/a/", Strip));
        assert!(is_normal("/a/", Keep));
        assert!(!is_normal("/a%2f", Keep));
        assert!(!is_normal("/a?q", Keep));
    }
}
