//! `oppsync demo` (the README's first command) runs end to end, tells its story and ends with
//! the right state: its output, but for the addresses, the timing and the call counts, is the
//! golden file `tests/golden/demo.txt` (`OPPSYNC_UPDATE_GOLDEN=1` rewrites it).

/// The demo's lines without what differs between runs: the listening addresses (random ports),
/// the drain time and the per-endpoint call counts (batching follows timing).
fn stable(lines: &[String], report: &str) -> String {
    let mut out: Vec<String> = lines
        .iter()
        .filter(|l| !l.starts_with("oppsync is listening") && !l.starts_with("Marketo simulator at"))
        .cloned()
        .collect();
    for line in report.lines() {
        if line.starts_with("Marketo calls") {
            break;
        }
        match line.find("queue drained in") {
            Some(at) => {
                let rest = &line[at..];
                let tail = rest.find(';').map_or("", |e| &rest[e..]);
                out.push(format!("{}queue drained in (time){tail}", &line[..at]));
            }
            None => out.push(line.to_owned()),
        }
    }
    out.join("\n").trim().to_owned() + "\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_tells_its_story_and_marketo_holds_the_expected_records() {
    let mut lines = Vec::new();
    let report = oppsync::demo::run(|l| lines.push(l.to_owned())).await.unwrap();
    assert_eq!(report.notifications, 20);
    assert_eq!(
        report.opportunities, 2,
        "the deleted opportunity is gone:\n{}",
        report.text
    );
    assert_eq!(report.roles, 3, "{}", report.text);
    assert!(report.text.contains("dead letters: 0"), "{}", report.text);
    assert!(
        lines.iter().any(|l| l.contains("webhooks answered: 202 202 200")),
        "the repeated update was recognised"
    );
    let golden_path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/demo.txt");
    let actual = stable(&lines, &report.text);
    if std::env::var_os("OPPSYNC_UPDATE_GOLDEN").is_some() {
        std::fs::write(golden_path, &actual).unwrap();
    }
    let golden = std::fs::read_to_string(golden_path).unwrap_or_default();
    assert!(
        actual == golden,
        "the demo's output differs from tests/golden/demo.txt (OPPSYNC_UPDATE_GOLDEN=1 rewrites it after a deliberate change):\n--- golden\n{golden}\n--- actual\n{actual}"
    );
}
