//! Plain RGB images, pixel masks and bounding boxes, and PNG input/output.
//!
//! The Shapes world has no tensors: an image is `width * height` RGB triples, row-major, 8 bits
//! per channel. Only square 32x32 and 64x64 images belong to the world; geometry scales with
//! `resolution / 32`.

use crate::palette::Rgb;
use serde::{Deserialize, Serialize};
use std::io::{BufReader, Cursor};
use std::path::Path;
use tiller_core::{Error, Result};

/// The resolutions the world is defined at (square images).
pub const SUPPORTED_RESOLUTIONS: [usize; 2] = [32, 64];

/// Checks that `width x height` is one of [`SUPPORTED_RESOLUTIONS`] and returns the side.
pub fn check_resolution(width: usize, height: usize) -> Result<usize> {
    if width == height && SUPPORTED_RESOLUTIONS.contains(&width) {
        Ok(width)
    } else {
        Err(Error::invalid(format!(
            "resolution {width}x{height} is not supported; the Shapes world is 32x32 or 64x64"
        )))
    }
}

/// Geometry scale of a supported resolution: 1 at 32x32, 2 at 64x64. Every length the world
/// documents "at 32x32" is multiplied by it.
pub fn scale(resolution: usize) -> usize {
    resolution / 32
}

/// An RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    width: usize,
    height: usize,
    data: Vec<u8>,
}

impl Image {
    /// A `width x height` image filled with `fill`.
    pub fn filled(width: usize, height: usize, fill: Rgb) -> Self {
        let mut data = Vec::with_capacity(width * height * 3);
        for _ in 0..width * height {
            data.extend_from_slice(&fill);
        }
        Self {
            width,
            height,
            data,
        }
    }

    /// Wraps row-major RGB bytes; `data.len()` must be `width * height * 3`.
    pub fn from_rgb(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if data.len() != width * height * 3 {
            return Err(Error::invalid(format!(
                "an RGB image of {width}x{height} needs {} bytes, got {}",
                width * height * 3,
                data.len()
            )));
        }
        Ok(Self {
            width,
            height,
            data,
        })
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// The row-major RGB bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The pixel at column `x`, row `y`.
    pub fn get(&self, x: usize, y: usize) -> Rgb {
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }

    /// Sets the pixel at column `x`, row `y`.
    pub fn set(&mut self, x: usize, y: usize, rgb: Rgb) {
        let i = (y * self.width + x) * 3;
        self.data[i..i + 3].copy_from_slice(&rgb);
    }

    /// Appends the image as channels-first floats in [-1, 1] (`[3, H, W]`, the layout and range
    /// diffusion models take).
    pub fn to_chw_floats(&self, out: &mut Vec<f32>) {
        let (w, h) = (self.width, self.height);
        out.reserve(3 * w * h);
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    out.push(self.data[(y * w + x) * 3 + c] as f32 / 127.5 - 1.0);
                }
            }
        }
    }

    /// The image translated by `(dx, dy)` pixels (right and down when positive), the uncovered
    /// border filled by repeating the nearest edge pixel: pixel (x, y) of the result is pixel
    /// (clamp(x - dx), clamp(y - dy)) of `self`.
    pub fn shifted(&self, dx: i64, dy: i64) -> Image {
        let (w, h) = (self.width as i64, self.height as i64);
        let mut data = Vec::with_capacity(self.data.len());
        for y in 0..h {
            let sy = (y - dy).clamp(0, h - 1);
            for x in 0..w {
                let sx = (x - dx).clamp(0, w - 1);
                let i = ((sy * w + sx) * 3) as usize;
                data.extend_from_slice(&self.data[i..i + 3]);
            }
        }
        Image {
            width: self.width,
            height: self.height,
            data,
        }
    }

    /// The image mirrored left to right (column x becomes column width - 1 - x).
    pub fn mirrored(&self) -> Image {
        let w = self.width;
        let mut data = Vec::with_capacity(self.data.len());
        for row in self.data.chunks_exact(w * 3) {
            for px in row.chunks_exact(3).rev() {
                data.extend_from_slice(px);
            }
        }
        Image {
            width: w,
            height: self.height,
            data,
        }
    }

    /// The side of a supported square image, or an error naming the size.
    pub fn resolution(&self) -> Result<usize> {
        check_resolution(self.width, self.height)
    }
}

