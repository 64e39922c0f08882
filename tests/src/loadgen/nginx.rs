//! The reference hop: one nginx reverse proxy in front of the same mock upstream, so the gateway
//! is compared with the cheapest relay a deployment could put in its place, in the same run.
//!
//! nginx runs as a child of the harness with a private prefix in the run's log directory, one
//! process (`master_process off`, so its `/proc` CPU and RSS are the whole proxy's), keep-alive
//! to the upstream, and `proxy_buffering off`, which relays each SSE event as it arrives, as the
//! gateway does. The access log stays on, as the gateway's does.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;

use crate::processes::{Children, accepts_connections, free_addr};

/// A running nginx hop.
pub struct Nginx {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    pub pid: u32,
}

/// True when an `nginx` binary is on `PATH` (`apt-get install nginx-light`).
pub fn on_path() -> bool {
    std::process::Command::new("nginx")
        .arg("-v")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts nginx proxying everything to `upstream` (`http://HOST:PORT`), able to hold
/// `connections` client connections plus as many to the upstream.
pub async fn start(
    children: &mut Children,
    upstream: &str,
    connections: usize,
) -> anyhow::Result<Nginx> {
    let upstream = upstream
        .strip_prefix("http://")
        .context("the upstream URL must start with http://")?;
    let listen = free_addr()?;
    let prefix = children.log_dir().join("nginx");
    std::fs::create_dir_all(&prefix).with_context(|| format!("creating {}", prefix.display()))?;
    let conf = prefix.join("nginx.conf");
    std::fs::write(&conf, config(&prefix, listen, upstream, connections))
        .with_context(|| format!("writing {}", conf.display()))?;
    let error_log = prefix.join("error.log");
    let args = [
        "-p",
        path_str(&prefix)?,
        "-c",
        path_str(&conf)?,
        "-e",
        path_str(&error_log)?,
    ];
    let pid = children.spawn("nginx", Path::new("nginx"), &args, &[])?;
    children
        .wait_until("nginx", std::time::Duration::from_secs(10), async || {
            accepts_connections(listen)
        })
        .await?;
    Ok(Nginx {
        url: format!("http://{listen}"),
        pid,
    })
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

fn config(prefix: &Path, listen: SocketAddr, upstream: &str, connections: usize) -> String {
    let prefix = prefix.display();
    // Each relayed request holds a client and an upstream connection, plus some slack.
    let worker_connections = connections * 2 + 256;
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {rlimit};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream mock {{
        server {upstream};
        keepalive 64;
    }}
    server {{
        listen {listen} backlog=4096;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 120s;
        }}
    }}
}}
"#,
        rlimit = worker_connections + 64,
    )
}
