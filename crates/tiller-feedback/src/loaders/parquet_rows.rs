//! Reading named columns of a parquet file row by row with the `parquet` crate's record API (no
//! arrow), with errors that name the file, the row and the column.

use parquet::basic::{LogicalType, TimeUnit};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tiller_core::{Error, Result};

/// An open parquet file.
pub(crate) struct Table {
    path: PathBuf,
    reader: SerializedFileReader<std::fs::File>,
}

/// One row's values by column name (nulls are absent).
pub(crate) struct Values<'a> {
    path: &'a Path,
    row: usize,
    values: HashMap<String, Field>,
    nanos: &'a [String],
}

impl Table {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let reader = SerializedFileReader::new(file)
            .map_err(|e| Error::format(path, format!("not a readable parquet file: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            reader,
        })
    }

    /// Top-level column names.
    pub(crate) fn columns(&self) -> Vec<String> {
        self.reader
            .metadata()
            .file_metadata()
            .schema()
            .get_fields()
            .iter()
            .map(|f| f.name().to_string())
            .collect()
    }

    /// An error naming the first of `names` the file lacks, and the columns it has.
    pub(crate) fn require(&self, names: &[&str], hint: &str) -> Result<()> {
        let have = self.columns();
        if let Some(missing) = names.iter().find(|n| !have.iter().any(|h| h == *n)) {
            return Err(Error::format(
                &self.path,
                format!(
                    "missing required column `{missing}` (the file has: {}){hint}",
                    have.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// Calls `f` on every row, reading only the columns in `names` that the file has.
    pub(crate) fn for_each_row(
        &self,
        names: &[&str],
        mut f: impl FnMut(&Values<'_>) -> Result<()>,
    ) -> Result<()> {
        let root = self.reader.metadata().file_metadata().schema();
        let fields: Vec<Arc<Type>> = root
            .get_fields()
            .iter()
            .filter(|t| names.contains(&t.name()))
            .cloned()
            .collect();
        // INT64 columns with a nanosecond timestamp type come back as plain longs.
        let nanos: Vec<String> = self
            .reader
            .metadata()
            .file_metadata()
            .schema_descr()
            .columns()
            .iter()
            .filter(|c| {
                matches!(c.logical_type_ref(), Some(LogicalType::Timestamp(t)) if t.unit == TimeUnit::NANOS)
            })
            .map(|c| c.name().to_string())
            .collect();
        let projection = Type::group_type_builder(root.name())
            .with_fields(fields)
            .build()
            .map_err(|e| Error::format(&self.path, format!("projecting columns: {e}")))?;
        let rows = self
            .reader
            .get_row_iter(Some(projection))
            .map_err(|e| Error::format(&self.path, format!("reading rows: {e}")))?;
        for (i, row) in rows.enumerate() {
            let row = row.map_err(|e| Error::format(&self.path, format!("row {i}: {e}")))?;
            let values = row
                .into_columns()
                .into_iter()
                .filter(|(_, v)| !matches!(v, Field::Null))
                .collect();
            f(&Values {
                path: &self.path,
                row: i,
                values,
                nanos: &nanos,
            })?;
        }
        Ok(())
    }
}

impl Values<'_> {
    pub(crate) fn error(&self, column: &str, message: impl std::fmt::Display) -> Error {
        Error::format(
            self.path,
            format!("row {}, column `{column}`: {message}", self.row),
        )
    }

    fn get(&self, column: &str) -> Result<&Field> {
        self.values
            .get(column)
            .ok_or_else(|| self.error(column, "is null"))
    }

    pub(crate) fn has(&self, column: &str) -> bool {
        self.values.contains_key(column)
    }

    pub(crate) fn str(&self, column: &str) -> Result<String> {
        match self.get(column)? {
            Field::Str(s) => Ok(s.clone()),
            Field::Bytes(b) => String::from_utf8(b.data().to_vec())
                .map_err(|_| self.error(column, "is not UTF-8 text")),
            other => Err(self.error(column, format!("expected text, found {other:?}"))),
        }
    }

    /// A column that holds text in some files and raw bytes in others: `Ok(Ok(text))` for a
    /// string (UTF-8) column, `Ok(Err(bytes))` for a binary one.
    pub(crate) fn text_or_bytes(
        &self,
        column: &str,
    ) -> Result<std::result::Result<String, Vec<u8>>> {
        match self.get(column)? {
            Field::Str(s) => Ok(Ok(s.clone())),
            Field::Bytes(b) => Ok(Err(b.data().to_vec())),
            other => Err(self.error(column, format!("expected text or bytes, found {other:?}"))),
        }
    }

    pub(crate) fn bytes(&self, column: &str) -> Result<Vec<u8>> {
        match self.get(column)? {
            Field::Bytes(b) => Ok(b.data().to_vec()),
            Field::Str(s) => Ok(s.as_bytes().to_vec()),
            other => Err(self.error(column, format!("expected bytes, found {other:?}"))),
        }
    }

    /// A number of any numeric type, as f64; NaN and infinities are errors.
    pub(crate) fn f64(&self, column: &str) -> Result<f64> {
        let v = match self.get(column)? {
            Field::Double(x) => *x,
            Field::Float(x) => *x as f64,
            Field::Byte(x) => *x as f64,
            Field::Short(x) => *x as f64,
            Field::Int(x) => *x as f64,
            Field::Long(x) => *x as f64,
            Field::UByte(x) => *x as f64,
            Field::UShort(x) => *x as f64,
            Field::UInt(x) => *x as f64,
            Field::ULong(x) => *x as f64,
            other => return Err(self.error(column, format!("expected a number, found {other:?}"))),
        };
        if !v.is_finite() {
            return Err(Error::NonFinite(format!(
                "{}: row {}, column `{column}` is {v}",
                self.path.display(),
                self.row
            )));
        }
        Ok(v)
    }

    /// An integer column (or an integral float) as a string id.
    pub(crate) fn id(&self, column: &str) -> Result<String> {
        match self.get(column)? {
            Field::Str(s) => Ok(s.clone()),
            Field::Long(x) => Ok(x.to_string()),
            Field::Int(x) => Ok(x.to_string()),
            Field::ULong(x) => Ok(x.to_string()),
            Field::UInt(x) => Ok(x.to_string()),
            other => Err(self.error(column, format!("expected an id, found {other:?}"))),
        }
    }

    pub(crate) fn bool(&self, column: &str) -> Result<bool> {
        match self.get(column)? {
            Field::Bool(b) => Ok(*b),
            other => Err(self.error(column, format!("expected a boolean, found {other:?}"))),
        }
    }

    /// A timestamp as milliseconds since the Unix epoch.
    pub(crate) fn time_ms(&self, column: &str) -> Result<i64> {
        match self.get(column)? {
            Field::TimestampMillis(ms) => Ok(*ms),
            Field::TimestampMicros(us) => Ok(us.div_euclid(1000)),
            Field::Long(ns) if self.nanos.iter().any(|n| n == column) => {
                Ok(ns.div_euclid(1_000_000))
            }
            other => Err(self.error(column, format!("expected a timestamp, found {other:?}"))),
        }
    }
}
