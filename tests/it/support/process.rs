//! The real `oppsync` binary as a child process (for SIGKILL / SIGTERM tests and replicas).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use oppsync::sim::env::Simulators;

pub struct ServeProcess {
    pub child: Child,
    pub url: String,
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Environment for `oppsync serve` pointed at the simulators and `store_url`.
pub fn serve_env(sims: &Simulators, store_url: &str, port: u16) -> Vec<(String, String)> {
    let c = sims.service_config(store_url, super::app::KEY);
    let mut v = vec![
        ("OPPSYNC__SERVER__LISTEN".into(), format!("127.0.0.1:{port}")),
        ("OPPSYNC__SERVER__SHUTDOWN_GRACE_SECS".into(), "10".into()),
        ("OPPSYNC__STORE__URL".into(), store_url.into()),
        ("OPPSYNC__WEBHOOK__KEYS".into(), super::app::KEY.into()),
        ("OPPSYNC__MARKETO__BASE_URL".into(), sims.marketo.base_url()),
        ("OPPSYNC__MARKETO__CLIENT_ID".into(), sims.marketo.client_id()),
        (
            "OPPSYNC__MARKETO__CLIENT_SECRET".into(),
            sims.marketo.client_secret(),
        ),
        (
            "OPPSYNC__MARKETO__CALLS_PER_20S".into(),
            c.marketo.calls_per_20s.to_string(),
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

impl ServeProcess {
    /// Starts `oppsync serve --migrate` and waits until it answers /healthz.
    pub async fn start(env: &[(String, String)], port: u16) -> ServeProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_oppsync"))
            .args(["serve", "--migrate"])
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let mut process = ServeProcess { child, url };
        for _ in 0..400 {
            if let Ok(r) = http.get(format!("{}/healthz", process.url)).send().await
                && r.status().is_success()
            {
                return process;
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!("oppsync serve exited early: {status}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let _ = process.child.kill();
        panic!("oppsync serve did not become healthy");
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn kill9(&mut self) {
        self.signal("-KILL");
        let _ = self.child.wait();
    }

    /// Waits for the process to exit; None if it did not within `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
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
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
