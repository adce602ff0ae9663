//! Content-addressed image files: `<root>/ab/cdef….png`, named by the SHA-256 of the bytes (the
//! layout git and most artifact stores use), written atomically (synced temporary file + rename) so
//! a file at its final name is always complete. Identical images are stored once.
//!
//! The format and size are read from the header (PNG `IHDR`; JPEG `SOFn`; WebP `VP8 `, `VP8L` or
//! `VP8X`) without decoding, so importing JPEG and WebP images needs no codec. [`decode_rgb`] decodes
//! PNG and JPEG to RGB pixels for the code that trains on them (WebP is not decoded).

use crate::vocab::{ImageFormat, ImageId, ImageRecord};
use std::path::{Path, PathBuf};
use tiller_core::{Error, Result};
use tiller_testbed::Image;

/// A folder of content-addressed image files.
#[derive(Debug, Clone)]
pub struct ImageDir {
    root: PathBuf,
}

impl ImageDir {
    /// The folder at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where an image with this id and format lives.
    pub fn path(&self, id: &ImageId, format: ImageFormat) -> Result<PathBuf> {
        if !id.is_well_formed() {
            return Err(Error::invalid(format!(
                "image id {:?} is not a 64-digit lowercase hex SHA-256",
                id.0
            )));
        }
        Ok(self
            .root
            .join(&id.0[..2])
            .join(format!("{}.{}", &id.0[2..], format.extension())))
    }

    /// Writes `bytes` under their hash (skipped when a complete file is already there) and returns
    /// their record. Unknown formats are an error naming the first bytes.
    pub fn put(&self, bytes: &[u8]) -> Result<ImageRecord> {
        let (format, width, height) = sniff(bytes)?;
        let id = ImageId::of_bytes(bytes);
        let path = self.path(&id, format)?;
        let complete = std::fs::metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64);
        if !complete {
            tiller_core::fs::atomic_write(&path, bytes)?;
        }
        Ok(ImageRecord {
            id,
            format,
            width,
            height,
        })
    }

    /// The bytes of a stored image, checked against their hash.
    pub fn get(&self, record: &ImageRecord) -> Result<Vec<u8>> {
        let path = self.path(&record.id, record.format)?;
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        if ImageId::of_bytes(&bytes) != record.id {
            return Err(Error::format(
                &path,
                "content does not match its SHA-256 name: the file is corrupt",
            ));
        }
        Ok(bytes)
    }

    /// Whether the file of `record` exists.
    pub fn contains(&self, record: &ImageRecord) -> Result<bool> {
        Ok(self.path(&record.id, record.format)?.is_file())
    }

    /// Every file in the folder: `(id, path)` for files named like images, and `(None, path)` for
    /// anything else (leftover temporary files).
    pub fn files(&self) -> Result<Vec<(Option<ImageId>, PathBuf)>> {
        let mut out = Vec::new();
        let read = |p: &Path| std::fs::read_dir(p).map_err(|e| Error::io(p, e));
        if !self.root.exists() {
            return Ok(out);
        }
        for shard in read(&self.root)? {
            let shard = shard.map_err(|e| Error::io(&self.root, e))?.path();
            if !shard.is_dir() {
                out.push((None, shard));
                continue;
            }
            let prefix = shard
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            for file in read(&shard)? {
                let path = file.map_err(|e| Error::io(&shard, e))?.path();
                let stem = path
                    .file_stem()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                let id = ImageId(format!("{prefix}{stem}"));
                let known_ext = path
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| ["png", "jpg", "webp"].contains(&e));
                out.push((
                    (id.is_well_formed() && known_ext && path.is_file()).then_some(id),
                    path,
                ));
            }
        }
        out.sort_by(|a, b| a.1.cmp(&b.1));
        Ok(out)
    }
}