/// A per-pixel boolean mask, row-major, the size of the image it describes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mask {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `bits[y * width + x]` is true where the mask is set.
    pub bits: Vec<bool>,
}

impl Mask {
    /// An empty mask.
    pub fn empty(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            bits: vec![false; width * height],
        }
    }

    /// Whether pixel (`x`, `y`) is set.
    pub fn get(&self, x: usize, y: usize) -> bool {
        self.bits[y * self.width + x]
    }

    /// Sets pixel (`x`, `y`).
    pub fn set(&mut self, x: usize, y: usize) {
        self.bits[y * self.width + x] = true;
    }

    /// Number of set pixels.
    pub fn count(&self) -> usize {
        self.bits.iter().filter(|b| **b).count()
    }

    /// Whether no pixel is set.
    pub fn is_empty(&self) -> bool {
        !self.bits.iter().any(|b| *b)
    }

    /// Sets every pixel that is set in `other` (same size).
    pub fn union_with(&mut self, other: &Mask) {
        debug_assert_eq!((self.width, self.height), (other.width, other.height));
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= *b;
        }
    }

    /// The pixels 8-adjacent to a set pixel that are not set themselves: the one-pixel ring around
    /// the mask, where a soft edge shows.
    pub fn ring(&self) -> Mask {
        let mut out = Mask::empty(self.width, self.height);
        for y in 0..self.height {
            for x in 0..self.width {
                if self.get(x, y) {
                    continue;
                }
                let near = (y.saturating_sub(1)..(y + 2).min(self.height)).any(|ny| {
                    (x.saturating_sub(1)..(x + 2).min(self.width)).any(|nx| self.get(nx, ny))
                });
                if near {
                    out.set(x, y);
                }
            }
        }
        out
    }

    /// The bounding box of the set pixels, if any.
    pub fn bbox(&self) -> Option<BBox> {
        let mut b: Option<BBox> = None;
        for y in 0..self.height {
            for x in 0..self.width {
                if self.get(x, y) {
                    b = Some(match b {
                        None => BBox {
                            x0: x,
                            y0: y,
                            x1: x,
                            y1: y,
                        },
                        Some(b) => BBox {
                            x0: b.x0.min(x),
                            y0: b.y0.min(y),
                            x1: b.x1.max(x),
                            y1: b.y1.max(y),
                        },
                    });
                }
            }
        }
        b
    }
}

/// An axis-aligned pixel box with inclusive corners: it covers columns `x0..=x1`, rows `y0..=y1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BBox {
    /// Leftmost column.
    pub x0: usize,
    /// Top row.
    pub y0: usize,
    /// Rightmost column (inclusive).
    pub x1: usize,
    /// Bottom row (inclusive).
    pub y1: usize,
}

