//! What `lua/debit.lua` gets from Lua 5.1 and Redis, reproduced byte for byte: `tonumber` on a
//! string (C `strtod`, hex integers, surrounding spaces), `string.format('%.17g')`, the
//! `^(%S+) (%S+)$`-style field patterns and `gmatch('[^|]+')` splits. The module's answers and
//! stored values must be the script's, or a Redis running the module and a Redis running the
//! script would disagree about the same bucket.

/// Lua 5.1 `tonumber(s)` of a string (`luaO_str2d`): `strtod`, then a hex integer when `strtod`
/// stopped at an `x`; trailing spaces allowed; `None` for anything else. Like Lua, the text ends
/// at a NUL byte.
pub fn tonumber(s: &[u8]) -> Option<f64> {
    if let Some(v) = short_decimal(s) {
        return Some(v);
    }
    // Plain decimals (everything the daemon sends and the scripts store) through Rust's parser:
    // correctly rounded like glibc's strtod, so the same double, for a fifth of the work.
    if is_plain_decimal(s) {
        // The check above leaves only ASCII digits, '-', '.', 'e', 'E', '+'.
        return std::str::from_utf8(s).ok()?.parse().ok();
    }
    strtod_lua(s)
}

/// Powers of ten a double holds exactly.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// `-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?` with at most 15 digits before the exponent, whose
/// scale is at most 10^±22: the text the daemon sends and the scripts store, by far (counts,
/// times, balances, `1e12`). Its digits are an integer below 2^53 and its scale an exact power
/// of ten, so one IEEE multiplication or division gives the correctly rounded value, as
/// `strtod` does (Clinger's fast path). `None`: the general path decides.
fn short_decimal(s: &[u8]) -> Option<f64> {
    let (neg, text) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    let (mut m, mut digits, mut frac, mut dot) = (0u64, 0usize, 0i32, false);
    let mut at = 0;
    while at < text.len() {
        match text[at] {
            b @ b'0'..=b'9' => {
                m = m * 10 + u64::from(b - b'0');
                digits += 1;
                if digits > 15 {
                    return None;
                }
                frac += i32::from(dot);
            }
            // A dot between digits, once.
            b'.' if !dot && at > 0 && text.get(at + 1).is_some_and(u8::is_ascii_digit) => {
                dot = true;
            }
            b'e' | b'E' if digits > 0 => break,
            _ => return None,
        }
        at += 1;
    }
    if digits == 0 {
        return None;
    }
    let mut exp = 0i32;
    if at < text.len() {
        let e = &text[at + 1..];
        let (sign, e) = match e.split_first() {
            Some((b'-', rest)) => (-1, rest),
            Some((b'+', rest)) => (1, rest),
            _ => (1, e),
        };
        if e.is_empty() || e.len() > 3 || !e.iter().all(u8::is_ascii_digit) {
            return None;
        }
        exp = sign * e.iter().fold(0, |n, &d| n * 10 + i32::from(d - b'0'));
    }
    let scale = exp - frac;
    let v = match usize::try_from(scale.unsigned_abs()).ok()? {
        p if p > 22 => return None,
        p if scale < 0 => m as f64 / POW10[p],
        p => m as f64 * POW10[p],
    };
    Some(if neg { -v } else { v })
}

/// `-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?`, at most 40 bytes: text both parsers read alike.
fn is_plain_decimal(s: &[u8]) -> bool {
    if s.len() > 40 {
        return false;
    }
    let digits = |s: &[u8]| s.iter().take_while(|b| b.is_ascii_digit()).count();
    let mut rest = s.strip_prefix(b"-").unwrap_or(s);
    let n = digits(rest);
    if n == 0 {
        return false;
    }
    rest = &rest[n..];
    if let Some(frac) = rest.strip_prefix(b".") {
        let n = digits(frac);
        if n == 0 {
            return false;
        }
        rest = &frac[n..];
    }
    if let Some(exp) = rest.strip_prefix(b"e").or_else(|| rest.strip_prefix(b"E")) {
        let exp = exp
            .strip_prefix(b"-")
            .or_else(|| exp.strip_prefix(b"+"))
            .unwrap_or(exp);
        let n = digits(exp);
        return n > 0 && n == exp.len();
    }
    rest.is_empty()
}

/// Lua 5.1's `luaO_str2d`, by C `strtod`/`strtoul`: hex, spaces, `inf`, `nan` and the rest.
fn strtod_lua(s: &[u8]) -> Option<f64> {
    let mut stack = [0u8; 64];
    let mut heap = Vec::new();
    let buf: &mut [u8] = if s.len() < stack.len() {
        stack[..s.len()].copy_from_slice(s);
        &mut stack[..=s.len()]
    } else {
        heap.extend_from_slice(s);
        heap.push(0);
        &mut heap
    };
    let start = buf.as_ptr().cast::<libc::c_char>();
    let mut end: *mut libc::c_char = std::ptr::null_mut();
    // SAFETY: `buf` is NUL-terminated and outlives both calls; `end` points into it.
    let mut v = unsafe { libc::strtod(start, &mut end) };
    if end.cast_const() == start {
        return None;
    }
    // SAFETY: `end` points at a byte of `buf` (at worst its NUL).
    let mut at = unsafe { end.offset_from(start) } as usize;
    if matches!(buf[at], b'x' | b'X') {
        // SAFETY: as above.
        v = unsafe { libc::strtoul(start, &mut end, 16) } as f64;
        // SAFETY: as above.
        at = unsafe { end.offset_from(start) } as usize;
    }
    while buf[at] != 0 && is_space(buf[at]) {
        at += 1;
    }
    (buf[at] == 0).then_some(v)
}

