//! Image files: RGB images and label maps in (PNG, JPEG) through the `image` crate, label
//! and colour-overlay PNGs out (written atomically), and the class palettes.

use crate::data::image::Image;
use crate::error::{Error, Result};
use crate::fs::write_atomic;
use std::path::Path;

fn format_error(source: &str, what: impl std::fmt::Display) -> Error {
    Error::Format { path: source.to_string(), what: what.to_string() }
}

/// The most memory one decoded image may take, and the most pixels it may have (16K x
/// 16K): a small file whose header claims more is refused before anything is allocated.
const MAX_DECODED_BYTES: u64 = 1 << 30;
const MAX_PIXELS: u64 = 1 << 28;
/// The most pixels one byte of a complete file can code. PNG: at least 1 bit per pixel
/// before compression, and deflate expands at most 1032:1. JPEG (Huffman-coded; arithmetic
/// coding is not supported by the decoder): at least 1 bit per 8x8 block of the
/// full-resolution component, even in a progressive file's first DC scan. A header claiming
/// more is truncated or forged, and refused: the decoder would otherwise allocate (and, for
/// JPEG, grey-fill) the whole image, 800 MB for a 600-byte file.
const PNG_PIXELS_PER_BYTE: u64 = 8 * 1032;
const JPEG_PIXELS_PER_BYTE: u64 = 64 * 8;

/// Refuses a header claiming more pixels than the limit, or than a complete file of `len`
/// bytes in `format` can hold.
fn check_dimensions(w: u32, h: u32, len: usize, format: image::ImageFormat, source: &str) -> Result<()> {
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(format_error(
            source,
            format!("{w}x{h} pixels is above the limit of {MAX_PIXELS} pixels"),
        ));
    }
    let per_byte = match format {
        image::ImageFormat::Png => PNG_PIXELS_PER_BYTE,
        image::ImageFormat::Jpeg => JPEG_PIXELS_PER_BYTE,
        _ => u64::MAX,
    };
    let len = len as u64;
    if u64::from(w) * u64::from(h) > len.saturating_mul(per_byte) {
        return Err(format_error(
            source,
            format!(
                "the {format:?} header claims {w}x{h} pixels, more than a complete file of {len} bytes \
                 can hold (at most {per_byte} pixels per byte): truncated or corrupt"
            ),
        ));
    }
    Ok(())
}

fn decode(bytes: &[u8], source: &str) -> Result<image::DynamicImage> {
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| Error::Io { path: source.to_string(), source: e })
    };
    let mut image_reader = reader()?;
    let Some(format) = image_reader.format() else {
        return Err(format_error(source, "not an image this build can read (PNG or JPEG)"));
    };
    let unreadable = |e: image::ImageError| {
        format_error(source, format!("not an image this build can read (PNG or JPEG): {e}"))
    };
    // The header alone first: its size is checked before the decoder allocates.
    let (w, h) = reader()?.into_dimensions().map_err(unreadable)?;
    check_dimensions(w, h, bytes.len(), format, source)?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    image_reader.limits(limits);
    // The JPEG decoder (zune-jpeg 0.5) panics on some corrupt files (an unwrap in its
    // IDCT, found by fuzzing): a panic there is a file it cannot read, not a crash.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| image_reader.decode()))
        .unwrap_or_else(|_| {
            Err(image::ImageError::Decoding(image::error::DecodingError::new(
                format.into(),
                "the decoder failed (panicked) on corrupt data",
            )))
        })
        .map_err(unreadable)
}

fn read(path: &Path) -> Result<(Vec<u8>, String)> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: shown.clone(), source })?;
    Ok((bytes, shown))
}

/// Reads an image file as 8-bit RGB (grey and alpha are converted).
pub fn read_rgb(path: &Path) -> Result<Image> {
    let (bytes, shown) = read(path)?;
    decode_rgb(&bytes, &shown)
}