impl BBox {
    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.x1 - self.x0 + 1
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.y1 - self.y0 + 1
    }

    /// The box in continuous pixel coordinates `[x0, y0, x1 + 1, y1 + 1]`, as detectors report
    /// boxes (GenEval's `relative_position` reads this form).
    pub fn corners(&self) -> [f64; 4] {
        [
            self.x0 as f64,
            self.y0 as f64,
            (self.x1 + 1) as f64,
            (self.y1 + 1) as f64,
        ]
    }

    /// Background pixels between this box and the nearest image edge of a `resolution` image.
    pub fn border_distance(&self, resolution: usize) -> usize {
        self.x0
            .min(self.y0)
            .min(resolution - 1 - self.x1)
            .min(resolution - 1 - self.y1)
    }

    /// Background pixels between two boxes along the axis that separates them most (0 when they
    /// touch or overlap; Chebyshev gap minus one).
    pub fn gap(&self, other: &BBox) -> usize {
        // Along an axis where the boxes do not overlap, the gap is the pixels strictly between them;
        // along an overlapping axis it is 0, so the larger of the two is the Chebyshev gap.
        let between = |a0: usize, a1: usize, b0: usize, b1: usize| {
            if b0 > a1 {
                b0 - a1 - 1
            } else if a0 > b1 {
                a0 - b1 - 1
            } else {
                0
            }
        };
        between(self.x0, self.x1, other.x0, other.x1)
            .max(between(self.y0, self.y1, other.y0, other.y1))
    }

    /// Whether the boxes share a pixel.
    pub fn overlaps(&self, other: &BBox) -> bool {
        self.x0 <= other.x1 && other.x0 <= self.x1 && self.y0 <= other.y1 && other.y0 <= self.y1
    }
}

/// Encodes an image as an 8-bit RGB PNG.
pub fn encode_png(image: &Image) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, image.width() as u32, image.height() as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder
            .write_header()
            .map_err(|e| Error::invalid(format!("PNG encoding failed: {e}")))?;
        writer
            .write_image_data(image.data())
            .map_err(|e| Error::invalid(format!("PNG encoding failed: {e}")))?;
        writer
            .finish()
            .map_err(|e| Error::invalid(format!("PNG encoding failed: {e}")))?;
    }
    Ok(out)
}

/// Decodes an 8-bit RGB PNG (other colour types and depths are an error, never converted).
pub fn decode_png(bytes: &[u8], path: &Path) -> Result<Image> {
    let (info, buf) = png_frame(bytes, path, png::Transformations::IDENTITY)?;
    let (color, depth) = (info.color_type, info.bit_depth);
    if color != png::ColorType::Rgb || depth != png::BitDepth::Eight {
        return Err(Error::format(
            path,
            format!(
                "expected an 8-bit RGB PNG, found {color:?} at {depth:?}; convert it to RGB first"
            ),
        ));
    }
    Image::from_rgb(info.width as usize, info.height as usize, buf)
}

/// Decodes a PNG of any colour type and bit depth to 8-bit RGB, as PIL's `Image.convert("RGB")`
/// does: palettes expand, grey is repeated into the three channels, alpha is dropped (not
/// composited), 16-bit samples keep their high byte.
pub fn decode_png_converted(bytes: &[u8], path: &Path) -> Result<Image> {
    let (info, buf) = png_frame(
        bytes,
        path,
        png::Transformations::EXPAND | png::Transformations::STRIP_16,
    )?;
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => {
            return Err(Error::format(
                path,
                format!("PNG colour type {other:?} after expansion"),
            ));
        }
    };
    let rgb = buf
        .chunks_exact(channels)
        .flat_map(|p| match channels {
            1 | 2 => [p[0], p[0], p[0]],
            _ => [p[0], p[1], p[2]],
        })
        .collect();
    Image::from_rgb(info.width as usize, info.height as usize, rgb)
        .map_err(|e| Error::format(path, e.to_string()))
}

/// The first frame of a PNG with `transformations` applied, and its output info.
fn png_frame(
    bytes: &[u8],
    path: &Path,
    transformations: png::Transformations,
) -> Result<(png::OutputInfo, Vec<u8>)> {
    let mut decoder = png::Decoder::new(BufReader::new(Cursor::new(bytes)));
    decoder.set_transformations(transformations);
    let mut reader = decoder
        .read_info()
        .map_err(|e| Error::format(path, format!("not a readable PNG: {e}")))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| Error::format(path, "PNG too large"))?;
    let mut buf = vec![0; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| Error::format(path, format!("corrupt PNG data: {e}")))?;
    buf.truncate(info.buffer_size());
    Ok((info, buf))
}

