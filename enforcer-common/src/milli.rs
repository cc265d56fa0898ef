//! Milli-tokens: the kernel's unit of budget (integers, because BPF has no floating point).
//!
//! The daemon counts tokens as `f64`; every conversion into the kernel's integers goes through
//! [`Milli`], which rounds in the direction that can only make the gate more lenient:
//!
//! - balances and refill rates round **up** ([`Milli::balance`], [`Milli::rate`]): the kernel
//!   never believes a key has less than it has;
//! - prices round **down** ([`Milli::price`]): the kernel never charges more than userspace.
//!
//! `no_std` without `libm`: the rounding is done with saturating casts (`as` saturates and
//! maps NaN to 0).

/// A number of milli-tokens (1 token = [`Milli::PER_TOKEN`] milli-tokens).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Milli(pub i64);

impl Milli {
    /// Milli-tokens per token.
    pub const PER_TOKEN: i64 = 1000;
    /// Nothing.
    pub const ZERO: Milli = Milli(0);

    /// `tokens`, rounded down (towards −∞); NaN is 0, out of range saturates.
    pub fn floor(tokens: f64) -> Milli {
        let scaled = tokens * Self::PER_TOKEN as f64;
        let t = scaled as i64;
        // `as` truncates towards 0: one less for a negative fraction.
        Milli(if (t as f64) > scaled {
            t.saturating_sub(1)
        } else {
            t
        })
    }

    /// `tokens`, rounded up (towards +∞); NaN is 0, out of range saturates.
    pub fn ceil(tokens: f64) -> Milli {
        let scaled = tokens * Self::PER_TOKEN as f64;
        let t = scaled as i64;
        Milli(if (t as f64) < scaled {
            t.saturating_add(1)
        } else {
            t
        })
    }

    /// A balance for the kernel: rounded up, so the kernel never sees less than there is.
    pub fn balance(tokens: f64) -> Milli {
        Self::ceil(tokens)
    }

    /// A price for the kernel: rounded down and at least 0 (0 never rejects), so the kernel
    /// never charges more than userspace.
    pub fn price(tokens: f64) -> u64 {
        Self::floor(tokens).0.max(0) as u64
    }

    /// A refill rate for the kernel (per second): rounded up and at least 0, like a balance.
    pub fn rate(tokens_per_sec: f64) -> u64 {
        Self::ceil(tokens_per_sec).0.max(0) as u64
    }

    /// Back to tokens.
    pub fn tokens(self) -> f64 {
        self.0 as f64 / Self::PER_TOKEN as f64
    }

    /// The raw count.
    pub fn get(self) -> i64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::Milli;

    #[test]
    fn balances_round_up_and_prices_down() {
        assert_eq!(Milli::balance(0.0005), Milli(1));
        assert_eq!(Milli::balance(1.0), Milli(1000));
        assert_eq!(Milli::balance(-0.0005), Milli(0));
        assert_eq!(Milli::balance(-0.0015), Milli(-1));
        assert_eq!(Milli::price(0.0015), 1);
        assert_eq!(Milli::price(119.9999), 119_999);
        assert_eq!(Milli::price(-3.0), 0, "a price is never negative");
        assert_eq!(Milli::floor(-0.0005), Milli(-1));
        assert_eq!(Milli::rate(0.0001), 1, "a tiny refill is not lost");
        assert_eq!(Milli(2500).tokens(), 2.5);
    }

    #[test]
    fn nan_and_huge_values_saturate() {
        assert_eq!(Milli::floor(f64::NAN), Milli(0));
        assert_eq!(Milli::ceil(f64::NAN), Milli(0));
        assert_eq!(Milli::floor(1e300), Milli(i64::MAX));
        assert_eq!(Milli::ceil(1e300), Milli(i64::MAX));
        assert_eq!(Milli::floor(-1e300), Milli(i64::MIN));
        assert_eq!(Milli::price(f64::INFINITY), i64::MAX as u64);
    }
}
