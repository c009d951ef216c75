//! The `oppsync` command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use oppsync::config::{Config, Purpose};
use oppsync::dynamics::webapi::DataverseClient;
use oppsync::marketo::MarketoClient;
use oppsync::register::{self, RegisterOptions};
use url::Url;

/// jemalloc instead of the system allocator: intake allocates per request (the body, its
/// decode, its compressed copy), and glibc's malloc was a fifth of intake's CPU time under
/// concurrent load; glibc's per-thread arenas also kept SQLite's freed memory resident. Its
/// unprefixed `malloc` serves SQLite too, under the bounds `.cargo/config.toml` compiles in. Set
/// in the binary, not the library, so that the fuzz target keeps the allocator its sanitizer
/// checks; the benchmarks that measure intake set it too.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "oppsync",
    version,
    about = "Keeps Adobe Marketo Engage in step with Dynamics 365 opportunities (one way)."
)]
struct Cli {
    /// TOML configuration file; `OPPSYNC__SECTION__KEY` environment variables override it.
    #[arg(long, global = true, env = "OPPSYNC_CONFIG")]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve {
        /// Apply pending database migrations first (otherwise an older schema is refused; a new,
        /// empty store gets its schema either way).
        #[arg(long)]
        migrate: bool,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig {
        /// Also check that Marketo accepts our credentials and opportunity writes (native CRM
        /// sync off), and that Dataverse issues a token and lets oppsync read connection roles.
        #[arg(long)]
        online: bool,
    },
    /// Create or update the Dynamics service endpoint, steps and images that send oppsync its
    /// webhooks (idempotent). Uses the `dataverse.*` credentials and the first `webhook.keys`.
    Register {
        /// Public URL of the webhook, e.g. https://oppsync.example.com/webhooks/dynamics.
        #[arg(long, value_parser = parse_webhook_url)]
        webhook_url: Url,
        /// Name of the service endpoint in Dynamics.
        #[arg(long, default_value = "oppsync")]
        endpoint_name: String,
        /// Show what would change without writing anything.
        #[arg(long)]
        dry_run: bool,
        /// Turn change tracking on for opportunity, connection, contact and account where it is
        /// off, so that reconciliation sees deletes whose webhooks were lost.
        #[arg(long)]
        enable_change_tracking: bool,
    },
    /// Start the initial sync on a running service (or follow the one running) and show its
    /// progress until it ends. The admin token (oppsync.write) is read from OPPSYNC_ADMIN_TOKEN.
    Backfill {
        /// The service's base URL, e.g. https://oppsync.example.com.
        #[arg(long)]
        url: Url,
        /// Only the opportunities this OData $filter selects, e.g. "statecode eq 0".
        #[arg(long)]
        filter: Option<String>,
        /// Only the opportunities modified at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
    },
    /// Compare what Marketo holds for oppsync's opportunities and roles with what oppsync
    /// projects, and print every difference (exit 1 when there are any). The admin token is read
    /// from OPPSYNC_ADMIN_TOKEN.
    Drift {
        /// The service's base URL, e.g. https://oppsync.example.com.
        #[arg(long)]
        url: Url,
        /// Most Marketo calls to spend (each 300 opportunities take 6).
        #[arg(long, default_value_t = 100)]
        budget: usize,
        /// Also queue the writes that fix the differences (needs oppsync.write).
        #[arg(long)]
        repair: bool,
    },
    /// Print the OpenAPI document (YAML).
    Openapi,
    /// Run the real service against the built-in Marketo and Dataverse simulators, replay a
    /// scripted Dynamics history, and print what Marketo ends up holding.
    Demo,
    /// Run the Marketo and Dataverse simulators alone, for trying `serve` by hand.
    Sim {
        /// Marketo simulator address.
        #[arg(long, default_value = "127.0.0.1:8090")]
        marketo: std::net::SocketAddr,
        /// Dataverse simulator address.
        #[arg(long, default_value = "127.0.0.1:8091")]
        dataverse: std::net::SocketAddr,
    },
    /// Mint an HS256 admin token with the configured secret (admin.jwt_secret) and print it.
    Token {
        /// Scopes to grant (oppsync.read, oppsync.write; write implies read). Repeatable.
        #[arg(long = "scope", default_value = "oppsync.read")]
        scopes: Vec<String>,
        /// Lifetime, e.g. 30m, 1h, 3600s.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: std::time::Duration,
        /// Subject (`sub`) naming who the token is for, as it appears in the logs.
        #[arg(long, default_value = "oppsync-cli")]
        subject: String,
    },
}

