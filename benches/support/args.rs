//! Command-line flags of the benchmarks, shared by the bench targets (each includes this file
//! with `#[path]`; a folder without `main.rs` is not a bench target of its own).

/// The value given after `flag` on the command line, if any and if it parses.
pub fn value_after<T: std::str::FromStr>(flag: &str) -> Option<T> {
    std::env::args()
        .skip_while(|a| a != flag)
        .nth(1)
        .and_then(|v| v.parse().ok())
}
