//! A TensorBoard event-file writer for scalars and histograms, written from the file format
//! (TFRecord framing around `tensorflow.Event` protobufs) without a protobuf dependency.
//!
//! Record framing: `u64 length (LE) | u32 masked_crc32c(length) | data | u32 masked_crc32c(data)`.
//! Event fields used: `wall_time` (1, double), `step` (2, int64), `file_version` (3, string),
//! `summary` (5). Summary.value (1): `tag` (1), `simple_value` (2, float), `histo` (5).

use std::io::Write;
use std::path::{Path, PathBuf};
use tiller_core::{Error, Result};

/// CRC-32C (Castagnoli), bitwise-reflected, as TFRecord uses.
pub fn crc32c(data: &[u8]) -> u32 {
    const POLY: u32 = 0x82F6_3B78;
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// TFRecord's masked CRC: rotate right by 15 and add a constant.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn tag(field: u32, wire: u32, out: &mut Vec<u8>) {
    varint(((field << 3) | wire) as u64, out);
}

fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    tag(field, 2, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

fn double_field(field: u32, v: f64, out: &mut Vec<u8>) {
    tag(field, 1, out);
    out.extend_from_slice(&v.to_le_bytes());
}

/// A histogram summary: TensorBoard's default exponential buckets are not required; any
/// increasing bucket limits are displayed.
#[derive(Debug, Clone)]
pub struct Histogram {
    pub min: f64,
    pub max: f64,
    pub num: f64,
    pub sum: f64,
    pub sum_squares: f64,
    /// Upper edge of each bucket, increasing.
    pub bucket_limit: Vec<f64>,
    /// Count in each bucket.
    pub bucket: Vec<f64>,
}

impl Histogram {
    /// A histogram of `values` in `bins` equal-width buckets; `None` when there are no finite values.
    pub fn from_values(values: &[f64], bins: usize) -> Option<Self> {
        let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if finite.is_empty() || bins == 0 {
            return None;
        }
        let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
        let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let width = if max > min {
            (max - min) / bins as f64
        } else {
            1.0
        };
        let mut bucket = vec![0.0; bins];
        for v in &finite {
            let i = (((v - min) / width) as usize).min(bins - 1);
            bucket[i] += 1.0;
        }
        Some(Self {
            min,
            max,
            num: finite.len() as f64,
            sum: finite.iter().sum(),
            sum_squares: finite.iter().map(|v| v * v).sum(),
            bucket_limit: (1..=bins).map(|i| min + width * i as f64).collect(),
            bucket,
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        double_field(1, self.min, &mut out);
        double_field(2, self.max, &mut out);
        double_field(3, self.num, &mut out);
        double_field(4, self.sum, &mut out);
        double_field(5, self.sum_squares, &mut out);
        let packed = |vals: &[f64]| {
            vals.iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
        };
        bytes_field(6, &packed(&self.bucket_limit), &mut out);
        bytes_field(7, &packed(&self.bucket), &mut out);
        out
    }
}

/// Appends events to one `events.out.tfevents.*` file.
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl EventWriter {
    /// Creates a new event file in `dir` (TensorBoard reads every such file in a run folder).
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let t = now();
        let path = dir.join(format!(
            "events.out.tfevents.{}.tiller.{}",
            t as u64,
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut w = Self { path, file };
        let mut ev = Vec::new();
        double_field(1, t, &mut ev);
        bytes_field(3, b"brain.Event:2", &mut ev);
        w.write_record(&ev)?;
        Ok(w)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file
            .write_all(&rec)
            .map_err(|e| Error::io(&self.path, e))
    }

    fn write_value(&mut self, step: u64, value: Vec<u8>) -> Result<()> {
        let mut summary = Vec::new();
        bytes_field(1, &value, &mut summary);
        let mut ev = Vec::new();
        double_field(1, now(), &mut ev);
        tag(2, 0, &mut ev);
        varint(step, &mut ev);
        bytes_field(5, &summary, &mut ev);
        self.write_record(&ev)
    }

    /// Writes one scalar.
    pub fn scalar(&mut self, tag_name: &str, step: u64, value: f64) -> Result<()> {
        let mut v = Vec::new();
        bytes_field(1, tag_name.as_bytes(), &mut v);
        tag(2, 5, &mut v);
        v.extend_from_slice(&(value as f32).to_le_bytes());
        self.write_value(step, v)
    }

    /// Writes one histogram.
    pub fn histogram(&mut self, tag_name: &str, step: u64, h: &Histogram) -> Result<()> {
        let mut v = Vec::new();
        bytes_field(1, tag_name.as_bytes(), &mut v);
        bytes_field(5, &h.encode(), &mut v);
        self.write_value(step, v)
    }

    /// Flushes to disk.
    pub fn flush(&mut self) -> Result<()> {
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }
}

/// Reads the records of an event file back, checking both CRCs (for tests and tools).
pub fn read_records(path: &Path) -> Result<Vec<Vec<u8>>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let bad = |m: &str| Error::format(path, format!("record at byte {i}: {m}"));
        let len_bytes = bytes.get(i..i + 8).ok_or_else(|| bad("truncated length"))?;
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let crc = bytes
            .get(i + 8..i + 12)
            .ok_or_else(|| bad("truncated length crc"))?;
        if u32::from_le_bytes(crc.try_into().expect("4 bytes")) != masked_crc(len_bytes) {
            return Err(bad("length crc mismatch"));
        }
        let data = bytes
            .get(i + 12..i + 12 + len)
            .ok_or_else(|| bad("truncated data"))?;
        let crc = bytes
            .get(i + 12 + len..i + 16 + len)
            .ok_or_else(|| bad("truncated data crc"))?;
        if u32::from_le_bytes(crc.try_into().expect("4 bytes")) != masked_crc(data) {
            return Err(bad("data crc mismatch"));
        }
        out.push(data.to_vec());
        i += 16 + len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C check value: crc32c("123456789") = 0xE3069283 (RFC 3720, appendix B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn records_round_trip_and_encode_scalars() {
        let dir = std::env::temp_dir().join(format!("tiller-tb-{}", std::process::id()));
        let mut w = EventWriter::create(&dir).unwrap();
        w.scalar("loss", 7, 0.25).unwrap();
        let h = Histogram::from_values(&[1.0, 2.0, 2.0, 3.0], 2).unwrap();
        assert_eq!(h.bucket, vec![1.0, 3.0]);
        w.histogram("reward", 7, &h).unwrap();
        w.flush().unwrap();
        let recs = read_records(w.path()).unwrap();
        assert_eq!(recs.len(), 3);
        // The first event carries the file version string.
        assert!(recs[0].windows(13).any(|s| s == b"brain.Event:2"));
        // Scalar event: ... step field (tag 0x10, varint 7) ... tag "loss" ... float 0.25 after 0x15.
        let r = &recs[1];
        assert!(r.windows(2).any(|s| s == [0x10, 7]));
        assert!(r.windows(4).any(|s| s == b"loss"));
        let f = 0.25f32.to_le_bytes();
        assert!(r.windows(5).any(|s| s[0] == 0x15 && s[1..] == f));
        // Corruption is detected.
        let mut bytes = std::fs::read(w.path()).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 0xff;
        let bad = dir.join("corrupt.tfevents");
        std::fs::write(&bad, bytes).unwrap();
        assert!(read_records(&bad).unwrap_err().to_string().contains("crc"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
