//! The bounded fuzz run of full mode: `cargo +nightly fuzz run decode_notification` for a fixed
//! time, its corpus seeded from tests/fixtures/dynamics (see fuzz/README.md).

use std::path::Path;
use std::process::Command;

use crate::common::Report;

pub fn run(seconds: u64) -> Report {
    let mut report = Report::new(
        "fuzz (decode_notification)",
        "libFuzzer runs for the whole time budget with 0 crashes",
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let have = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have {
        report.skipped =
            Some("cargo-fuzz or the nightly toolchain is not installed (see fuzz/README.md)".into());
        return report;
    }
    let corpus = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            report.fail(format!("tempdir: {e}"));
            return report;
        }
    };
    let output = Command::new("cargo")
        .current_dir(root)
        .env_remove("CARGO_TARGET_DIR")
        .args(["+nightly", "fuzz", "run", "decode_notification"])
        .arg(corpus.path())
        .arg(root.join("tests/fixtures/dynamics"))
        .args(["--", &format!("-max_total_time={seconds}"), "-rss_limit_mb=1024"])
        .output();
    let output = match output {
        Ok(o) => o,
        Err(e) => {
            report.fail(format!("running cargo fuzz: {e}"));
            return report;
        }
    };
    let log = String::from_utf8_lossy(&output.stderr);
    let done = log
        .lines()
        .find_map(|l| l.strip_prefix("Done "))
        .map(str::to_owned);
    let crashed = !output.status.success() || log.contains("SUMMARY: libFuzzer") || log.contains("panicked");
    let corpus_size = std::fs::read_dir(corpus.path()).map(|d| d.count()).unwrap_or(0);
    report.row("executions", done.clone().unwrap_or_else(|| "n/a".into()));
    report.row("new corpus entries", corpus_size);
    report.row("crashes", usize::from(crashed));
    report.check(done.is_some(), "libFuzzer did not report its runs");
    if crashed {
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        report.fail(format!(
            "fuzzing found a crash or failed: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    report
}
