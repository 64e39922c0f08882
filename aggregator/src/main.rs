use std::io::IsTerminal;

use anyhow::Context;

/// The consumer allocates and frees many small buffers per event (decoded events, cells, their
/// encodings); with glibc's allocator that was a quarter of its CPU time (`perf`, aggbench).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("aggregator: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    use clap::Parser;
    let cli = aggregator::Cli::parse();
    let log_format = cli.args.log_format.clone();
    let config = aggregator::Config::build(cli.args)?;
    match cli.command {
        None => {
            init_logs(log_format.as_deref(), "info");
            serve(config).await
        }
        Some(aggregator::Command::Usage(args)) => {
            aggregator::cli::usage(&config, &args, &mut std::io::stdout().lock()).await?;
            Ok(())
        }
        Some(aggregator::Command::Latency(args)) => {
            aggregator::cli::latency(&config, &args, &mut std::io::stdout().lock()).await?;
            Ok(())
        }
        Some(aggregator::Command::Replay(args)) => {
            init_logs(log_format.as_deref(), "warn");
            let summary = aggregator::replay::run(&config, args, &mut std::io::stderr()).await?;
            summary.print(&mut std::io::stdout())?;
            Ok(())
        }
    }
}

async fn serve(config: aggregator::Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    aggregator::run(listener, config, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Logs go to stderr, so that stdout carries only a command's result: as JSON lines for log
/// shippers (`--log-format json`), else as text, coloured only on a terminal so that files get
/// plain text.
fn init_logs(format: Option<&str>, default: &str) {
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        );
    match format {
        Some("json") => logs.json().init(),
        _ => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}
