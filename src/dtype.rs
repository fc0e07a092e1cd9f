//! Element types. f32 and bf16 are the compute types; f64 exists on the CPU for gradient checks;
//! i64 and u32 hold ids and labels.
use half::bf16;

/// The element type of a tensor's storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float: the reference compute type (and the only one the fused CUDA AdamW takes).
    F32,
    /// bfloat16 (`half::bf16`): 8 exponent bits, 7 mantissa bits; the CUDA training and serving
    /// type. The CPU backend computes it in f32 and rounds on store.
    BF16,
    /// 64-bit float; CPU only (CUDA storage refuses it), for gradient checks.
    F64,
    /// 64-bit signed integer: token ids, class ids and labels; also what id checks return.
    I64,
    /// 32-bit unsigned integer; accepted wherever ids are (token ids, class ids), like I64.
    U32,
}

impl DType {
    /// Bytes one element takes: 2 for bf16, 4 for f32 and u32, 8 for f64 and i64.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::BF16 => 2,
            DType::F64 | DType::I64 => 8,
        }
    }

    /// True for F32, BF16 and F64; false for the integer types.
    pub fn is_float(&self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F64)
    }

    /// The lower-case name (`"f32"`, `"bf16"`, `"f64"`, `"i64"`, `"u32"`), as `Display` prints it.
    pub fn as_str(&self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            DType::I64 => "i64",
            DType::U32 => "u32",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Rust type that can be the element of a tensor.
pub trait WithDType: Copy + Send + Sync + 'static + std::fmt::Debug + PartialEq {
    /// The [`DType`] tag of this Rust type.
    const DTYPE: DType;
    /// Converts to f64 (exact for every type except i64 values beyond 2⁵³).
    fn to_f64(self) -> f64;
    /// Converts from f64 with Rust's `as` semantics: rounding to nearest for the floats,
    /// truncation toward zero and saturation at the range for the integers (NaN becomes 0).
    fn from_f64(v: f64) -> Self;
}

macro_rules! with_dtype {
    ($t:ty, $d:ident, $to:expr, $from:expr) => {
        impl WithDType for $t {
            const DTYPE: DType = DType::$d;
            #[inline]
            fn to_f64(self) -> f64 {
                $to(self)
            }
            #[inline]
            fn from_f64(v: f64) -> Self {
                $from(v)
            }
        }
    };
}
with_dtype!(f32, F32, |v: f32| v as f64, |v: f64| v as f32);
with_dtype!(f64, F64, |v: f64| v, |v: f64| v);
with_dtype!(bf16, BF16, |v: bf16| v.to_f64(), bf16::from_f64);
with_dtype!(i64, I64, |v: i64| v as f64, |v: f64| v as i64);
with_dtype!(u32, U32, |v: u32| v as f64, |v: f64| v as u32);

/// The float types the CPU kernels are generic over (bf16 is computed in f32 on the CPU).
pub trait Float:
    num_traits::Float
    + num_traits::FromPrimitive
    + std::iter::Sum
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + Send
    + Sync
    + Default
    + std::fmt::Debug
    + 'static
{
    /// Converts from f64, rounding to nearest for f32.
    fn from_f(v: f64) -> Self;
    /// Widens to f64 (exact).
    fn f64(self) -> f64;

    /// `row[i] = exp(row[i] − shift)` in place; returns the sum. The softmax inner loop.
    fn exp_shift_sum(row: &mut [Self], shift: Self) -> Self {
        let mut s = Self::zero();
        for v in row.iter_mut() {
            *v = (*v - shift).exp();
            s += *v;
        }
        s
    }
}

/// exp for f32 in a form the compiler vectorizes: Cody–Waite reduction by ln 2 and a degree-5
/// polynomial (≤ 2 ulp against `f32::exp` on [-87, 88], tested); exact 0 below −87.3 (−∞ too).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = x.clamp(-87.3, 88.7);
    // Round to nearest with the 1.5·2²³ trick (`f32::round` is a libm call without SSE4.1);
    // the integer n is then read straight from t's mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // e^r on |r| ≤ ln2/2: Cephes' expf minimax polynomial.
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let p = p * r * r + r + 1.0;
    let ni = t.to_bits().wrapping_sub(0x4b40_0000);
    let scale = f32::from_bits(ni.wrapping_add(127) << 23);
    // Branch-free select of 0 below the range (keeps the loop vectorized).
    let keep = ((x >= -87.3) as u32).wrapping_neg();
    f32::from_bits((p * scale).to_bits() & keep)
}

impl Float for f32 {
    #[inline]
    fn from_f(v: f64) -> Self {
        v as f32
    }
    #[inline]
    fn f64(self) -> f64 {
        self as f64
    }
    fn exp_shift_sum(row: &mut [f32], shift: f32) -> f32 {
        // Lane-wise partial sums keep the loop vectorized and the result order-fixed.
        let mut acc = [0f32; 8];
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            for (v, a) in c.iter_mut().zip(acc.iter_mut()) {
                *v = exp_f32(*v - shift);
                *a += *v;
            }
        }
        let mut s: f32 = acc.iter().sum();
        for v in chunks.into_remainder() {
            *v = exp_f32(*v - shift);
            s += *v;
        }
        s
    }
}

impl Float for f64 {
    #[inline]
    fn from_f(v: f64) -> Self {
        v
    }
    #[inline]
    fn f64(self) -> f64 {
        self
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_f32_is_within_2_ulp() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (super::exp_f32(x), x.exp());
            worst = worst.max((a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32);
            x += 0.000_37;
        }
        assert!(worst <= 2, "worst ulp error {worst}");
        assert_eq!(super::exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp_f32(-100.0), 0.0);
        assert_eq!(super::exp_f32(0.0), 1.0);
    }
}
