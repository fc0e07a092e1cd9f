//! Element types. f32 and bf16 are the compute types; f64 exists on the CPU for gradient checks;
//! i64 and u32 hold ids and labels.
use half::bf16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F64,
    I64,
    U32,
}

impl DType {
    pub fn size_in_bytes(&self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::BF16 => 2,
            DType::F64 | DType::I64 => 8,
        }
    }

    pub fn is_float(&self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F64)
    }

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
    const DTYPE: DType;
    fn to_f64(self) -> f64;
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
    fn from_f(v: f64) -> Self;
    fn f64(self) -> f64;
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
