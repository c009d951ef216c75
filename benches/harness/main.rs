//! The reliability and performance harness: drives the real `oppsync serve` binary over HTTP
//! against the in-process Marketo and Dataverse simulators and prints figures per scenario,
//! each with PASS/FAIL against its criterion. Exits non-zero if any fails.
//!
//! ```sh
//! cargo bench --bench harness -- --mode short          # crash, faults, bad input (CI)
//! cargo bench --bench harness -- --mode full           # all scenarios, full sizes, fuzzing
//! cargo bench --bench harness -- --mode full --only load,backlog
//! cargo bench --bench harness -- --only soak --minutes 20   # not in the default runs
//! ```
//!
//! Scenarios: crash (SIGKILL during load, SQLite and PostgreSQL), faults, load, backlog,
//! badinput, fuzz. PostgreSQL at OPPSYNC_TEST_PG_URL (default
//! postgres://postgres@127.0.0.1:5432/test).

mod backlog;
mod badinput;
mod common;
mod crash;
mod faults;
mod fuzz;
mod load;
mod soak;

use std::collections::BTreeSet;
use std::time::Instant;

use common::Report;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Short,
    Full,
}

impl Mode {
    pub fn pick<T>(self, short: T, full: T) -> T {
        match self {
            Mode::Short => short,
            Mode::Full => full,
        }
    }
}

const ALL: [&str; 7] = ["crash", "faults", "load", "backlog", "badinput", "fuzz", "soak"];

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench harness -- [--mode short|full] [--only {}] [--minutes N (soak)]",
        ALL.join(",")
    );
    std::process::exit(2)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut mode = Mode::Short;
    let mut only: Option<BTreeSet<String>> = None;
    let mut soak_minutes = 20.0;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mode" => match args.next().as_deref() {
                Some("short") => mode = Mode::Short,
                Some("full") => mode = Mode::Full,
                _ => usage(),
            },
            "--only" => {
                let list: BTreeSet<String> = args
                    .next()
                    .unwrap_or_else(|| usage())
                    .split(',')
                    .map(str::to_owned)
                    .collect();
                if list.iter().any(|s| !ALL.contains(&s.as_str())) {
                    usage();
                }
                only = Some(list);
            }
            "--minutes" => {
                soak_minutes = args
                    .next()
                    .and_then(|m| m.parse().ok())
                    .filter(|m: &f64| *m > 0.0)
                    .unwrap_or_else(|| usage());
            }
            // `cargo bench` passes --bench to harness = false targets.
            "--bench" | "--nocapture" => {}
            _ => usage(),
        }
    }
    let defaults: &[&str] = match mode {
        Mode::Short => &["crash", "faults", "badinput"],
        // The soak takes twenty minutes: only when asked for.
        Mode::Full => &ALL[..6],
    };
    let selected = |name: &str| match &only {
        Some(list) => list.contains(name),
        None => defaults.contains(&name),
    };
    println!(
        "oppsync reliability and performance harness: mode {mode:?}, {} cores, binary {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        common::binary().display()
    );
    let started = Instant::now();
    let mut reports: Vec<(Report, f64)> = Vec::new();
    let mut timed = |r: Vec<Report>, t: Instant| {
        let s = t.elapsed().as_secs_f64();
        for r in r {
            r.print();
            reports.push((r, s));
        }
    };
    if selected("badinput") {
        let t = Instant::now();
        timed(vec![badinput::run().await], t);
    }
    if selected("crash") {
        let t = Instant::now();
        timed(crash::run(mode).await, t);
    }
    if selected("faults") {
        let t = Instant::now();
        timed(vec![faults::run(mode).await], t);
    }
    if selected("load") {
        let t = Instant::now();
        timed(vec![load::run(mode.pick(2, 5)).await], t);
    }
    if selected("backlog") {
        let t = Instant::now();
        timed(vec![backlog::run(mode.pick(10_000, 100_000)).await], t);
    }
    if selected("soak") {
        let t = Instant::now();
        timed(vec![soak::run(soak_minutes).await], t);
    }
    if selected("fuzz") {
        let t = Instant::now();
        timed(vec![fuzz::run(mode.pick(20, 60))], t);
    }
    println!(
        "\n== summary ({mode:?} mode, {:.0} s)",
        started.elapsed().as_secs_f64()
    );
    println!("{:<34} {:>6} {:>8}", "scenario", "result", "time");
    let mut failed = 0;
    for (r, s) in &reports {
        println!("{:<34} {:>6} {:>7.0}s", r.name, r.verdict(), s);
        failed += usize::from(!r.failures.is_empty());
    }
    println!("harness: {} passed, {failed} failed", reports.len() - failed);
    if failed > 0 {
        std::process::exit(1);
    }
}
