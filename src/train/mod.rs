//! Training: the learning-rate schedule of HRNet-OCR's recipe (spec section 5).

/// The poly learning rate step `step` (0-based) runs with: HRNet-OCR updates the rate after
/// each optimizer step from the index of the step just taken, so steps 0 and 1 both run at
/// `base` and step t >= 1 at `base * (1 - (t - 1) / max_iter)^power`.
pub fn poly_lr(base: f32, step: usize, max_iter: usize, power: f32) -> f32 {
    let it = step.saturating_sub(1) as f64;
    (f64::from(base) * (1.0 - it / max_iter as f64).max(0.0).powf(f64::from(power))) as f32
}

#[cfg(test)]
mod tests {
    use super::poly_lr;

    #[test]
    fn poly_schedule_starts_flat_then_decays_to_zero() {
        assert_eq!(poly_lr(0.01, 0, 10, 0.9), 0.01);
        assert_eq!(poly_lr(0.01, 1, 10, 0.9), 0.01);
        assert!((poly_lr(0.01, 2, 10, 0.9) - 0.01 * 0.9f32.powf(0.9)).abs() < 1e-9);
        assert_eq!(poly_lr(0.01, 11, 10, 0.9), 0.0);
        assert_eq!(poly_lr(0.01, 50, 10, 0.9), 0.0);
    }
}
