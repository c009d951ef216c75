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
}

fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
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
            let dv = d.config();
            println!(
                "Marketo simulator:   {}   (state: {}/_sim/state)",
                m.base_url(),
                m.base_url()
            );
            println!("Dataverse simulator: {}", d.url());
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
            wait_for_signal().await;
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