/// Decodes PNG or JPEG bytes as 8-bit RGB; `source` names them in errors.
pub fn decode_rgb(bytes: &[u8], source: &str) -> Result<Image> {
    let rgb = decode(bytes, source)?.into_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    Image::new(w, h, rgb.into_raw())
}

/// A label map: `height * width` class indices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelMap {
    pub width: usize,
    pub height: usize,
    pub labels: Vec<u32>,
}

/// Reads a label PNG: single-channel (8 or 16 bits per pixel; each value is a label) or
/// palette (each index is a label). Colour label images are refused: their colours are not
/// class indices.
pub fn read_labels(path: &Path) -> Result<LabelMap> {
    let (bytes, shown) = read(path)?;
    decode_labels(&bytes, &shown)
}

/// Decodes a single-channel label PNG from bytes; `source` names them in errors. A palette
/// PNG gives its indices (as PIL's `convert('P')` does for the official datasets), not
/// their colours.
pub fn decode_labels(bytes: &[u8], source: &str) -> Result<LabelMap> {
    if let Some(map) = decode_palette_indices(bytes, source)? {
        return Ok(map);
    }
    let img = decode(bytes, source)?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    let labels = match img {
        image::DynamicImage::ImageLuma8(g) => g.into_raw().into_iter().map(u32::from).collect(),
        image::DynamicImage::ImageLuma16(g) => g.into_raw().into_iter().map(u32::from).collect(),
        other => {
            return Err(format_error(
                source,
                format!(
                    "a label map must be single-channel (8 or 16 bit grey); this one is {:?}",
                    other.color()
                ),
            ))
        }
    };
    Ok(LabelMap { width, height, labels })
}

/// The palette indices of an indexed-colour PNG; none for any other file.
fn decode_palette_indices(bytes: &[u8], source: &str) -> Result<Option<LabelMap>> {
    if !bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Ok(None);
    }
    let unreadable =
        |e: png::DecodingError| format_error(source, format!("not a PNG this build can read: {e}"));
    let mut decoder = png::Decoder::new_with_limits(
        std::io::Cursor::new(bytes),
        png::Limits { bytes: MAX_DECODED_BYTES as usize },
    );
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder.read_info().map_err(unreadable)?;
    let info = reader.info();
    if info.color_type != png::ColorType::Indexed {
        return Ok(None);
    }
    let (w, h, depth) = (info.width, info.height, info.bit_depth as usize);
    check_dimensions(w, h, bytes.len(), image::ImageFormat::Png, source)?;
    let mut packed = vec![0; reader.output_buffer_size().ok_or_else(|| format_error(source, "too large"))?];
    let frame = reader.next_frame(&mut packed).map_err(unreadable)?;
    let (width, height) = (w as usize, h as usize);
    // Rows of `depth`-bit indices, the first pixel in the high bits of each byte.
    let mask = (1u32 << depth) - 1;
    let labels = packed[..frame.line_size * height]
        .chunks_exact(frame.line_size)
        .flat_map(|row| {
            (0..width).map(move |x| {
                let bit = x * depth;
                (u32::from(row[bit / 8]) >> (8 - depth - bit % 8)) & mask
            })
        })
        .collect();
    Ok(Some(LabelMap { width, height, labels }))
}

fn encode_png(
    path: &Path,
    width: usize,
    height: usize,
    colour: image::ExtendedColorType,
    data: &[u8],
) -> Result<()> {
    let mut bytes = Vec::new();
    let encoder = image::codecs::png::PngEncoder::new(&mut bytes);
    image::ImageEncoder::write_image(encoder, data, width as u32, height as u32, colour)
        .map_err(|e| format_error(&path.display().to_string(), format!("cannot encode the PNG: {e}")))?;
    write_atomic(path, &bytes)
}

