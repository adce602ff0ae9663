//! Shared by the CLI integration tests: run the `tiller` binary from the repository root.

use std::path::Path;
use std::process::Command;

/// Runs `tiller args...` from the repository root; returns success and stdout + stderr.
pub fn tiller(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tiller"))
        .current_dir(
            Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo")).join("../.."),
        )
        .env("RUST_BACKTRACE", "0")
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