/// Writes `image` to `path` as an 8-bit RGB PNG.
pub fn write_png(path: &Path, image: &Image) -> Result<()> {
    let bytes = encode_png(image)?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Reads an 8-bit RGB PNG from `path`.
pub fn read_png(path: &Path) -> Result<Image> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_png(&bytes, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trip_is_exact() {
        let mut img = Image::filled(32, 32, [40, 40, 40]);
        img.set(3, 5, [220, 50, 50]);
        img.set(31, 31, [1, 2, 3]);
        let bytes = encode_png(&img).unwrap();
        assert_eq!(decode_png(&bytes, Path::new("mem.png")).unwrap(), img);
        let e = decode_png(b"not a png", Path::new("bad.png")).unwrap_err();
        assert!(e.to_string().contains("bad.png"), "{e}");
    }

    #[test]
    fn resolutions_outside_the_world_are_rejected() {
        assert_eq!(check_resolution(64, 64).unwrap(), 64);
        let e = check_resolution(48, 48).unwrap_err().to_string();
        assert!(e.contains("48x48") && e.contains("32x32 or 64x64"), "{e}");
        assert!(check_resolution(32, 64).is_err());
        assert!(Image::from_rgb(2, 2, vec![0; 11]).is_err());
    }

    #[test]
    fn shifting_moves_pixels_and_repeats_the_edge() {
        let mut im = Image::filled(4, 3, [0, 0, 0]);
        im.set(1, 1, [255, 0, 0]);
        im.set(0, 2, [0, 0, 255]);
        let s = im.shifted(2, -1);
        assert_eq!((s.width, s.height), (4, 3));
        // The red pixel moves right 2 and up 1.
        assert_eq!(s.get(3, 0), [255, 0, 0]);
        assert_eq!(s.get(3, 2), [0, 0, 0]);
        // Columns 0 and 1 repeat the old column 0; the bottom row repeats the old bottom row.
        assert_eq!(s.get(0, 1), [0, 0, 255]);
        assert_eq!(s.get(1, 1), [0, 0, 255]);
        assert_eq!(s.get(2, 2), [0, 0, 255]);
        assert_eq!(s.get(2, 0), [0, 0, 0]);
        assert_eq!(im.shifted(0, 0), im);
    }

    #[test]
    fn mirroring_reverses_columns_and_is_an_involution() {
        let mut im = Image::filled(32, 32, [40, 40, 40]);
        im.set(0, 3, [220, 50, 50]);
        im.set(30, 31, [60, 100, 230]);
        let m = im.mirrored();
        assert_eq!(m.get(31, 3), [220, 50, 50]);
        assert_eq!(m.get(1, 31), [60, 100, 230]);
        assert_eq!(m.get(0, 3), [40, 40, 40]);
        assert_eq!(m.mirrored(), im);
    }

    #[test]
    fn ring_is_the_eight_neighbourhood() {
        let mut m = Mask::empty(5, 5);
        m.set(0, 0);
        m.set(2, 2);
        let r = m.ring();
        // (0, 0) in a corner has 3 neighbours; (2, 2) has 8; (1, 1) is shared.
        assert_eq!(r.count(), 3 + 8 - 1);
        assert!(r.get(1, 1) && r.get(3, 3) && !r.get(2, 2) && !r.get(4, 4));
    }

    #[test]
    fn box_gaps_and_border_distances() {
        let a = BBox {
            x0: 2,
            y0: 2,
            x1: 8,
            y1: 8,
        };
        let b = BBox {
            x0: 11,
            y0: 4,
            x1: 17,
            y1: 10,
        };
        // Columns 9 and 10 lie between them.
        assert_eq!(a.gap(&b), 2);
        assert_eq!(b.gap(&a), 2);
        assert!(!a.overlaps(&b));
        assert_eq!(a.border_distance(32), 2);
        assert_eq!(b.border_distance(32), 4);
        let c = BBox {
            x0: 8,
            y0: 8,
            x1: 9,
            y1: 9,
        };
        assert!(a.overlaps(&c));
        assert_eq!(a.gap(&c), 0);
    }
}
