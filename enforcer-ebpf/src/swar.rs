//! Word-at-a-time byte arithmetic (SWAR: SIMD within a register): tests on all eight bytes of a
//! `u64` at once, without a branch per byte. The HTTP scan reads the payload eight bytes per
//! step with these; each returns the high bit of every byte that matches, exactly (no false
//! positives from borrows between bytes).

pub const ONES: u64 = 0x0101_0101_0101_0101;
const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
pub const HIGH: u64 = 0x8080_8080_8080_8080;

/// The high bit of every byte of `w` that is zero (exact: no false positives).
#[inline(always)]
pub fn zero_bytes(w: u64) -> u64 {
    !(((w & LOW7).wrapping_add(LOW7)) | w | LOW7)
}

/// The high bit of every byte of `w` equal to `c`.
#[inline(always)]
pub fn eq_bytes(w: u64, c: u8) -> u64 {
    zero_bytes(w ^ (ONES * c as u64))
}

/// The high bit of every byte of `w` below `c` (`c` ≤ 0x80; exact).
#[inline(always)]
pub fn lt_bytes(w: u64, c: u8) -> u64 {
    !(((w & LOW7).wrapping_add(ONES * (0x80 - c as u64))) | w) & HIGH
}

/// Index (0..8) of the lowest byte whose high bit is set in `m`, which is not zero.
#[inline(always)]
pub fn first_byte(mut m: u64) -> u64 {
    let mut i = 0;
    if m & 0xffff_ffff == 0 {
        i += 4;
        m >>= 32;
    }
    if m & 0xffff == 0 {
        i += 2;
        m >>= 16;
    }
    if m & 0xff == 0 {
        i += 1;
    }
    i
}

/// Bytes 0..`len` of a word (all of it from 8 up).
#[inline(always)]
pub fn low_bytes(len: u64) -> u64 {
    if len >= 8 {
        u64::MAX
    } else {
        (1u64 << ((len & 7) * 8)) - 1
    }
}
