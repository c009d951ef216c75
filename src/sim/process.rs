//! The real `oppsync serve` binary as a child process, pointed at in-process simulators: what the
//! SIGKILL / SIGTERM tests, the replica tests and the reliability harness drive. The binary's path
//! is passed in (`env!("CARGO_BIN_EXE_oppsync")` in tests and benches).

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::sim::env::Simulators;

pub struct ServeProcess {
    pub child: Child,
    pub url: String,
    pub port: u16,
}

/// A port that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Environment for `oppsync serve` pointed at the simulators and `store_url`, accepting
/// `webhook_key`, with the quick retry settings of the tests.
pub fn serve_env(sims: &Simulators, store_url: &str, port: u16, webhook_key: &str) -> Vec<(String, String)> {
    let c = sims.service_config(store_url, webhook_key);
    let mut v: Vec<(String, String)> = vec![
        ("OPPSYNC__SERVER__LISTEN".into(), format!("127.0.0.1:{port}")),
        ("OPPSYNC__SERVER__SHUTDOWN_GRACE_SECS".into(), "10".into()),
        ("OPPSYNC__STORE__URL".into(), store_url.into()),
        ("OPPSYNC__WEBHOOK__KEYS".into(), webhook_key.into()),
        ("OPPSYNC__MARKETO__BASE_URL".into(), sims.marketo.base_url()),
        ("OPPSYNC__MARKETO__CLIENT_ID".into(), sims.marketo.client_id()),
        (
            "OPPSYNC__MARKETO__CLIENT_SECRET".into(),
            sims.marketo.client_secret(),
        ),
        (
            "OPPSYNC__MARKETO__CALLS_PER_WINDOW".into(),
            c.marketo.calls_per_window.to_string(),
        ),
        (
            "OPPSYNC__MARKETO__WINDOW_SECS".into(),
            c.marketo.window_secs.to_string(),
        ),
        (
            "OPPSYNC__MARKETO__MAX_CONCURRENT".into(),
            c.marketo.max_concurrent.to_string(),
        ),
        ("OPPSYNC__MARKETO__RETRY_BASE_DELAY_MS".into(), "20".into()),
        ("OPPSYNC__MARKETO__RETRY_MAX_DELAY_MS".into(), "400".into()),
        ("OPPSYNC__MARKETO__TIMEOUT_SCALE".into(), "0.1".into()),
        ("OPPSYNC__WORKER__POLL_INTERVAL_MS".into(), "25".into()),
        ("OPPSYNC__WORKER__RETRY_BASE_MS".into(), "50".into()),
        ("OPPSYNC__WORKER__RETRY_MAX_MS".into(), "500".into()),
        ("OPPSYNC__WORKER__LEASE_SECS".into(), "10".into()),
    ];
    let d = &c.dataverse;
    v.push((
        "OPPSYNC__DATAVERSE__ORGANIZATION_HOST".into(),
        d.organization_host.clone().unwrap_or_default(),
    ));
    v.push((
        "OPPSYNC__DATAVERSE__URL".into(),
        d.url.as_ref().map(|u| u.to_string()).unwrap_or_default(),
    ));
    v.push((
        "OPPSYNC__DATAVERSE__TOKEN_URL".into(),
        d.token_url.as_ref().map(|u| u.to_string()).unwrap_or_default(),
    ));
    v.push((
        "OPPSYNC__DATAVERSE__CLIENT_ID".into(),
        d.client_id.clone().unwrap_or_default(),
    ));
    v.push((
        "OPPSYNC__DATAVERSE__CLIENT_SECRET".into(),
        d.client_secret
            .as_ref()
            .map(|s| s.expose().to_owned())
            .unwrap_or_default(),
    ));
    v
}

/// Sets `key` in `env`, replacing an earlier value.
pub fn set_env(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    env.retain(|(k, _)| k != key);
    env.push((key.to_owned(), value.to_owned()));
}

impl ServeProcess {
    /// Starts `<binary> serve --migrate` and waits until it answers /healthz (10 s at most).
    pub async fn start(binary: &Path, env: &[(String, String)], port: u16) -> anyhow::Result<ServeProcess> {
        Self::start_logging(binary, env, port, None).await
    }

    /// As `start`, appending the service's stderr (RUST_LOG=warn) to `log` when given.
    pub async fn start_logging(
        binary: &Path,
        env: &[(String, String)],
        port: u16,
        log: Option<&Path>,
    ) -> anyhow::Result<ServeProcess> {
        let stderr = match log {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?,
            ),
            None => Stdio::null(),
        };
        let child = Command::new(binary)
            // Its own process group: a Ctrl-C or a signal sent to the harness's group must not
            // stop the service under test behind the harness's back.
            .process_group(0)
            .args(["serve", "--migrate"])
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning {}", binary.display()))?;
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let mut process = ServeProcess { child, url, port };
        for _ in 0..400 {
            if let Ok(r) = http.get(format!("{}/healthz", process.url)).send().await
                && r.status().is_success()
            {
                return Ok(process);
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                bail!("oppsync serve exited early: {status}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let _ = process.child.kill();
        let _ = process.child.wait();
        bail!("oppsync serve did not become healthy")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `-TERM`) to the process.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill {signal} {} failed: {status}", self.child.id());
        }
        Ok(())
    }

    /// SIGKILL, and reaps the process.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit; None if it did not within `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Peak resident memory of the process so far, in KiB (`VmHWM` of /proc/PID/status).
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
