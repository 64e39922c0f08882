use anyhow::Context;

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("aggregator: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("replay") {
        init_logs("warn");
        use clap::Parser;
        let args = aggregator::replay::ReplayArgs::parse_from(std::env::args().skip(1));
        let summary = aggregator::replay::run(args, &mut std::io::stderr()).await?;
        summary.print(&mut std::io::stdout())?;
        return Ok(());
    }
    let config = aggregator::Config::from_args()?;
    init_logs("info");
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

/// Logs go to stderr, so that stdout carries only a command's result.
fn init_logs(default: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .init();
}
