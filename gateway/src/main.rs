use std::io::IsTerminal;

use anyhow::Context;

/// Every request allocates and frees many small buffers (headers, bodies, the event); with
/// glibc's allocator that was about 15% of the gateway's CPU time under load (`perf`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("gateway: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    use clap::Parser;
    let args = gateway::Args::parse();
    // Held to the end: dropping it writes out the lines still queued.
    let _logs = init_logs(args.log_format.as_deref(), args.access_log.unwrap_or(true));
    let config = gateway::Config::build(args)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    gateway::run(listener, config, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Logs go to stderr: as JSON lines for log shippers (`--log-format json`), else as text,
/// coloured only on a terminal so that files get plain text. Plain text lines are written by
/// `TextFormat`, the stock format without its colour machinery (half the access log's cost).
///
/// A thread of their own writes them, as many lines per `write` as are queued: with the access
/// log's line per request, a `write` per line on the request's thread was a syscall per
/// request, and a slow stderr reader slowed requests. Lossless: should 128,000 lines queue up,
/// requests wait rather than lines vanish.
fn init_logs(
    format: Option<&str>,
    access_log: bool,
) -> tracing_appender::non_blocking::WorkerGuard {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("gateway-logs")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let logs = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_env_filter(gateway::log_filter(rust_log.as_deref(), access_log));
    match format {
        Some("json") => logs.json().init(),
        _ => logs
            .with_ansi(std::io::stderr().is_terminal())
            .event_format(gateway::TextFormat::default())
            .init(),
    }
    guard
}
