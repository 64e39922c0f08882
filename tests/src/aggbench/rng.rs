//! The benchmark's pseudo-random numbers and the few distributions the traffic needs.
//!
//! `tests::fixtures::Lcg` draws integers only; realistic token counts and latencies need
//! uniform floats and log-normal draws, hence this small generator of the benchmark's own.

/// SplitMix64: tiny and fast, and the same seed gives the same events on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[0, n)`.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit(); // in (0, 1], so the logarithm is finite
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Log-normal with the given median; `sigma` is the spread of the underlying normal.
    pub fn log_normal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }

    /// A log-normal count, rounded and clamped to `[min, max]`.
    pub fn count(&mut self, median: f64, sigma: f64, min: u64, max: u64) -> u64 {
        (self.log_normal(median, sigma).round() as u64).clamp(min, max)
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn draws_stay_in_range_and_log_normal_centres_on_its_median() {
        let mut rng = Rng::new(3);
        let mut below_median = 0;
        for _ in 0..10_000 {
            let u = rng.unit();
            assert!((0.0..1.0).contains(&u));
            assert!(rng.below(7) < 7);
            below_median += u32::from(rng.log_normal(100.0, 1.0) < 100.0);
        }
        assert!((4_700..5_300).contains(&below_median), "{below_median}");
    }
}
