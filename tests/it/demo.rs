//! `oppsync demo` (the README's first command) runs end to end and ends with the right state.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_replays_its_history_and_marketo_holds_the_expected_records() {
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
    assert!(report.text.contains("Contoso Ltd"), "{}", report.text);
    assert!(
        lines.iter().any(|l| l.contains("-> 202 202 200")),
        "the repeated update was recognised"
    );
}