/// The official repository's palette for saved predictions (`get_palette(256)`: PASCAL
/// VOC's colours, the bits of each index spread over R, G and B from the high bit down):
/// 256 RGB triples.
pub fn official_palette() -> Vec<u8> {
    let mut palette = vec![0u8; 768];
    for j in 0..256usize {
        let (mut label, mut i) = (j, 0);
        while label > 0 {
            for (c, entry) in palette[j * 3..j * 3 + 3].iter_mut().enumerate() {
                *entry |= (((label >> c) & 1) << (7 - i)) as u8;
            }
            i += 1;
            label >>= 3;
        }
    }
    palette
}

/// Writes class indices (each below 256) as an 8-bit palette PNG with `palette` (RGB
/// triples), atomically: what the official code saves its predictions as.
pub fn write_palette_labels(path: &Path, map: &LabelMap, palette: &[u8]) -> Result<()> {
    let shown = path.display().to_string();
    if map.labels.len() != map.width * map.height {
        return Err(format_error(
            &shown,
            format!("{} labels for a {}x{} map", map.labels.len(), map.width, map.height),
        ));
    }
    if let Some(big) = map.labels.iter().find(|&&l| l > 255) {
        return Err(format_error(&shown, format!("label {big} does not fit a palette PNG")));
    }
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, map.width as u32, map.height as u32);
        encoder.set_color(png::ColorType::Indexed);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_palette(palette.to_vec());
        let data: Vec<u8> = map.labels.iter().map(|&l| l as u8).collect();
        encoder
            .write_header()
            .and_then(|mut w| w.write_image_data(&data))
            .map_err(|e| format_error(&shown, format!("cannot encode the PNG: {e}")))?;
    }
    write_atomic(path, &bytes)
}

/// Writes class indices as a grey PNG (8 bit when every label fits, else 16 bit), atomically.
pub fn write_labels(path: &Path, map: &LabelMap) -> Result<()> {
    if map.labels.len() != map.width * map.height {
        return Err(Error::Shape {
            what: format!("labels of a {}x{} map for {}", map.width, map.height, path.display()),
            expected: format!("{} values", map.width * map.height),
            actual: format!("{} values", map.labels.len()),
        });
    }
    match map.labels.iter().max().copied().unwrap_or(0) {
        0..=255 => {
            let data: Vec<u8> = map.labels.iter().map(|&l| l as u8).collect();
            encode_png(path, map.width, map.height, image::ExtendedColorType::L8, &data)
        }
        // The encoder takes 16-bit samples in native byte order.
        256..=65535 => {
            let data: Vec<u8> = map.labels.iter().flat_map(|&l| (l as u16).to_ne_bytes()).collect();
            encode_png(path, map.width, map.height, image::ExtendedColorType::L16, &data)
        }
        big => {
            Err(format_error(&path.display().to_string(), format!("label {big} does not fit a 16-bit PNG")))
        }
    }
}

/// Writes an RGB image as PNG, atomically.
pub fn write_rgb(path: &Path, image: &Image) -> Result<()> {
    encode_png(path, image.width, image.height, image::ExtendedColorType::Rgb8, &image.rgb)
}

/// The official Cityscapes colours of the 19 training classes, in train-id order.
pub const CITYSCAPES_PALETTE: [[u8; 3]; 19] = [
    [128, 64, 128],
    [244, 35, 232],
    [70, 70, 70],
    [102, 102, 156],
    [190, 153, 153],
    [153, 153, 153],
    [250, 170, 30],
    [220, 220, 0],
    [107, 142, 35],
    [152, 251, 152],
    [70, 130, 180],
    [220, 20, 60],
    [255, 0, 0],
    [0, 0, 142],
    [0, 0, 70],
    [0, 60, 100],
    [0, 80, 100],
    [0, 0, 230],
    [119, 11, 32],
];

