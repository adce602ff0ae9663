//! Shared by the CLI integration tests: run the `tiller` binary from the repository root.

use std::path::Path;
use std::process::Command;

/// Runs `tiller args...` from the repository root; returns success and stdout + stderr.
pub fn tiller(args: &[&str]) -> (bool, String) {
    tiller_in(
        &Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo")).join("../.."),
        args,
    )
}

/// Runs `tiller args...` from `dir` (which must exist), as a user would from anywhere.
pub fn tiller_in(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tiller"))
        .current_dir(dir)
        .env("RUST_BACKTRACE", "0")
        .env_remove("TILLER_HOME")
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Resumes the run in `out` of `command` (`["base", "train"]`, `["align"]`) with one `--set`.
#[allow(dead_code)] // not every test binary resumes runs
pub fn resume_with_set(command: &[&str], out: &str, set: &str) -> (bool, String) {
    let mut args = command.to_vec();
    args.extend_from_slice(&["--out", out, "--resume", "latest", "--set", set]);
    tiller(&args)
}
