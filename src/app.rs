//! Builds and runs the service: store, intake, worker and HTTP server. Shared by `serve`,
//! `demo` and the tests (which start it on port 0 with a fresh store).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::dynamics::organization::Organization;
use crate::dynamics::webapi::DataverseClient;
use crate::http::auth::JwtVerifier;
use crate::http::{AppContext, AppState};
use crate::marketo::MarketoClient;
use crate::service::Lifecycle;
use crate::store::{GroupCommitter, Store};
use crate::worker::{WorkerContext, WorkerControl};

#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Apply pending migrations instead of refusing to start on an old schema.
    pub migrate: bool,
    /// Run only the HTTP intake, no worker (tests of intake alone).
    pub intake_only: bool,
}

/// A running service.
pub struct RunningApp {
    pub addr: SocketAddr,
    pub state: AppState,
    /// The worker's shared context (None with `intake_only`).
    pub worker: Option<Arc<WorkerContext>>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    /// Intake committers. Not awaited on stop: every 2xx was answered after its commit, and
    /// the graceful HTTP shutdown has let in-flight requests finish first.
    _committers: JoinSet<()>,
}

impl RunningApp {
    /// Base URL of the HTTP server, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A token that stops the service when cancelled (SIGTERM does this in `serve`).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Graceful stop: no new connections, in-flight requests finish, the worker stops between
    /// notifications, queued intake commits; bounded by `server.shutdown_grace_secs`.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        self.wait().await;
    }

    /// Runs until the shutdown token is cancelled (or a part of the service stops on its own,
    /// which stops the rest), then gives what is left `server.shutdown_grace_secs` to finish.
    pub async fn wait(&mut self) {
        tokio::select! {
            // A requested stop also ends the parts: it is checked first, and again below, so
            // that it is never taken for one of them failing.
            biased;
            _ = self.shutdown.cancelled() => {}
            ended = self.tasks.join_next() => {
                if ended.is_some() && !self.shutdown.is_cancelled() {
                    tracing::error!("a part of the service stopped unexpectedly; shutting down");
                }
                self.shutdown.cancel();
            }
        }
        let grace = Duration::from_secs(self.state.config.server.shutdown_grace_secs);
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("shutdown grace period over; stopping what is left");
            self.tasks.abort_all();
        }
    }
}

/// Connects the store and checks (or applies) migrations.
pub async fn open_store(config: &Config, migrate: bool) -> anyhow::Result<Store> {
    let store = Store::connect(config.store.url.expose(), config.store.max_connections)
        .await
        .context("connecting to the store (store.url)")?;
    if migrate {
        store.migrate().await.context("applying migrations")?;
    } else if store.is_new().await? {
        // A store nothing was ever written to gets its schema; an existing older one is still
        // refused without `--migrate` (an upgrade is the operator's decision).
        tracing::info!("the store is new and empty: creating its schema");
        store
            .migrate()
            .await
            .context("creating the schema of a new store")?;
    }
    store.ensure_schema().await?;
    Ok(store)
}

pub async fn start(config: Config, options: StartOptions) -> anyhow::Result<RunningApp> {
    let config = Arc::new(config);
    let store = open_store(&config, options.migrate).await?;
    let (intake, committer_tasks) = GroupCommitter::start(store.clone(), config.store.group_commit_max)
        .context("starting intake's group commit")?;
    let lifecycle = Arc::new(Lifecycle::default());
    let admin_auth = JwtVerifier::from_config(&config.admin).context("configuring the admin API")?;
    let listener = TcpListener::bind(&config.server.listen)
        .await
        .with_context(|| format!("binding {}", config.server.listen))?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();

    // Which organisation's notifications to accept: configured, or learnt through WhoAmI.
    let organization = Arc::new(Organization::new(&config.dataverse));
    if organization.id().is_none() {
        match DataverseClient::new(&config.dataverse) {
            Ok(client) => {
                crate::dynamics::organization::learn(organization.clone(), client, shutdown.clone()).await;
            }
            Err(e) => tracing::warn!(
                error = %e,
                "no Dataverse client to learn the organisation with; notifications are not checked against it (set dataverse.organization_id)"
            ),
        }
    } else {
        tracing::info!(organization_id = ?organization.id(), "serving the configured Dataverse organisation");
    }

    let worker = if options.intake_only {
        None
    } else {
        let marketo = MarketoClient::new(&config.marketo).context("configuring the Marketo client")?;
        let dataverse =
            DataverseClient::new(&config.dataverse).context("configuring the Dataverse client")?;
        let ctx = Arc::new(WorkerContext::new(
            config.clone(),
            store.clone(),
            marketo,
            dataverse,
            lifecycle.clone(),
        ));
        let mut worker_tasks = crate::worker::start(ctx.clone(), shutdown.clone()).await;
        tasks.spawn(async move { while worker_tasks.join_next().await.is_some() {} });
        Some(ctx)
    };
    let metrics = crate::service::metrics::install();
    if let Some(handle) = metrics.clone() {
        tasks.spawn(crate::service::metrics::run_upkeep(handle, shutdown.clone()));
    }
    let state: AppState = Arc::new(AppContext {
        config: config.clone(),
        store: store.clone(),
        intake,
        lifecycle: lifecycle.clone(),
        metrics,
        admin_auth,
        worker: WorkerControl::new(store.clone(), worker.clone()),
        organization,
    });

    let router = crate::http::router(state.clone());
    let limits = crate::http::server::ConnectionLimits {
        header_read_timeout: Duration::from_secs(config.server.header_read_timeout_secs),
        max_connections: config.server.max_connections,
    };
    let server_shutdown = shutdown.clone();
    let server_lifecycle = lifecycle.clone();
    tasks.spawn(async move {
        let signal = async move {
            server_shutdown.cancelled().await;
            server_lifecycle.start_draining();
        };
        crate::http::server::serve(listener, router, limits, signal).await;
    });
    tracing::info!(%addr, store = store.backend(), "oppsync listening");
    Ok(RunningApp {
        addr,
        state,
        worker,
        shutdown,
        tasks,
        _committers: committer_tasks,
    })
}
