//! A procedural scene dataset: objects of several classes with distinct shapes, textures
//! and colours, overlapping, on cluttered backgrounds. Deterministic by (seed, index), any
//! image size; needs no files.

use super::image::Image;
use super::{Dataset, Scene, SplitMix};
use crate::error::Result;

/// The classes, in label order.
pub const CLASSES: [&str; 5] = ["background", "disc", "box", "triangle", "ring"];

/// `count` scenes of the dataset `seed`, at `width x height`: a [`Dataset`]. Different
/// seeds give disjoint splits (training on one seed, evaluating on another).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scenes {
    pub seed: u64,
    pub count: usize,
    pub width: usize,
    pub height: usize,
}

impl Dataset for Scenes {
    fn len(&self) -> usize {
        self.count
    }

    fn get(&self, index: usize) -> Result<Scene> {
        Ok(scene(self.seed, index as u64, self.width, self.height))
    }

    fn describe(&self, index: usize) -> String {
        format!("procedural scene {index} of seed {}", self.seed)
    }

    fn shuffle(&self) -> bool {
        false
    }
}

/// A shape instance: class, centre, size, rotation, colour and texture phase.
struct Shape {
    class: u32,
    cx: f32,
    cy: f32,
    size: f32,
    angle: f32,
    colour: [f32; 3],
    phase: f32,
}

impl Shape {
    /// Whether the pixel centre (x, y) lies inside the shape.
    fn covers(&self, x: f32, y: f32) -> bool {
        let (dx, dy) = (x - self.cx, y - self.cy);
        let (s, c) = self.angle.sin_cos();
        let (u, v) = (c * dx + s * dy, -s * dx + c * dy);
        let r = (dx * dx + dy * dy).sqrt();
        match self.class {
            1 => r <= self.size,
            2 => u.abs() <= self.size && v.abs() <= self.size * 0.7,
            3 => {
                // An equilateral triangle pointing along +v.
                let h = self.size * 1.5;
                v >= -self.size * 0.5
                    && v <= h - self.size * 0.5
                    && u.abs() <= (h - self.size * 0.5 - v) * 0.577
            }
            _ => r <= self.size && r >= self.size * 0.55,
        }
    }

    /// The texture: solid discs, checkered boxes, striped triangles, dotted rings.
    fn shade(&self, x: f32, y: f32) -> [f32; 3] {
        let k = match self.class {
            1 => 1.0,
            2 => {
                if ((x / 4.0 + self.phase).floor() + (y / 4.0).floor()) as i64 % 2 == 0 {
                    1.0
                } else {
                    0.6
                }
            }
            3 => 0.75 + 0.25 * ((x + y) / 3.0 + self.phase).sin(),
            _ => 0.8 + 0.2 * ((x / 2.0).sin() * (y / 2.0).sin()),
        };
        self.colour.map(|c| c * k)
    }
}

/// Base colours per class (RGB in [0, 1]); each instance varies around its class's colour.
const COLOURS: [[f32; 3]; 4] = [[0.85, 0.2, 0.15], [0.15, 0.35, 0.85], [0.2, 0.75, 0.25], [0.9, 0.8, 0.15]];

/// Scene `index` of the dataset `seed`, at `width x height`.
pub fn scene(seed: u64, index: u64, width: usize, height: usize) -> Scene {
    // Seeded from (seed, index): the same scene every time.
    let mut rng = SplitMix::new(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    rng.next_u64();
    let scale = width.min(height) as f32;
    // Cluttered background: a colour gradient, soft blotches and thin strokes of every colour.
    let base = [rng.range(0.3, 0.6), rng.range(0.3, 0.6), rng.range(0.3, 0.6)];
    let tilt = [rng.range(-0.3, 0.3), rng.range(-0.3, 0.3)];
    let blotches: Vec<(f32, f32, f32, f32)> = (0..6)
        .map(|_| {
            (
                rng.range(0.0, width as f32),
                rng.range(0.0, height as f32),
                rng.range(0.05, 0.2) * scale,
                rng.range(-0.2, 0.2),
            )
        })
        .collect();
    let strokes: Vec<(f32, f32, f32, [f32; 3])> = (0..4)
        .map(|_| {
            let c = COLOURS[(rng.next_u64() % 4) as usize];
            (rng.range(0.0, std::f32::consts::PI), rng.range(-1.0, 1.0) * scale, rng.range(0.5, 1.5), c)
        })
        .collect();
    let shapes: Vec<Shape> = (0..(3 + rng.next_u64() % 5))
        .map(|_| {
            let class = 1 + (rng.next_u64() % 4) as u32;
            let c = COLOURS[class as usize - 1];
            Shape {
                class,
                cx: rng.range(0.0, width as f32),
                cy: rng.range(0.0, height as f32),
                size: rng.range(0.08, 0.22) * scale,
                angle: rng.range(0.0, std::f32::consts::TAU),
                colour: c.map(|v| (v + rng.range(-0.12, 0.12)).clamp(0.0, 1.0)),
                phase: rng.range(0.0, 8.0),
            }
        })
        .collect();
    let mut rgb = Vec::with_capacity(3 * width * height);
    let mut labels = Vec::with_capacity(width * height);
    for y in 0..height {
        for x in 0..width {
            let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
            let g = tilt[0] * fx / width as f32 + tilt[1] * fy / height as f32;
            let mut px = base.map(|b| b + g);
            for &(bx, by, r, d) in &blotches {
                let q = ((fx - bx).powi(2) + (fy - by).powi(2)) / (r * r);
                px = px.map(|v| v + d * (-q).exp());
            }
            for &(theta, offset, width_px, c) in &strokes {
                let dist = (fx * theta.cos() + fy * theta.sin() - offset - scale / 2.0).abs();
                if dist < width_px {
                    px = c.map(|v| v * 0.7);
                }
            }
            let mut label = 0;
            for s in &shapes {
                if s.covers(fx, fy) {
                    px = s.shade(fx, fy);
                    label = s.class;
                }
            }
            let noise = rng.range(-0.04, 0.04);
            rgb.extend(px.map(|v| ((v + noise).clamp(0.0, 1.0) * 255.0).round() as u8));
            labels.push(label);
        }
    }
    Scene { image: Image { width, height, rgb }, labels }
}
