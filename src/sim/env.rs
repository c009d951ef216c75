//! Both simulators together, and a service configuration pointed at them: what `oppsync demo`,
//! the end-to-end tests and the benchmarks run the real service against.

use crate::config::{Config, Secret};
use crate::sim::dataverse::{DataverseSim, DataverseSimHandle};
use crate::sim::marketo::{MarketoSim, MarketoSimConfig, MarketoSimHandle};

pub struct Simulators {
    pub marketo: MarketoSimHandle,
    pub marketo_config: MarketoSimConfig,
    pub dataverse: DataverseSimHandle,
}

impl Simulators {
    pub async fn start(marketo: MarketoSimConfig) -> std::io::Result<Simulators> {
        let handle = MarketoSim::start(marketo.clone()).await?;
        let dataverse = DataverseSim::start().await?;
        Ok(Simulators {
            marketo: handle,
            marketo_config: marketo,
            dataverse,
        })
    }

    /// A service configuration that talks to these simulators, listens on a free loopback
    /// port, stores in `store_url` and accepts `webhook_key`. Limits match the simulated
    /// instance's, so the client paces itself exactly as it would against the real one.
    pub fn service_config(&self, store_url: &str, webhook_key: &str) -> Config {
        let mut c = Config::default();
        c.server.listen = "127.0.0.1:0".into();
        c.server.shutdown_grace_secs = 5;
        c.store.url = Secret::new(store_url);
        c.webhook.keys = vec![Secret::new(webhook_key)];
        let m = &self.marketo_config;
        c.marketo.base_url = url::Url::parse(&self.marketo.base_url()).ok();
        c.marketo.client_id = Some(self.marketo.client_id());
        c.marketo.client_secret = Some(Secret::new(self.marketo.client_secret()));
        c.marketo.calls_per_window = m.calls_per_window;
        c.marketo.window_secs = m.window.as_secs_f64();
        c.marketo.max_concurrent = m.max_concurrent;
        c.marketo.daily_quota = m.daily_quota;
        c.dataverse = self.dataverse.config();
        // Composed notifications name this host, as a real org names its own domain.
        c.dataverse.organization_host =
            Some(crate::dynamics::compose::DEFAULT_ORGANIZATION_DOMAIN.to_owned());
        c.worker.poll_interval_ms = 25;
        c
    }

    /// Knobs that make retries quick, for tests and the demo (seconds become milliseconds).
    pub fn make_quick(config: &mut Config) {
        config.marketo.retry_base_delay_ms = 20;
        config.marketo.retry_max_delay_ms = 400;
        config.marketo.timeout_scale = 0.05;
        config.marketo.batch_linger_ms = 0;
        config.worker.retry_base_ms = 50;
        config.worker.retry_max_ms = 500;
        config.dataverse.max_rate_limit_wait_secs = 10;
    }
}

/// Polls `check` every 20 ms until it holds or `timeout` passes (tests and the harness).
#[cfg(feature = "testing")]
pub async fn eventually<F, Fut>(timeout: std::time::Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
