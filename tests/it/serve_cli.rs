//! `oppsync serve` as a new user runs it: its logs when they go to a file or a pipe, a requested
//! shutdown, and a first start on a store that does not exist yet.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use oppsync::dynamics::compose::NotificationBuilder;
use oppsync::sim::env::Simulators;
use oppsync::sim::org::{Customer, DynamicsOrg};
use oppsync::store::Store;
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::support::app::KEY;
use crate::support::process::{free_port, serve_env};

/// `oppsync serve <args>` with its stderr (the logs) written to a file: not a terminal.
struct Serve {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Serve {
    fn start(env: &[(String, String)], port: u16, args: &[&str], log: &Path) -> Serve {
        let child = Command::new(env!("CARGO_BIN_EXE_oppsync"))
            .arg("serve")
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env_remove("NO_COLOR")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        Serve {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log: log.to_owned(),
        }
    }

    /// Waits until `path` answers 200; false if it did not within 20 s or the process exited.
    async fn answers(&mut self, path: &str) -> bool {
        let http = reqwest::Client::new();
        for _ in 0..800 {
            if let Ok(r) = http.get(format!("{}{path}", self.url)).send().await
                && r.status().is_success()
            {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    async fn exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// The first log line that `matches`, once one is written (`None` if none is within
    /// `within`).
    async fn line_within(&self, matches: impl Fn(&str) -> bool, within: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(line) = self.log().lines().find(|l| matches(l)) {
                return Some(line.to_owned());
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Posts `n` as Dynamics would, with webhook key `key`; the answer's status.
    async fn post(&self, key: &str, n: &NotificationBuilder) -> u16 {
        let mut post = reqwest::Client::new()
            .post(format!("{}/webhooks/dynamics?code={key}", self.url))
            .body(n.to_json());
        for (k, v) in n.headers() {
            post = post.header(k, v);
        }
        post.send().await.unwrap().status().as_u16()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn sims() -> Simulators {
    Simulators::start(Default::default()).await.unwrap()
}

fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("oppsync.db").display())
}

#[tokio::test]
async fn text_logs_to_a_file_carry_no_terminal_escape_codes() {
    let sims = sims().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let env = serve_env(&sims, &sqlite_url(dir.path()), port);
    let mut serve = Serve::start(&env, port, &["--migrate"], &dir.path().join("serve.log"));
    assert!(serve.answers("/healthz").await, "{}", serve.log());
    serve.sigterm();
    assert!(serve.exit(Duration::from_secs(20)).await.is_some());
    let log = serve.log();
    assert!(log.contains("oppsync listening"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a log that is not a terminal:\n{log:?}"
    );
}

#[tokio::test]
async fn sigterm_stops_serve_cleanly_with_no_error_line() {
    let sims = sims().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let env = serve_env(&sims, &sqlite_url(dir.path()), port);
    // Several stops: which of the finished parts the service notices first is a race.
    for round in 0..3 {
        let log = dir.path().join(format!("serve-{round}.log"));
        let mut serve = Serve::start(&env, port, &["--migrate"], &log);
        assert!(serve.answers("/readyz").await, "{}", serve.log());
        serve.sigterm();
        let status = serve
            .exit(Duration::from_secs(20))
            .await
            .expect("serve did not stop");
        let log = serve.log();
        assert!(status.success(), "{status}:\n{log}");
        assert!(log.contains("stopped"), "{log}");
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
        assert!(errors.is_empty(), "a requested stop logged errors: {errors:#?}");
    }
}

#[tokio::test]
async fn serve_on_a_new_sqlite_path_creates_the_schema_and_comes_up_ready_without_migrate() {
    let sims = sims().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = dir.path().join("new").join("oppsync.db");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    assert!(!path.exists());
    let url = format!("sqlite://{}", path.display());
    let env = serve_env(&sims, &url, port);
    let mut serve = Serve::start(&env, port, &[], &dir.path().join("serve.log"));
    assert!(serve.answers("/readyz").await, "not ready:\n{}", serve.log());
    serve.sigterm();
    assert!(serve.exit(Duration::from_secs(20)).await.is_some());
    let store = Store::connect(&url, 2).await.unwrap();
    store.ensure_schema().await.unwrap();
}

#[tokio::test]
async fn serve_still_refuses_an_older_schema_without_migrate() {
    let sims = sims().await;
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    let store = Store::connect(&url, 2).await.unwrap();
    store.migrate_to(1).await.unwrap();
    store.ensure_schema().await.unwrap_err();
    drop(store);
    let port = free_port();
    let env = serve_env(&sims, &url, port);
    let mut serve = Serve::start(&env, port, &[], &dir.path().join("serve.log"));
    let status = serve
        .exit(Duration::from_secs(20))
        .await
        .expect("serve did not exit");
    let log = serve.log();
    assert!(!status.success(), "{log}");
    assert!(log.contains("migration"), "{log}");
    // Nothing was applied behind the operator's back.
    let store = Store::connect(&url, 2).await.unwrap();
    assert!(store.ensure_schema().await.is_err());
    // With --migrate it starts.
    let mut serve = Serve::start(&env, port, &["--migrate"], &dir.path().join("serve2.log"));
    assert!(serve.answers("/readyz").await, "{}", serve.log());
}

#[tokio::test]
async fn serve_says_at_start_that_a_recorded_pause_holds_with_worker_paused_false() {
    let sims = sims().await;
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    let store = Store::connect(&url, 2).await.unwrap();
    store.migrate().await.unwrap();
    store.set_paused(true).await.unwrap();
    let port = free_port();
    let env = serve_env(&sims, &url, port);
    let mut serve = Serve::start(&env, port, &[], &dir.path().join("serve.log"));
    assert!(serve.answers("/healthz").await, "{}", serve.log());
    serve.sigterm();
    assert!(serve.exit(Duration::from_secs(20)).await.is_some());
    let log = serve.log();
    let line = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("paused"))
        .unwrap_or_else(|| panic!("no WARN about the pause:\n{log}"));
    assert!(line.contains("/admin/resume"), "{line}");
    assert!(store.paused().await.unwrap(), "the pause still holds");
}

/// A Marketo write that becomes a dead letter is said in the log, once, at WARN, with the
/// record, the cause and the call that retries it: not only in /metrics.
#[tokio::test]
async fn a_dead_letter_is_logged_once_at_warn_with_its_record_reason_and_retry() {
    let sims = sims().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // A Marketo nothing listens on: bound, then closed.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut env = serve_env(&sims, &sqlite_url(dir.path()), port);
    env.retain(|(k, _)| k != "OPPSYNC__MARKETO__BASE_URL");
    env.extend([
        (
            "OPPSYNC__MARKETO__BASE_URL".to_owned(),
            format!("http://{closed}"),
        ),
        ("OPPSYNC__MARKETO__MAX_RETRIES".to_owned(), "0".to_owned()),
        ("OPPSYNC__WORKER__MAX_ATTEMPTS".to_owned(), "1".to_owned()),
    ]);
    let mut serve = Serve::start(&env, port, &[], &dir.path().join("serve.log"));
    assert!(serve.answers("/readyz").await, "{}", serve.log());
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(sims.dataverse.clone()));
    let (id, n) = org.create_opportunity(
        "Unreachable",
        Customer::Account(Uuid::new_v4()),
        Decimal::new(1, 0),
        1,
    );
    assert_eq!(serve.post(KEY, &n).await, 202);
    let record = format!("opportunity:{id}");
    serve
        .line_within(
            |l| l.contains("dead-lettered") && l.contains(&record),
            Duration::from_secs(30),
        )
        .await;
    // Let a second line, if there were one, reach the file.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = serve.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("dead-lettered") && l.contains(&record))
        .collect();
    assert_eq!(lines.len(), 1, "one line per dead letter:\n{log}");
    let line = lines[0];
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.to_lowercase().contains("connection refused"),
        "the cause: {line}"
    );
    assert!(
        line.contains(&format!("POST /admin/writes/{record}/retry")),
        "how to retry it: {line}"
    );
    assert!(!line.contains(&sims.marketo.client_secret()), "{line}");
}

/// A failing readiness probe is logged once when readiness changes, not on every probe, and
/// the way back is logged once too.
#[tokio::test]
async fn a_readiness_flap_is_logged_once_per_change() {
    let sims = sims().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = sqlite_url(dir.path());
    let env = serve_env(&sims, &url, port);
    let mut serve = Serve::start(&env, port, &[], &dir.path().join("serve.log"));
    assert!(serve.answers("/readyz").await, "{}", serve.log());
    // Another process marks a migration as not applied: the schema is behind, readiness fails.
    let db = sqlx::SqlitePool::connect(&url).await.unwrap();
    let mark = |ok: bool| {
        sqlx::query("UPDATE _sqlx_migrations SET success = ? WHERE version = 1")
            .bind(ok)
            .execute(&db)
    };
    mark(false).await.unwrap();
    let http = reqwest::Client::new();
    let probe = || async {
        http.get(format!("{}/readyz", serve.url))
            .send()
            .await
            .unwrap()
            .status()
    };
    for _ in 0..10 {
        assert_eq!(probe().await, 503);
    }
    mark(true).await.unwrap();
    for _ in 0..5 {
        assert_eq!(probe().await, 200);
    }
    let log = serve.log();
    let not_ready: Vec<&str> = log.lines().filter(|l| l.contains("not ready")).collect();
    assert_eq!(not_ready.len(), 1, "ten failing probes, one line:\n{log}");
    assert!(
        not_ready[0].contains("ERROR") && not_ready[0].contains("migration"),
        "{log}"
    );
    let ready = log
        .lines()
        .filter(|l| l.contains("ready to take webhooks"))
        .count();
    assert_eq!(ready, 2, "ready at start and again after the flap:\n{log}");
    assert!(!log.contains("response failed"), "{log}");
}

/// At debug level too, no log line holds a webhook key, right or wrong; a failed
/// authentication is a WARN with the caller's address.
#[tokio::test]
async fn no_log_level_shows_the_webhook_key_and_failed_authentications_are_warned() {
    let sims = sims().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut env = serve_env(&sims, &sqlite_url(dir.path()), port);
    env.push(("RUST_LOG".to_owned(), "debug".to_owned()));
    let mut serve = Serve::start(&env, port, &[], &dir.path().join("serve.log"));
    assert!(serve.answers("/readyz").await, "{}", serve.log());
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(sims.dataverse.clone()));
    let (_, n) = org.create_opportunity("Logged", Customer::Account(Uuid::new_v4()), Decimal::new(1, 0), 1);
    let wrong = "wrong-key-0000-9999";
    for (key, expected) in [(KEY, 202), (wrong, 401)] {
        assert_eq!(serve.post(key, &n).await, expected);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = serve.log();
    assert!(log.contains("DEBUG"), "the log is at debug level: {log}");
    assert!(!log.contains(KEY), "the webhook key is in the log");
    assert!(!log.contains(wrong), "a presented wrong key is in the log");
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("authentication failed"))
        .collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(
        warned[0].contains("WARN") && warned[0].contains("127.0.0.1"),
        "{}",
        warned[0]
    );
}

/// Dynamics's `x-ms-correlation-request-id` is on the line that records the notification, so a
/// System Job in Dynamics can be matched to oppsync's log. Read from the real process's log:
/// tracing's callsite cache is process-wide, so a subscriber set for one test of a shared test
/// binary could miss events that other threads registered first.
#[tokio::test]
async fn the_correlation_request_id_header_is_logged() {
    let sims = sims().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let env = serve_env(&sims, &sqlite_url(dir.path()), port);
    let mut serve = Serve::start(&env, port, &[], &dir.path().join("serve.log"));
    assert!(serve.answers("/healthz").await, "{}", serve.log());
    let n = NotificationBuilder::contact_create(Uuid::new_v4(), 1_750_000_000_000);
    let correlation = n
        .headers()
        .into_iter()
        .find_map(|(k, v)| (k == "x-ms-correlation-request-id").then_some(v))
        .unwrap();
    assert_eq!(serve.post(KEY, &n).await, 202);
    let stored = serve
        .line_within(|l| l.contains("notification stored"), Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("no \"notification stored\" line:\n{}", serve.log()));
    assert!(
        stored.contains(&format!("correlation_request_id={correlation}")),
        "{stored}"
    );
}

/// File descriptors run out while serving (idle connections under a low `ulimit -n`): a
/// notification committed meanwhile is still made durable and answered 202 (the inbox log is
/// held open, not opened again per group), intake is not latched off, and once the idle
/// connections are cut by the header timeout the service takes webhooks as before.
#[tokio::test]
async fn running_out_of_descriptors_does_not_stop_intake() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sims = sims().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut env = serve_env(&sims, &sqlite_url(dir.path()), port);
    env.push((
        "OPPSYNC__SERVER__HEADER_READ_TIMEOUT_SECS".to_owned(),
        "3".to_owned(),
    ));
    let log = dir.path().join("serve.log");
    let child = Command::new("bash")
        .args(["-c", "ulimit -n 96 && exec \"$0\" serve"])
        .arg(env!("CARGO_BIN_EXE_oppsync"))
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut serve = Serve {
        child,
        url: format!("http://127.0.0.1:{port}"),
        log,
    };
    assert!(serve.answers("/readyz").await, "{}", serve.log());
    let mut org = DynamicsOrg::new(1_750_000_000_000, Some(sims.dataverse.clone()));
    let (_, first) =
        org.create_opportunity("Before", Customer::Account(Uuid::new_v4()), Decimal::new(1, 0), 1);
    assert_eq!(serve.post(KEY, &first).await, 202);

    // A webhook whose headers are in, its body held back.
    let (_, during) =
        org.create_opportunity("During", Customer::Account(Uuid::new_v4()), Decimal::new(1, 0), 1);
    let body = during.to_json();
    let addr = format!("127.0.0.1:{port}");
    let mut held = tokio::net::TcpStream::connect(&addr).await.unwrap();
    held.write_all(
        format!(
            "POST /webhooks/dynamics?code={KEY} HTTP/1.1\r\nHost: oppsync\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Every descriptor the service may open is taken by idle connections.
    let mut idle = Vec::new();
    for _ in 0..150 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    held.write_all(body.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(20), held.read_to_string(&mut answer))
        .await
        .expect("no answer")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}\n{}", serve.log());
    let log = serve.log();
    assert!(
        log.contains("could not accept a connection"),
        "descriptors did run out:\n{log}"
    );
    drop(idle);
    // The idle ones are cut, descriptors come back: intake as before, liveness green.
    let (_, after) =
        org.create_opportunity("After", Customer::Account(Uuid::new_v4()), Decimal::new(1, 0), 1);
    let status = tokio::time::timeout(Duration::from_secs(20), serve.post(KEY, &after))
        .await
        .expect("no answer after the descriptors came back");
    assert_eq!(status, 202, "{}", serve.log());
    assert!(serve.answers("/healthz").await);
}

/// The README's "Trying it by hand" lines, run exactly as written (in a scratch directory that
/// holds the repository's `tests/`, with the built `oppsync` first on the PATH): the sample
/// opportunity reaches the Marketo simulator with its role, lead and company, and nothing
/// becomes a dead letter.
#[tokio::test]
async fn the_readmes_by_hand_lines_sync_the_sample_opportunity() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme
        .find("**Trying it by hand**")
        .expect("the README has the section")..];
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a sh block")
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests"),
        dir.path().join("tests"),
    )
    .unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_oppsync"))
        .parent()
        .unwrap()
        .to_owned();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let script = format!(
        "{block}\necho; echo METRICS; curl -s http://127.0.0.1:8080/metrics | grep '^oppsync_dead_letters'\n"
    );
    // Into files, not pipes: the service and the simulators the lines start in the background
    // keep their inherited descriptors open after the script ends.
    let out_path = dir.path().join("script.out");
    let err_path = dir.path().join("script.err");
    let mut child = Command::new("bash");
    child
        .args(["-c", &script])
        .current_dir(dir.path())
        .env("PATH", path)
        .env_remove("RUST_LOG")
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    for (name, _) in std::env::vars() {
        if name.starts_with("OPPSYNC") {
            child.env_remove(name);
        }
    }
    std::os::unix::process::CommandExt::process_group(&mut child, 0);
    let mut child = child.spawn().unwrap();
    let group = child.id();
    let finished = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || child.wait()),
    )
    .await;
    // The simulators and the service were started in the background: stop them.
    let _ = Command::new("kill")
        .args(["-TERM", "--", &format!("-{group}")])
        .status();
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(
        finished.is_ok(),
        "the lines did not finish within 120 s:\n{stdout}\n{stderr}"
    );
    let serve_log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default();
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}\nserve.log:\n{serve_log}");
    assert!(stdout.contains("\"status\":\"stored\""), "{context}");
    let state = stdout.split("METRICS").next().unwrap_or("");
    for expected in [
        "d3b1e0a2-4c5f-ef11-8409-000d3a5b1c2d",
        "James Glynn - 20 seats",
        "james.glynn@contoso.com",
        "Contoso Pharmaceuticals",
        "Potential Customer",
    ] {
        assert!(state.contains(expected), "Marketo lacks {expected}: {context}");
    }
    // Each push cycle says what it did, at INFO.
    assert!(
        serve_log.lines().any(|l| l.contains("push cycle settled")
            && l.contains("calls=")
            && l.contains("opportunities done: 1")),
        "{context}"
    );
    let metrics = stdout.split("METRICS").nth(1).unwrap_or("");
    assert!(
        metrics
            .lines()
            .filter(|l| l.starts_with("oppsync_dead_letters"))
            .all(|l| l.ends_with(" 0")),
        "dead letters: {context}"
    );
}
