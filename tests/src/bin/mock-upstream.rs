//! Mock Anthropic/OpenAI upstream for the local demo and manual testing; see
//! `tests::mock_upstream` for the routes and the `"mock"` request field.

use std::io::IsTerminal;
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
    /// Answer every POST with one fixed Anthropic Messages reply (100 input, 20 output
    /// tokens), without parsing the request: a fake upstream that costs almost nothing, like
    /// the one behind the gateway issue's reference figures, so a benchmark measures the
    /// relay rather than the mock. No scripting, no credentials check, no streaming.
    #[arg(long)]
    canned: bool,
}

/// The reply of `--canned`, in the shape of the Messages API.
const CANNED: &str = r#"{"id":"msg_canned","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"Hello! How can I help you today?"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":100,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":20}}"#;

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
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    println!("mock upstream listening on http://{addr}");
    if args.canned {
        let app = axum::Router::new().fallback(|_body: axum::body::Bytes| async {
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                CANNED,
            )
        });
        return axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("serving the canned upstream");
    }
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