/// One colour per class: the Cityscapes palette for 19 classes; otherwise colours spread
/// around the hue circle by the golden angle, so neighbouring classes differ, with class 0
/// black (the background of most label sets).
pub fn palette(classes: usize) -> Vec<[u8; 3]> {
    if classes == CITYSCAPES_PALETTE.len() {
        return CITYSCAPES_PALETTE.to_vec();
    }
    (0..classes)
        .map(|c| {
            if c == 0 {
                return [0, 0, 0];
            }
            let hue = (c as f32 * 0.618_034).fract() * 6.0;
            let value = if c % 2 == 0 { 0.75 } else { 1.0 };
            let x = 1.0 - (hue % 2.0 - 1.0).abs();
            let (r, g, b) = match hue as u32 {
                0 => (1.0, x, 0.0),
                1 => (x, 1.0, 0.0),
                2 => (0.0, 1.0, x),
                3 => (0.0, x, 1.0),
                4 => (x, 0.0, 1.0),
                _ => (1.0, 0.0, x),
            };
            [r, g, b].map(|v: f32| (v * value * 255.0).round() as u8)
        })
        .collect()
}

/// `image` blended with the colour of each pixel's class at `opacity` (0: the image, 1:
/// the colours). Labels outside the palette (an ignore label) keep the image's pixel.
pub fn overlay(image: &Image, labels: &[u32], palette: &[[u8; 3]], opacity: f32) -> Result<Image> {
    if labels.len() != image.width * image.height {
        return Err(Error::Shape {
            what: format!("overlay labels for a {}x{} image", image.width, image.height),
            expected: format!("{} values", image.width * image.height),
            actual: format!("{} values", labels.len()),
        });
    }
    let mut rgb = image.rgb.clone();
    for (px, &l) in rgb.chunks_exact_mut(3).zip(labels) {
        if let Some(colour) = palette.get(l as usize) {
            for (v, &c) in px.iter_mut().zip(colour) {
                *v = (f32::from(*v) * (1.0 - opacity) + f32::from(c) * opacity).round() as u8;
            }
        }
    }
    Ok(Image { rgb, ..*image })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(kind);
        c.extend_from_slice(data);
        // CRC-32 of kind and data, which the decoder checks.
        let mut crc = !0u32;
        for &b in &c[4..] {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
            }
        }
        c.extend((!crc).to_be_bytes());
        c
    }

    /// Found by fuzzing: tiny files whose headers claim a 16384 x 16384 image (under the
    /// pixel limit) made the decoder reserve 1 GiB, or grey-fill 800 MB for seconds (JPEG).
    #[test]
    fn small_files_claiming_large_images_are_refused() {
        let mut header = 16384u32.to_be_bytes().repeat(2);
        header.extend([8, 6, 0, 0, 0]);
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend(png_chunk(b"IHDR", &header));
        png.extend(png_chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]));
        png.extend(png_chunk(b"IEND", &[]));
        let err = decode_rgb(&png, "big.png").unwrap_err().to_string();
        assert!(err.contains("big.png") && err.contains("16384x16384") && err.contains("truncated"), "{err}");

        let mut jpeg = Vec::new();
        let rgb: Vec<u8> = (0..24 * 16 * 3).map(|i| (i * 7 % 251) as u8).collect();
        image::codecs::jpeg::JpegEncoder::new(&mut jpeg)
            .encode(&rgb, 24, 16, image::ExtendedColorType::Rgb8)
            .unwrap();
        assert!(decode_rgb(&jpeg, "small.jpg").is_ok());
        // The frame header (SOF0) holds the height and width; cut the file after the scan header.
        let sof = jpeg.windows(2).position(|w| w == [0xff, 0xc0]).unwrap();
        jpeg[sof + 5..sof + 9].copy_from_slice(&[0x40, 0x00, 0x40, 0x00]);
        let sos = jpeg.windows(2).position(|w| w == [0xff, 0xda]).unwrap();
        let sos_len = usize::from(u16::from_be_bytes([jpeg[sos + 2], jpeg[sos + 3]]));
        jpeg.truncate(sos + 2 + sos_len);
        jpeg.extend([0xff, 0xd9]);
        let err = decode_rgb(&jpeg, "big.jpg").unwrap_err().to_string();
        assert!(err.contains("big.jpg") && err.contains("16384x16384") && err.contains("truncated"), "{err}");
    }
}
