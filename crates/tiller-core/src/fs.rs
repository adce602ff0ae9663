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
            "{} already exists; choose a new path (nothing was written)",
            path.display()
        )));
    }
    Ok(())
}

/// Builds the new folder `path`: `build` writes into a hidden sibling (`dir/.name.tmp`, emptied
/// first), which is renamed to `path` once `build` succeeds and removed if it fails, so a failed
/// or interrupted build never leaves half a folder at `path`.
pub fn build_folder<T>(path: &Path, build: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("folder");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    let built = (|| {
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let value = build(&tmp)?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        Ok(value)
    })();
    if built.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    built
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

    #[test]
    fn a_built_folder_appears_whole_or_not_at_all() {
        let dir = std::env::temp_dir().join(format!("tiller-core-build-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("model");
        let failed: Result<()> = build_folder(&out, |tmp| {
            atomic_write(&tmp.join("half.txt"), b"x")?;
            Err(Error::invalid("stopped halfway"))
        });
        assert!(failed.unwrap_err().to_string().contains("stopped halfway"));
        assert!(!out.exists() && !dir.join(".model.tmp").exists());
        let n = build_folder(&out, |tmp| {
            atomic_write(&tmp.join("a.txt"), b"a")?;
            Ok(7)
        })
        .unwrap();
        assert_eq!(n, 7);
        assert_eq!(std::fs::read(out.join("a.txt")).unwrap(), b"a");
        assert!(!dir.join(".model.tmp").exists());
        let e = ensure_new(&out).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
