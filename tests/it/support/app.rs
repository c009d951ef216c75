//! The real service on a random port with a fresh store, against both simulators.

use std::time::Duration;

use oppsync::app::{RunningApp, StartOptions};
use oppsync::config::Config;
use oppsync::dynamics::compose::NotificationBuilder;
use oppsync::sim::env::{Simulators, eventually};
use oppsync::sim::marketo::MarketoSimConfig;
use oppsync::store::now_ms;

pub const KEY: &str = "test-webhook-key-0001";

pub type ConfigTweak = Box<dyn FnOnce(&mut Config)>;
/// Runs on the simulators before the service starts.
pub type SimsPrepare = Box<dyn FnOnce(&Simulators)>;

pub struct TestEnv {
    pub app: RunningApp,
    pub sims: Simulators,
    pub http: reqwest::Client,
    pub config: Config,
    pub pg: Option<super::pg::TestDatabase>,
    _dir: tempfile::TempDir,
}

#[derive(Default)]
pub struct EnvOptions {
    pub marketo: Option<MarketoSimConfig>,
    pub postgres: bool,
    pub intake_only: bool,
    pub tweak: Option<ConfigTweak>,
    /// Simulators started (and seeded) by the test; `marketo` is then ignored.
    pub sims: Option<Simulators>,
    /// Runs on the simulators before the service starts (e.g. the org WhoAmI answers).
    pub prepare: Option<SimsPrepare>,
}

impl TestEnv {
    pub async fn start() -> TestEnv {
        Self::start_with(EnvOptions::default()).await
    }

    pub async fn start_with(options: EnvOptions) -> TestEnv {
        let dir = tempfile::tempdir().unwrap();
        let sims = match options.sims {
            Some(sims) => sims,
            None => Simulators::start(options.marketo.unwrap_or_default())
                .await
                .unwrap(),
        };
        let (store_url, pg) = if options.postgres {
            let db = super::pg::TestDatabase::create().await.unwrap();
            (db.url.clone(), Some(db))
        } else {
            (
                format!("sqlite://{}", dir.path().join("oppsync.db").display()),
                None,
            )
        };
        if let Some(prepare) = options.prepare {
            prepare(&sims);
        }
        let mut config = sims.service_config(&store_url, KEY);
        Simulators::make_quick(&mut config);
        if let Some(tweak) = options.tweak {
            tweak(&mut config);
        }
        let app = oppsync::app::start(
            config.clone(),
            StartOptions {
                migrate: true,
                intake_only: options.intake_only,
            },
        )
        .await
        .unwrap();
        TestEnv {
            app,
            sims,
            http: reqwest::Client::new(),
            config,
            pg,
            _dir: dir,
        }
    }

    /// Stops the service and starts it again on the same store and simulators, its
    /// configuration changed by `tweak`.
    pub async fn restart(self, tweak: impl FnOnce(&mut Config)) -> TestEnv {
        let TestEnv {
            app,
            sims,
            http,
            mut config,
            pg,
            _dir,
        } = self;
        let intake_only = app.worker.is_none();
        app.stop().await;
        tweak(&mut config);
        let app = oppsync::app::start(
            config.clone(),
            StartOptions {
                migrate: true,
                intake_only,
            },
        )
        .await
        .unwrap();
        TestEnv {
            app,
            sims,
            http,
            config,
            pg,
            _dir,
        }
    }

    pub fn webhook_url(&self) -> String {
        format!("{}/webhooks/dynamics?code={KEY}", self.app.url())
    }

    /// The status a GET of `path` (a probe, say) answers now.
    pub async fn status_of(&self, path: &str) -> u16 {
        self.http
            .get(format!("{}{path}", self.app.url()))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// The status and JSON body a GET of `path` answers now (Null for a body that is not JSON).
    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.app.url()))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// What `/metrics` answers now.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.app.url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Posts a composed notification exactly as Dynamics would.
    pub async fn post(&self, n: &NotificationBuilder) -> reqwest::Response {
        let mut req = self.http.post(self.webhook_url()).body(n.to_json());
        for (k, v) in n.headers() {
            req = req.header(k, v);
        }
        req.send().await.unwrap()
    }

    /// Posts and asserts a 2xx.
    pub async fn deliver(&self, n: &NotificationBuilder) {
        let r = self.post(n).await;
        let status = r.status();
        assert!(
            status.is_success(),
            "{status}: {}",
            r.text().await.unwrap_or_default()
        );
    }

    /// Waits until every notification is applied and every Marketo write settled. Fails the
    /// test (crates.io's TestApp idea) if work is left, or if anything became a dead letter
    /// unless `allow_dead`.
    pub async fn settle(&self) {
        self.settle_within(Duration::from_secs(30), false).await;
    }

    pub async fn settle_within(&self, timeout: Duration, allow_dead: bool) {
        let store = &self.app.state.store;
        let ok = eventually(timeout, || async {
            let s = store.stats(now_ms()).await.unwrap();
            s.inbox_pending == 0 && s.writes_pending == 0
        })
        .await;
        let stats = store.stats(now_ms()).await.unwrap();
        assert!(ok, "work left after {timeout:?}: {stats:?}");
        if !allow_dead {
            let dead = store
                .list_writes(Some(oppsync::store::Status::Dead), None, 20)
                .await
                .unwrap();
            let dead_notifications = store
                .list_notifications(Some(oppsync::store::Status::Dead), None, 20)
                .await
                .unwrap();
            let reasons: Vec<_> = dead_notifications
                .iter()
                .map(|n| (&n.entity, &n.message, &n.last_error))
                .collect();
            assert!(
                stats.inbox_dead == 0 && stats.writes_dead == 0,
                "dead letters: {stats:?} {dead:#?} {reasons:#?}"
            );
        }
    }

    pub async fn stop(self) {
        let pg = self.pg;
        self.app.stop().await;
        if let Some(db) = pg {
            db.drop_now().await;
        }
    }
}
