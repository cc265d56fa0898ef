//! The packed form of `ENFORCER.DEBIT`'s arguments: what the daemon sends and the module reads,
//! in one place so that the two cannot drift apart.
//!
//! Redis makes a string object of every argument of a command (parsed, allocated, counted,
//! freed after the call: ~500 instructions each, docs/benchmarks.md); the debit's 12 or more
//! arguments after its keys cost Redis more than the rule itself. Packed, they are one
//! argument, `<length>:<bytes>` after one another (a netstring without the comma), which the
//! module reads in place. The keys stay separate arguments: Redis Cluster routes by them and
//! ACLs check them.
//!
//! The form is named by the first argument: `<sha1 of debit.lua>` for the script's arguments
//! one by one (as `EVALSHA`), `<sha1 of debit.lua>:p` ([`PACKED`]) for them packed. A module
//! that predates the packed form refuses `…:p` as another script version, and the daemon then
//! falls back to the script, so daemon and module can still be upgraded in either order.

/// What follows the SHA-1 in the first argument when the arguments are packed.
pub const PACKED: &str = ":p";

/// `args` packed into one argument.
pub fn pack<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let size = args.iter().map(|a| a.as_ref().len() + 4).sum();
    let mut out = Vec::with_capacity(size);
    for arg in args {
        let arg = arg.as_ref();
        crate::lua::digits(arg.len() as u64, &mut out);
        out.push(b':');
        out.extend_from_slice(arg);
    }
    out
}

/// Most arguments [`unpack`] reads: far above any debit's (a few dozen, four more per tier
/// with a candidate policy), and a bound on what one call can make Redis allocate (a 512 MB
/// argument of empty fields would otherwise be a 4 GB list).
pub const MAX_ARGS: usize = 1 << 20;

/// The arguments [`pack`] packed into `packed`, borrowed from it; `None` when it is not
/// exactly a sequence of `<length>:<bytes>` (a length that is not decimal digits, longer than
/// 10 digits, or running past the end), or holds more than [`MAX_ARGS`].
pub fn unpack(packed: &[u8]) -> Option<Vec<&[u8]>> {
    let mut args = Vec::with_capacity(24);
    let mut rest = packed;
    while !rest.is_empty() {
        if args.len() == MAX_ARGS {
            return None;
        }
        let colon = rest.iter().take(11).position(|&b| b == b':')?;
        let digits = &rest[..colon];
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        // Digits only (`parse` alone would take a '+'); at most 10, so no overflow on 64 bits
        // and an error, not a wrap, on 32.
        let len: usize = std::str::from_utf8(digits).ok()?.parse().ok()?;
        let body = &rest[colon + 1..];
        if len > body.len() {
            return None;
        }
        args.push(&body[..len]);
        rest = &body[len..];
    }
    Some(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpack_gives_back_what_pack_packed() {
        let long = "x".repeat(100_000);
        let cases: [&[&str]; 5] = [
            &[],
            &[""],
            &["1", "600000", "ab12", "", "\nfree 0 1e12 1e9 0.8 8e11", "-"],
            &["12:34", ":", "0:", "with\0nul", "\r\n$3\r\n"],
            &[&long, "", &long],
        ];
        for args in cases {
            let packed = pack(args);
            let back = unpack(&packed).expect("unpacks");
            let back: Vec<&str> = back
                .iter()
                .map(|a| std::str::from_utf8(a).expect("utf-8"))
                .collect();
            assert_eq!(back, args);
        }
        assert_eq!(pack(&["ab", ""]), b"2:ab0:");
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            &b"1"[..],
            b":",
            b"1:",
            b"2:a",
            b"a:b",
            b"-1:a",
            b"+1:a",
            b" 1:a",
            b"1:a1",
            b"99999999999:",
            b"18446744073709551616:",
            b"1:a:",
        ] {
            assert_eq!(unpack(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(unpack(b""), Some(vec![]));
        let most = "0:".repeat(MAX_ARGS);
        assert_eq!(unpack(most.as_bytes()).map(|a| a.len()), Some(MAX_ARGS));
        assert_eq!(unpack(format!("{most}0:").as_bytes()), None);
        assert_eq!(unpack(b"0000000001:a"), Some(vec![&b"a"[..]]));
    }
}
