//! The `oppsync` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use oppsync::config::{Config, Purpose};

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
        /// Apply pending database migrations first (otherwise an old schema is refused).
        #[arg(long)]
        migrate: bool,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig {
        /// Also check that Marketo accepts our credentials and opportunity writes.
        #[arg(long)]
        online: bool,
    },
    /// Print the OpenAPI document (YAML).
    Openapi,
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
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
    init_logging(cli.log_format);
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
                wait_for_signal().await;
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
            let purpose = Purpose::Serve;
            let config = match load(cli, purpose) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            print!("{}", config.redacted_toml());
            if *online {
                anyhow::bail!("--online needs the Marketo client, which this build does not have yet");
            }
            eprintln!("configuration is valid");
            Ok(ExitCode::SUCCESS)
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
        Command::Openapi => {
            print!("{}", oppsync::openapi::yaml()?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
