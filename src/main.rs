//! The `portcullis` command: `run`, `check-config`, `hash-password`. Nothing else lives here.

use std::io::{BufRead as _, IsTerminal as _};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use portcullis::config::{Config, LogFormat, Scheduler};
use portcullis::server::workers::Workers;
use portcullis::server::Server;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Authentication reverse proxy in front of Stalwart"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the proxy.
    Run {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file (and everything it names) and exit.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Read a password from standard input and print a users-file entry with its Argon2id hash.
    HashPassword {
        /// The account name to put in the printed entry.
        #[arg(long, default_value = "user@example.org")]
        account: String,
    },
}

/// mimalloc rather than glibc's malloc: a login makes many small short-lived allocations, and
/// glibc's spent about 8 % of the proxy's CPU per login on them (bench/RESULTS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(config),
        Command::CheckConfig { config } => check_config(config),
        Command::HashPassword { account } => hash_password(&account),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    // Colours only on a terminal: a log file or journald gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

fn check_config(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Load everything the file names (secret, certificates, users, backend TLS) without
        // binding: binding would fail while the production instance holds the ports.
        config.master_secret()?;
        if let Some(tls) = &config.tls {
            portcullis::tls::CertStore::load(tls)?;
        }
        portcullis::authn::build(&config.authenticator)
            .map_err(|e| anyhow::anyhow!("authenticator: {e}"))?;
        portcullis::backend::Connector::new(
            &config.backend,
            &config.master.user,
            &config.master.separator,
            config.master_secret()?,
        )?;
        anyhow::Ok(())
    })?;
    println!("{}: ok", path.display());
    Ok(())
}

fn run(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    init_logging(&config);
    let threads = config.server.threads();
    match config.server.scheduler {
        Scheduler::WorkStealing => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .build()?;
            runtime.block_on(serve(config, path, None))
        }
        Scheduler::PerCore => {
            // This thread is worker 0; the others run their own runtimes.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let workers = Workers::start(threads - 1)?;
            let result = runtime.block_on(async {
                tokio::spawn(portcullis::server::workers::timer_heartbeat());
                serve(config, path, Some(&workers)).await
            });
            workers.stop();
            result
        }
    }
}

async fn serve(config: Config, path: PathBuf, workers: Option<&Workers>) -> anyhow::Result<()> {
    let server = Server::bind(config).await?;
    let shutdown = server.shutdown_token();
    tokio::spawn(signals(shutdown, server.reloader(), path));
    server.run_on(workers.map_or(&[], Workers::handles)).await;
    Ok(())
}

#[cfg(unix)]
async fn signals(
    shutdown: tokio_util::sync::CancellationToken,
    reloader: portcullis::server::Reloader,
    path: PathBuf,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(&reloader, &path),
        }
    }
    shutdown.cancel();
}

#[cfg(unix)]
fn reload(reloader: &portcullis::server::Reloader, path: &std::path::Path) {
    let result = Config::load(path)
        .map_err(|e| e.to_string())
        .and_then(|config| reloader.reload(&config));
    match result {
        Ok(()) => tracing::info!("reloaded certificates and authenticator data"),
        Err(e) => tracing::error!(error = %e, "reload failed; keeping the running configuration"),
    }
}

fn hash_password(account: &str) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("password (input is echoed; pipe it in to avoid that):");
    }
    let mut line = zeroize::Zeroizing::new(String::new());
    stdin
        .lock()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        anyhow::bail!("empty password");
    }
    let hash = portcullis::authn::file::hash_password(password.as_bytes())
        .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?;
    println!("[[user]]\naccount = \"{account}\"\npassword = \"{hash}\"");
    Ok(())
}