/// C `isspace` in the C locale (Lua's `%s`).
pub fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// The decimal digits of `n`, appended to `out`.
pub fn digits(mut n: u64, out: &mut Vec<u8>) {
    let mut buf = [0u8; 20];
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[at..]);
}

/// `string.format('%.17g', x)`: every stored and answered number, so that it reads back as the
/// same double. Integers by hand, other finite numbers from Rust's exact `{:.16e}` (17
/// significant digits, ties to even as glibc's printf) laid out as `%g` does; C's `snprintf`
/// only for infinities and NaN.
pub fn fmt(x: f64, out: &mut Vec<u8>) {
    if x.fract() == 0.0 && x.abs() < 1e17 && !(x == 0.0 && x.is_sign_negative()) {
        // %.17g of an integer below 10^17 is its digits.
        if x < 0.0 {
            out.push(b'-');
        }
        digits((x as i64).unsigned_abs(), out);
        return;
    }
    if !x.is_finite() {
        return fmt_c(x, out);
    }
    let e = format!("{x:.16e}");
    let (mantissa, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let Ok(exp) = exp.parse::<i32>() else {
        return fmt_c(x, out);
    };
    let (neg, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    // The 17 significant digits.
    let d: Vec<u8> = mantissa.bytes().filter(u8::is_ascii_digit).collect();
    if neg {
        out.push(b'-');
    }
    let trim =
        |frac: &[u8]| -> usize { frac.iter().rposition(|&b| b != b'0').map_or(0, |i| i + 1) };
    if (-4..17).contains(&exp) {
        if exp >= 0 {
            let int = exp as usize + 1;
            out.extend_from_slice(&d[..int]);
            let frac = &d[int..];
            let keep = trim(frac);
            if keep > 0 {
                out.push(b'.');
                out.extend_from_slice(&frac[..keep]);
            }
        } else {
            out.extend_from_slice(b"0.");
            out.extend(std::iter::repeat_n(b'0', (-exp - 1) as usize));
            out.extend_from_slice(&d[..trim(&d)]);
        }
    } else {
        out.push(d[0]);
        let keep = trim(&d[1..]);
        if keep > 0 {
            out.push(b'.');
            out.extend_from_slice(&d[1..1 + keep]);
        }
        out.push(b'e');
        out.push(if exp < 0 { b'-' } else { b'+' });
        let abs = exp.unsigned_abs();
        if abs < 10 {
            out.push(b'0');
        }
        out.extend_from_slice(abs.to_string().as_bytes());
    }
}

/// `%.17g` by C's `snprintf`.
fn fmt_c(x: f64, out: &mut Vec<u8>) {
    let mut buf = [0u8; 40];
    // SAFETY: the format takes one double; snprintf writes at most `buf.len()` bytes, NUL included.
    let n = unsafe { libc::snprintf(buf.as_mut_ptr().cast(), buf.len(), c"%.17g".as_ptr(), x) };
    let n = usize::try_from(n).unwrap_or(0).min(buf.len() - 1);
    out.extend_from_slice(&buf[..n]);
}

/// [`fmt`] into a new buffer.
pub fn fmt_owned(x: f64) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    fmt(x, &mut v);
    v
}

/// `string.match(s, '^(%S+) (%S+)$')` (and the wallet's five-field form): exactly `N` runs of
/// non-space bytes, one `' '` between each two.
pub fn fields<const N: usize>(s: &[u8]) -> Option<[&[u8]; N]> {
    let mut out: [&[u8]; N] = [&[]; N];
    let mut rest = s;
    for (i, slot) in out.iter_mut().enumerate() {
        let len = rest.iter().position(|&b| is_space(b)).unwrap_or(rest.len());
        if len == 0 {
            return None;
        }
        *slot = &rest[..len];
        rest = &rest[len..];
        if i + 1 < N {
            // One plain space, then the next field.
            if rest.first() != Some(&b' ') {
                return None;
            }
            rest = &rest[1..];
        }
    }
    rest.is_empty().then_some(out)
}

/// `string.gmatch(s, '[^<sep>]+')`: the non-empty runs between separators.
pub fn split(s: &[u8], sep: u8) -> impl Iterator<Item = &[u8]> {
    s.split(move |&b| b == sep).filter(|p| !p.is_empty())
}

/// `math.ceil(x)` as the integer Redis makes of a Lua number (a C cast; saturating here).
pub fn ceil_int(x: f64) -> i64 {
    x.ceil() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tonumber_is_lua_51s() {
        for (s, v) in [
            ("1", Some(1.0)),
            (" 1 ", Some(1.0)),
            ("1e3", Some(1000.0)),
            ("0x10", Some(16.0)),
            ("1.5", Some(1.5)),
            ("-2", Some(-2.0)),
            ("", None),
            ("abc", None),
            ("1 2", None),
            ("1\0junk", Some(1.0)),
        ] {
            assert_eq!(tonumber(s.as_bytes()), v, "{s:?}");
        }
        assert!(tonumber(b"nan").is_some_and(f64::is_nan));
        assert_eq!(tonumber(b"inf"), Some(f64::INFINITY));
        let long = format!("{}1", "0".repeat(100));
        assert_eq!(tonumber(long.as_bytes()), Some(1.0));
    }

    /// A deterministic pseudo-random stream (xorshift64) from `state`.
    fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    /// A deterministic stream of doubles: random bit patterns, decimals the daemon writes,
    /// integers, exact ties at the 17th digit and the powers of ten around %g's switch points.
    fn doubles() -> Vec<f64> {
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        let mut v = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.1,
            1e16,
            1e17,
            9.999_999_999_999_999e16,
            1e-4,
            1e-5,
            0.000_123,
            1_234_567_890_123_456.2,
            1_234_567_890_123_457.2,
            5e-324,
            f64::MAX,
            f64::MIN_POSITIVE,
            1_700_000_000.123_456,
        ];
        for _ in 0..50_000 {
            let bits = next();
            let x = f64::from_bits(bits);
            if x.is_finite() {
                v.push(x);
            }
            let scale = 10f64.powi((next() % 40) as i32 - 20);
            v.push((next() % 1_000_000_000) as f64 * scale);
            v.push((next() % (1 << 53)) as f64 / 4.0);
        }
        v
    }

    #[test]
    fn numbers_are_written_as_c_percent_17g() {
        for x in doubles() {
            let (mut ours, mut c) = (Vec::new(), Vec::new());
            fmt(x, &mut ours);
            fmt_c(x, &mut c);
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&c),
                "{x:e}"
            );
        }
        assert_eq!(fmt_owned(0.1), b"0.10000000000000001");
        assert_eq!(fmt_owned(1e20), b"1e+20");
        assert_eq!(fmt_owned(100.0), b"100");
    }

    #[test]
    fn plain_decimals_parse_as_strtod_does() {
        for x in doubles() {
            for text in [
                fmt_owned(x),
                format!("{x}").into_bytes(),
                format!("{x:e}").into_bytes(),
            ] {
                assert_eq!(
                    tonumber(&text).map(f64::to_bits),
                    strtod_lua(&text).map(f64::to_bits),
                    "{}",
                    String::from_utf8_lossy(&text)
                );
            }
        }
        for s in ["1.", ".5", "+1", "1e", "-", "1e+", "0x1p3", "1_0"] {
            assert!(!is_plain_decimal(s.as_bytes()), "{s}");
        }
    }

    #[test]
    fn short_decimals_parse_as_strtod_does() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        let mut fast = 0;
        for _ in 0..200_000 {
            let len = 1 + (next() % 17) as usize;
            let mut text: Vec<u8> = (0..len).map(|_| b'0' + (next() % 10) as u8).collect();
            if !next().is_multiple_of(4) {
                let at = (next() % (len as u64 + 1)) as usize;
                text.insert(at, b'.');
            }
            if next().is_multiple_of(3) {
                text.insert(0, b'-');
            }
            if next().is_multiple_of(3) {
                let e = format!("e{}{}", ["", "+", "-"][(next() % 3) as usize], next() % 30);
                text.extend_from_slice(e.as_bytes());
            }
            fast += usize::from(short_decimal(&text).is_some());
            assert_eq!(
                tonumber(&text).map(f64::to_bits),
                strtod_lua(&text).map(f64::to_bits),
                "{}",
                String::from_utf8_lossy(&text)
            );
        }
        // Most of them took the fast path; the rest (16 digits or more, a dot at either end)
        // the general one.
        assert!(fast > 100_000, "{fast}");
        for s in [
            "1.",
            ".5",
            "-",
            "",
            "1.2.3",
            "--1",
            "1234567890123456",
            "1 ",
            "1e",
            "1e+",
            "e5",
            "1e1000",
            "1e23",
            "1.e5",
            "0x10",
        ] {
            assert_eq!(short_decimal(s.as_bytes()), None, "{s}");
        }
        assert_eq!(
            short_decimal(b"-0").map(f64::to_bits),
            Some((-0.0f64).to_bits())
        );
    }

    #[test]
    fn fields_match_the_scripts_patterns() {
        assert_eq!(fields::<2>(b"1.5 17"), Some([&b"1.5"[..], b"17"]));
        for bad in [
            &b"1.5  17"[..],
            b" 1 2",
            b"1 2 ",
            b"1",
            b"1\t2",
            b"1 2 3",
            b"",
        ] {
            assert_eq!(fields::<2>(bad), None, "{bad:?}");
        }
        assert!(fields::<5>(b"0 - 1 5 g1").is_some());
        let parts: Vec<&[u8]> = split(b"a||b|", b'|').collect();
        assert_eq!(parts, [&b"a"[..], b"b"]);
    }
}
