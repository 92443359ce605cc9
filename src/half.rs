//! IEEE 754 half precision on the host: f16 tensors are written from f32 data and read back
//! as f32 (`Tensor::write`, `Tensor::to_vec`), and f16 checkpoints load through the same
//! conversion.

/// Exact half to single conversion (every f16 value is representable as f32).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exponent = u32::from((h >> 10) & 0x1f);
    let mantissa = u32::from(h & 0x3ff);
    match exponent {
        0 => {
            // Zero or subnormal: mantissa * 2^-24, exact in f32.
            let magnitude = mantissa as f32 * f32::from_bits(0x3380_0000);
            if sign == 0 {
                magnitude
            } else {
                -magnitude
            }
        }
        // Infinity or NaN; the NaN payload moves to the top of the f32 mantissa.
        31 => f32::from_bits(sign | 0x7f80_0000 | mantissa << 13),
        // Normal: rebias the exponent from 15 to 127.
        _ => f32::from_bits(sign | (exponent + 112) << 23 | mantissa << 13),
    }
}

/// Single to half, rounding to nearest with ties to even as the GPU's f16() does: beyond
/// the largest half it gives infinity, below the smallest subnormal zero, a NaN stays NaN.
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let magnitude = bits & 0x7fff_ffff;
    if magnitude > 0x7f80_0000 {
        return sign | 0x7e00 | ((magnitude >> 13) & 0x3ff) as u16;
    }
    // Below 2^-14 the result is subnormal: its unit is 2^-24, so round magnitude / 2^-24.
    if magnitude < 0x3880_0000 {
        let units = f32::from_bits(magnitude) * 2f32.powi(24);
        return sign | round_half_even(units) as u16;
    }
    // Normal: drop 13 mantissa bits with round to nearest even; a carry into the exponent
    // is the right result (up to infinity).
    let rebiased = magnitude - (112 << 23);
    let kept = rebiased >> 13;
    let dropped = rebiased & 0x1fff;
    let round_up = dropped > 0x1000 || (dropped == 0x1000 && kept & 1 == 1);
    let h = kept + u32::from(round_up);
    sign | h.min(0x7c00) as u16
}

/// `v` (non-negative, below 2^11) rounded to the nearest integer, ties to even.
fn round_half_even(v: f32) -> u32 {
    let floor = v.floor();
    let rest = v - floor;
    let floor = floor as u32;
    if rest > 0.5 || (rest == 0.5 && floor & 1 == 1) {
        floor + 1
    } else {
        floor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_to_f32_is_exact() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x8000).to_bits(), 0x8000_0000);
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn every_half_survives_the_round_trip() {
        for h in 0..=u16::MAX {
            let x = f16_to_f32(h);
            if x.is_nan() {
                assert!(f16_to_f32(f32_to_f16(x)).is_nan(), "{h:#06x}");
            } else {
                assert_eq!(f32_to_f16(x), h, "{h:#06x} = {x}");
            }
        }
    }

    /// Between neighbouring halves a and b, a value rounds to the nearer, ties to the one
    /// with an even mantissa; past the largest half by half an ulp or more, to infinity.
    #[test]
    fn singles_round_to_the_nearest_half_ties_to_even() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ std::process::id() as u64;
        for h in 0..0x7bffu16 {
            let (a, b) = (f16_to_f32(h), f16_to_f32(h + 1));
            let mid = (a + b) / 2.0;
            let even = if h & 1 == 0 { h } else { h + 1 };
            assert_eq!(f32_to_f16(mid), even, "tie between {a} and {b}");
            assert_eq!(f32_to_f16(-mid), even | 0x8000, "tie between -{a} and -{b}");
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let t = (state >> 40) as f32 / (1u64 << 24) as f32;
            let x = a + (b - a) * t;
            let nearer = if x - a < b - x {
                h
            } else if x - a > b - x {
                h + 1
            } else {
                even
            };
            assert_eq!(f32_to_f16(x), nearer, "{x} between {a} and {b}");
        }
        assert_eq!(f32_to_f16(65520.0), 0x7c00);
        assert_eq!(f32_to_f16(65519.99), 0x7bff);
        assert_eq!(f32_to_f16(1e-9), 0);
        assert_eq!(f32_to_f16(f32::NEG_INFINITY), 0xfc00);
    }
}
