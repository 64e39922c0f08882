//! Mock Anthropic/OpenAI upstream for the local demo and manual testing; see
//! `tests::mock_upstream` for the routes and the `"mock"` request field.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use tests::mock_upstream::{self, MockConfig};
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(about = "Mock Anthropic and OpenAI API upstream")]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "MOCK_LISTEN", default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
    /// Credential to require (`x-api-key` for Anthropic routes, `Bearer` for OpenAI routes).
    #[arg(long, env = "MOCK_API_KEY")]
    api_key: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Logs go to stderr so stdout carries only the address line that scripts wait for.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    println!("mock upstream listening on http://{addr}");
    let config = MockConfig {
        api_key: args.api_key,
    };
    mock_upstream::run(listener, config, shutdown_signal())
        .await
        .context("serving the mock upstream")
}

/// Resolves on SIGINT or SIGTERM. A handler that cannot be installed is logged and treated as
/// a signal that never arrives, so the other one still works.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}