fn parse_ttl(s: &str) -> Result<std::time::Duration, String> {
    oppsync::http::auth::parse_ttl(s)
}

fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Colours only on a terminal: a log file or `kubectl logs` gets plain text.
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
    }
}

fn load(cli: &Cli, purpose: Purpose) -> Result<Config, ExitCode> {
    Config::load(cli.config.as_deref(), purpose).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own report; its service logs only what goes wrong.
    let default_filter = match cli.command {
        Command::Demo => "warn",
        _ => "info,sqlx=warn,tower_http=warn",
    };
    init_logging(cli.log_format, default_filter);
    match run(&cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Serve { migrate } => {
            let config = match load(cli, Purpose::Serve) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let signal = shutdown_signal();
            let mut app = oppsync::app::start(
                config,
                oppsync::app::StartOptions {
                    migrate: *migrate,
                    ..Default::default()
                },
            )
            .await?;
            let token = app.shutdown_token();
            tokio::spawn(async move {
                signal.await;
                tracing::info!("shutdown signal received; draining");
                token.cancel();
            });
            app.wait().await;
            tracing::info!("stopped");
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let config = match load(cli, Purpose::Inspect) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            oppsync::app::open_store(&config, true).await?;
            println!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { online } => {
            // Online, the collaborators are called: everything `serve` needs must be there.
            // Offline, a partial file is checked for what it holds, and what `serve` would
            // still need is listed, not failed.
            let purpose = if *online { Purpose::Serve } else { Purpose::Inspect };
            let config = match load(cli, purpose) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            print!("{}", config.redacted_toml());
            let inspect = config.problems(Purpose::Inspect);
            let for_serve: Vec<String> = config
                .problems(Purpose::Serve)
                .into_iter()
                .filter(|p| !inspect.contains(p))
                .collect();
            if for_serve.is_empty() {
                eprintln!("configuration is valid");
            } else {
                eprintln!(
                    "configuration is valid as far as it goes; `serve` also needs:\n{}",
                    for_serve
                        .iter()
                        .map(|p| format!("  - {p}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            if *online {
                return Ok(check_online(&config).await);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => {
            let report = oppsync::demo::run(|line| println!("{line}")).await?;
            println!("{}", report.text);
            Ok(ExitCode::SUCCESS)
        }
        Command::Sim { marketo, dataverse } => {
            let cfg = oppsync::sim::marketo::MarketoSimConfig {
                addr: *marketo,
                ..Default::default()
            };
            let m = oppsync::sim::marketo::MarketoSim::start(cfg).await?;
            let d = oppsync::sim::dataverse::DataverseSim::start_on(*dataverse).await?;
            d.seed_sample_records();
            let dv = d.config();
            println!(
                "Marketo simulator:   {}   (state: {}/_sim/state)",
                m.base_url(),
                m.base_url()
            );
            println!("Dataverse simulator: {}", d.url());
            println!(
                "  seeded with what the sample webhooks in tests/fixtures/dynamics/ name: the account Contoso Pharmaceuticals, its contact James Glynn, a stakeholder connection role"
            );
            println!("\nPoint `oppsync serve` at them with:");
            println!("  export OPPSYNC__MARKETO__BASE_URL={}", m.base_url());
            println!("  export OPPSYNC__MARKETO__CLIENT_ID={}", m.client_id());
            println!("  export OPPSYNC__MARKETO__CLIENT_SECRET={}", m.client_secret());
            println!("  export OPPSYNC__DATAVERSE__URL={}", d.url());
            println!("  export OPPSYNC__DATAVERSE__TOKEN_URL={}", d.token_url());
            println!(
                "  export OPPSYNC__DATAVERSE__CLIENT_ID={}",
                dv.client_id.unwrap_or_default()
            );
            println!(
                "  export OPPSYNC__DATAVERSE__CLIENT_SECRET={}",
                dv.client_secret
                    .map(|s| s.expose().to_owned())
                    .unwrap_or_default()
            );
            println!("  export OPPSYNC__WEBHOOK__KEYS=local-webhook-key");
            println!("\nThese are simulators with well-known test credentials; press Ctrl-C to stop.");
            shutdown_signal().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Register {
            webhook_url,
            endpoint_name,
            dry_run,
            enable_change_tracking,
        } => {
            let config = match load(cli, Purpose::Inspect) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            register_endpoint(
                &config,
                webhook_url,
                endpoint_name,
                *dry_run,
                *enable_change_tracking,
            )
            .await
        }
        Command::Token { scopes, ttl, subject } => {
            // Only the admin section matters here (no store, no Marketo credentials needed).
            let config = match Config::load_unchecked(cli.config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::from(2));
                }
            };
            if config.admin.jwt_secret.is_none() && config.admin.jwt_public_key_file.is_some() {
                anyhow::bail!(
                    "only a public key is configured (admin.jwt_public_key_file): tokens for it are signed by whoever holds the private key, not by oppsync"
                );
            }
            if let Some(problem) = config
                .problems(Purpose::Inspect)
                .into_iter()
                .find(|p| p.starts_with("admin"))
            {
                anyhow::bail!("{problem}");
            }
            let token = oppsync::http::auth::mint(&config.admin, subject, scopes, *ttl)?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Backfill { url, filter, since } => {
            let Ok(token) = std::env::var(oppsync::admin_cli::TOKEN_ENV) else {
                eprintln!(
                    "{} is not set: put an admin token with the oppsync.write scope there (`oppsync token --scope oppsync.write`)",
                    oppsync::admin_cli::TOKEN_ENV
                );
                return Ok(ExitCode::from(2));
            };
            let request = oppsync::worker::BackfillRequest {
                filter: filter.clone(),
                since: since.clone(),
            }
            .validated()
            .map_err(|e| anyhow::anyhow!(e))?;
            let ended =
                oppsync::admin_cli::backfill(url, token.trim(), &request, std::time::Duration::from_secs(1))
                    .await?;
            Ok(match ended {
                oppsync::admin_cli::Ended::Completed => ExitCode::SUCCESS,
                oppsync::admin_cli::Ended::NotCompleted(why) => {
                    eprintln!("the backfill did not complete: {why}");
                    ExitCode::FAILURE
                }
            })
        }
        Command::Drift { url, budget, repair } => {
            let Ok(token) = std::env::var(oppsync::admin_cli::TOKEN_ENV) else {
                eprintln!(
                    "{} is not set: put an admin token there (`oppsync token`)",
                    oppsync::admin_cli::TOKEN_ENV
                );
                return Ok(ExitCode::from(2));
            };
            let found = oppsync::admin_cli::drift(url, token.trim(), *budget, *repair).await?;
            Ok(if found == 0 || *repair {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Openapi => {
            print!("{}", oppsync::http::openapi::yaml()?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn parse_webhook_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("not an absolute URL: {e}"))?;
    match url.scheme() {
        "https" | "http" => {}
        other => return Err(format!("the scheme must be https, not {other}")),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    Ok(url)
}

/// `oppsync register`: what `Purpose::Register` needs, then the registration.
async fn register_endpoint(
    config: &Config,
    webhook_url: &Url,
    endpoint_name: &str,
    dry_run: bool,
    enable_change_tracking: bool,
) -> anyhow::Result<ExitCode> {
    let problems = config.problems(Purpose::Register);
    let key = config.webhook.keys.first().cloned();
    let Some(webhook_key) = key.filter(|_| problems.is_empty()) else {
        eprintln!(
            "cannot register:\n{}",
            problems
                .iter()
                .map(|p| format!("  - {p}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        return Ok(ExitCode::from(2));
    };
    if !webhook_url.path().ends_with("/webhooks/dynamics") {
        eprintln!(
            "warning: {webhook_url} does not end in /webhooks/dynamics, the route oppsync receives webhooks on"
        );
    }
    let client = DataverseClient::new(&config.dataverse)?;
    let options = RegisterOptions {
        webhook_url: webhook_url.clone(),
        webhook_key,
        endpoint_name: endpoint_name.to_owned(),
        opportunity_attributes: config.sync.opportunity_attributes(),
        dry_run,
        enable_change_tracking,
    };
    let report = register::register(&client, &options)
        .await
        .map_err(|e| anyhow::anyhow!("registration with {} failed: {e}", client.org_url()))?;
    println!("{report}");
    Ok(ExitCode::SUCCESS)
}

/// `check-config --online`: each collaborator's verdict on one line; fails if any is not ok.
async fn check_online(config: &Config) -> ExitCode {
    let mut ok = true;
    match check_marketo(config).await {
        Ok(detail) => println!("marketo: ok: {detail}"),
        Err(problem) => {
            ok = false;
            println!("marketo: FAILED: {problem}");
        }
    }
    match check_dataverse(config).await {
        Ok(detail) => println!("dataverse: ok: {detail}"),
        Err(problem) => {
            ok = false;
            println!("dataverse: FAILED: {problem}");
        }
    }
    if ok {
        eprintln!("online checks passed");
        ExitCode::SUCCESS
    } else {
        eprintln!("online checks failed");
        ExitCode::FAILURE
    }
}

async fn check_marketo(config: &Config) -> Result<String, String> {
    let client = MarketoClient::new(&config.marketo).map_err(|e| e.to_string())?;
    match client.probe().await {
        Ok(report) => Ok(report.detail),
        Err(e) if e.code() == "1018" => Err(format!(
            "{e}. oppsync cannot push while native CRM sync is on: disable the Dynamics sync in \
             Marketo Admin > CRM, or point marketo.base_url at another instance"
        )),
        Err(e) => Err(e.to_string()),
    }
}

async fn check_dataverse(config: &Config) -> Result<String, String> {
    let client = DataverseClient::new(&config.dataverse).map_err(|e| e.to_string())?;
    let mut found = Vec::new();
    for category in &config.sync.stakeholder_categories {
        let roles = client
            .connection_roles_by_category(*category)
            .await
            .map_err(|e| e.to_string())?;
        let names: Vec<String> = roles.into_iter().map(|r| r.name).collect();
        found.push(format!(
            "category {category}: {} ({})",
            names.len(),
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        ));
    }
    // Where change tracking is off, reconciliation cannot see deletes: say so (not a failure).
    let mut untracked = Vec::new();
    for table in register::TRACKED_TABLES {
        if !client
            .change_tracking_enabled(table)
            .await
            .map_err(|e| e.to_string())?
        {
            untracked.push(table);
        }
    }
    let tracking = if untracked.is_empty() {
        "change tracking on for every table reconciliation reads".to_owned()
    } else {
        format!(
            "change tracking OFF for {}: reconciliation cannot see their deletes (`oppsync register --enable-change-tracking` turns it on)",
            untracked.join(", ")
        )
    };
    Ok(format!(
        "token issued by {}; connection roles readable; stakeholder roles {}; {tracking}",
        config
            .dataverse
            .effective_token_url()
            .map(|u| u.host_str().unwrap_or_default().to_owned())
            .unwrap_or_default(),
        found.join("; ")
    ))
}

/// Listens for SIGTERM and Ctrl-C from the moment it is called (a SIGTERM that comes while the
/// service is still starting is not lost, nor does it kill the process); the future completes
/// at the first of them.
fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        if let Some(mut term) = term {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = ctrl_c.await;
    }
}