/// The format, width and height of encoded image bytes, from their header.
pub fn sniff(bytes: &[u8]) -> Result<(ImageFormat, u32, u32)> {
    let be16 = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]) as u32;
    let le16 = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]) as u32;
    let le24 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], 0]);
    let bad = |what: &str| {
        let head: Vec<String> = bytes.iter().take(12).map(|b| format!("{b:02x}")).collect();
        Error::invalid(format!(
            "image bytes ({} bytes starting {}): {what}",
            bytes.len(),
            head.join(" ")
        ))
    };
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        if bytes.len() < 24 || &bytes[12..16] != b"IHDR" {
            return Err(bad("PNG without an IHDR chunk"));
        }
        let w = u32::from_be_bytes(bytes[16..20].try_into().expect("4 bytes"));
        let h = u32::from_be_bytes(bytes[20..24].try_into().expect("4 bytes"));
        return Ok((ImageFormat::Png, w, h));
    }
    if bytes.starts_with(&[0xff, 0xd8]) {
        // Walk the marker segments to the first start-of-frame (SOF0-SOF15 except DHT C4, JPG C8,
        // DAC CC): FF Cn, length, precision, height, width.
        let mut i = 2;
        while i + 4 <= bytes.len() {
            if bytes[i] != 0xff {
                return Err(bad("JPEG marker expected"));
            }
            let marker = bytes[i + 1];
            if marker == 0xff {
                i += 1;
                continue;
            }
            let len = be16(&bytes[i + 2..]) as usize;
            let is_sof = (0xc0..=0xcf).contains(&marker) && ![0xc4, 0xc8, 0xcc].contains(&marker);
            if is_sof {
                if i + 9 > bytes.len() {
                    break;
                }
                return Ok((
                    ImageFormat::Jpeg,
                    be16(&bytes[i + 7..]),
                    be16(&bytes[i + 5..]),
                ));
            }
            i += 2 + len;
        }
        return Err(bad("JPEG without a start-of-frame segment"));
    }
    if bytes.len() >= 30 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        return match &bytes[12..16] {
            // Lossy: frame tag (3) + start code (3), then 14-bit width and height.
            b"VP8 " => Ok((
                ImageFormat::Webp,
                le16(&bytes[26..]) & 0x3fff,
                le16(&bytes[28..]) & 0x3fff,
            )),
            // Lossless: signature 0x2f, then 14-bit width-1 and height-1.
            b"VP8L" => {
                let bits = u32::from_le_bytes(bytes[21..25].try_into().expect("4 bytes"));
                Ok((
                    ImageFormat::Webp,
                    (bits & 0x3fff) + 1,
                    ((bits >> 14) & 0x3fff) + 1,
                ))
            }
            // Extended: 24-bit canvas width-1 and height-1.
            b"VP8X" => Ok((
                ImageFormat::Webp,
                le24(&bytes[24..]) + 1,
                le24(&bytes[27..]) + 1,
            )),
            _ => Err(bad("WebP with an unknown chunk")),
        };
    }
    Err(bad("not a PNG, JPEG or WebP image"))
}

/// Decodes PNG (any colour type and bit depth) or JPEG bytes to 8-bit RGB, as PIL's
/// `Image.convert("RGB")` does: grey is repeated into the three channels, alpha is dropped (not
/// composited), 16-bit samples keep their high byte. `path` names the file in errors; WebP is an
/// error that says to convert it.
pub fn decode_rgb(bytes: &[u8], path: &Path) -> Result<Image> {
    let (format, _, _) = sniff(bytes).map_err(|e| Error::format(path, e.to_string()))?;
    match format {
        ImageFormat::Png => tiller_testbed::image::decode_png_converted(bytes, path),
        ImageFormat::Jpeg => decode_jpeg_rgb(bytes, path),
        ImageFormat::Webp => Err(Error::format(
            path,
            "WebP images are not decoded; convert them to PNG or JPEG",
        )),
    }
}

fn decode_jpeg_rgb(bytes: &[u8], path: &Path) -> Result<Image> {
    use zune_core::bytestream::ZCursor;
    use zune_core::colorspace::ColorSpace;
    use zune_core::options::DecoderOptions;
    let options = DecoderOptions::default().jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    let rgb = decoder
        .decode()
        .map_err(|e| Error::format(path, format!("not a decodable JPEG: {e:?}")))?;
    let (w, h) = decoder
        .dimensions()
        .ok_or_else(|| Error::format(path, "JPEG without dimensions"))?;
    Image::from_rgb(w, h, rgb).map_err(|e| Error::format(path, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_sizes_from_headers() {
        let img = tiller_testbed::Image::filled(32, 32, [40, 40, 40]);
        let png = tiller_testbed::image::encode_png(&img).unwrap();
        assert_eq!(sniff(&png).unwrap(), (ImageFormat::Png, 32, 32));
        // SOI, an APP0 segment of length 4 (2 payload bytes), SOF0: length 17, precision 8,
        // height 0x0120 = 288, width 0x0200 = 512.
        let jpeg = [
            0xff, 0xd8, 0xff, 0xe0, 0x00, 0x04, 0x00, 0x00, 0xff, 0xc0, 0x00, 0x11, 0x08, 0x01,
            0x20, 0x02, 0x00, 0x03,
        ];
        assert_eq!(sniff(&jpeg).unwrap(), (ImageFormat::Jpeg, 512, 288));
        // Lossless WebP: width-1 = 99 and height-1 = 49 packed as 99 | 49 << 14 = 0x000c4063.
        let mut webp = b"RIFF\0\0\0\0WEBPVP8L\0\0\0\0\x2f".to_vec();
        webp.extend_from_slice(&0x000c_4063u32.to_le_bytes());
        webp.resize(30, 0);
        assert_eq!(sniff(&webp).unwrap(), (ImageFormat::Webp, 100, 50));
        let e = sniff(b"GIF89a......").unwrap_err().to_string();
        assert!(
            e.contains("not a PNG, JPEG or WebP") && e.contains("47 49 46"),
            "{e}"
        );
    }
}
