//! File writes that never leave a half-written file where a good one was.

use crate::{Error, Result};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` through a synced temporary file in the same folder and a rename (atomic
/// on one file system): readers see the old content or the new, never a truncated file.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Refuses a folder or file that already exists, so that nothing there is overwritten.
pub fn ensure_new(path: &Path) -> Result<()> {
    if path.exists() {
        return Err(Error::invalid(format!(
            "{} already exists; choose a new folder (nothing was written)",
            path.display()
        )));
    }
    Ok(())
}

/// A hidden sibling of `path` (`dir/.name.tmp`) to build a folder in before renaming it into
/// place, so that a crash never leaves half a folder at `path`.
pub fn temporary_sibling(path: &Path) -> std::path::PathBuf {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("folder");
    path.with_file_name(format!(".{name}.tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("tiller-core-fs-{}", std::process::id()));
        let p = dir.join("a/b.txt");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
        // A path whose parent is a file fails with the path named, and writes nothing.
        let e = atomic_write(&p.join("c"), b"x").unwrap_err().to_string();
        assert!(e.contains("b.txt"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
