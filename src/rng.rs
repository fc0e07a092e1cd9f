//! Deterministic randomness. Dropout masks come from a counter-based hash of (seed, element
//! index), so the CUDA kernels can regenerate the same mask from the seed alone, in any order,
//! and backward needs no saved mask.

/// SplitMix64 finalizer: a bijective 64-bit mix.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Uniform in [0, 1) for element `idx` of the stream `seed` (24 bits, exact in f32).
#[inline]
pub fn uniform_at(seed: u64, idx: u64) -> f32 {
    let h = mix64(seed ^ idx.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    (h >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// Whether element `idx` is kept by dropout with drop probability `p`.
#[inline]
pub fn dropout_keep(seed: u64, idx: u64, p: f32) -> bool {
    uniform_at(seed, idx) >= p
}

/// A small sequential generator (SplitMix64) for initialisation and tests.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator whose stream is fixed by `seed` (the same seed gives the same numbers).
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// The internal counter; [`Rng::from_state`] with it resumes the stream exactly (checkpoints
    /// save it).
    pub fn state(&self) -> u64 {
        self.state
    }

    /// A generator that continues from a saved `state()`.
    pub fn from_state(state: u64) -> Self {
        Rng { state }
    }

    /// Advances the counter by the golden-ratio increment and returns its SplitMix64 mix.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.state)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Uniform index in `0..n` (from one `uniform()` draw; returns 0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }
}
