//! The packaging (Dockerfile, compose.yaml, deploy/systemd/) names only flags and environment
//! variables the binaries accept, with values they accept; `--log-format json` logs JSON lines;
//! the images' health check script works. No container engine runs here, so the files are read
//! and their settings fed to the binaries' own parsers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser};
use tests::harness::{free_port, redis_url};
use tests::process::Process;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// What a packaging file gives one binary: command-line arguments and environment variables.
#[derive(Debug, Default)]
struct Settings {
    origin: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// Environment variables read outside clap (tracing's filter).
const NOT_CLAP: [&str; 1] = ["RUST_LOG"];

/// Turns the environment into flags through the clap definitions (`env = ...` → `--long`), so
/// that parsing checks names and values without touching this process's environment.
fn argv(binary: &str, command: &clap::Command, settings: &Settings) -> Vec<String> {
    let mut argv = vec![binary.to_owned()];
    for (name, value) in &settings.env {
        if NOT_CLAP.contains(&name.as_str()) {
            continue;
        }
        let arg = command
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
            .unwrap_or_else(|| panic!("{}: {binary} reads no {name}", settings.origin));
        let long = arg.get_long().unwrap_or_default();
        argv.push(format!("--{long}"));
        argv.push(value.clone());
    }
    argv.extend(settings.args.iter().cloned());
    argv
}

fn check(binary: &str, settings: &Settings) {
    match binary {
        "gateway" => {
            let argv = argv(binary, &gateway::Args::command(), settings);
            let args = gateway::Args::try_parse_from(&argv)
                .unwrap_or_else(|e| panic!("{}: {argv:?}: {e}", settings.origin));
            gateway::Config::build(args)
                .unwrap_or_else(|e| panic!("{}: {argv:?}: {e}", settings.origin));
        }
        "aggregator" => {
            let argv = argv(binary, &aggregator::Cli::command(), settings);
            let cli = aggregator::Cli::try_parse_from(&argv)
                .unwrap_or_else(|e| panic!("{}: {argv:?}: {e}", settings.origin));
            aggregator::Config::build(cli.args)
                .unwrap_or_else(|e| panic!("{}: {argv:?}: {e}", settings.origin));
        }
        other => panic!("{}: unknown binary {other}", settings.origin),
    }
}

/// `["a", "b"]` → `a`, `b`.
fn json_list(text: &str) -> Vec<String> {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// The `ENV` and `ENTRYPOINT`/`CMD` settings of the Dockerfile's `gateway` and `aggregator`
/// stages (other stages run cargo, or no binary of ours).
fn dockerfile() -> Vec<(String, Settings)> {
    // Continued lines joined: a `HEALTHCHECK ... \` line continues with its `CMD`.
    let text = read("Dockerfile").replace("\\\n", " ");
    let mut stages: Vec<(String, Settings)> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(from) = line.strip_prefix("FROM ") {
            let name = from.split(" AS ").nth(1).unwrap_or_default().trim();
            stages.push((
                name.to_owned(),
                Settings {
                    origin: format!("Dockerfile stage {name}"),
                    ..Settings::default()
                },
            ));
            continue;
        }
        let Some((stage, settings)) = stages.last_mut() else {
            continue;
        };
        if !["gateway", "aggregator"].contains(&stage.as_str()) {
            continue;
        }
        if let Some(env) = line.strip_prefix("ENV ") {
            let (name, value) = env.split_once('=').expect("ENV NAME=value");
            settings.env.push((name.to_owned(), value.to_owned()));
        } else if let Some(list) = line.strip_prefix("ENTRYPOINT ") {
            let list = json_list(list);
            assert_eq!(list[0], *stage, "the {stage} image runs {list:?}");
            settings.args.extend(list.into_iter().skip(1));
        } else if let Some(list) = line.strip_prefix("CMD ") {
            settings.args.extend(json_list(list));
        }
    }
    stages
        .into_iter()
        .filter(|(name, _)| ["gateway", "aggregator"].contains(&name.as_str()))
        .collect()
}

/// The `command:` and `environment:` of compose.yaml's `gateway` and `aggregator` services
/// (the file keeps to two-space indentation and one-line lists).
fn compose() -> Vec<(String, Settings)> {
    let text = read("compose.yaml");
    let mut services: Vec<(String, Settings)> = Vec::new();
    let mut in_services = false;
    let mut in_environment = false;
    for line in text.lines() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let line = line.trim();
        if indent == 0 {
            in_services = line == "services:";
            continue;
        }
        if !in_services {
            continue;
        }
        if indent == 2 {
            let name = line.trim_end_matches(':');
            services.push((
                name.to_owned(),
                Settings {
                    origin: format!("compose.yaml service {name}"),
                    ..Settings::default()
                },
            ));
            in_environment = false;
            continue;
        }
        let Some((_, settings)) = services.last_mut() else {
            continue;
        };
        if indent == 4 {
            in_environment = line == "environment:";
            if let Some(list) = line.strip_prefix("command:") {
                settings.args.extend(json_list(list));
            }
        } else if in_environment && indent == 6 {
            let (name, value) = line.split_once(':').expect("NAME: value");
            settings
                .env
                .push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    services
        .into_iter()
        .filter(|(name, _)| ["gateway", "aggregator"].contains(&name.as_str()))
        .collect()
}

/// `ExecStart=` arguments and `Environment=` settings of a unit.
fn unit(path: &str) -> (String, Settings) {
    let text = read(path);
    let mut binary = String::new();
    let mut settings = Settings {
        origin: path.to_owned(),
        ..Settings::default()
    };
    for line in text.lines() {
        if let Some(exec) = line.strip_prefix("ExecStart=") {
            let mut words = exec.split_whitespace();
            binary = words
                .next()
                .and_then(|b| b.rsplit('/').next())
                .unwrap_or_default()
                .to_owned();
            settings.args.extend(words.map(str::to_owned));
        } else if let Some(env) = line.strip_prefix("Environment=") {
            let (name, value) = env.split_once('=').expect("Environment=NAME=value");
            settings.env.push((name.to_owned(), value.to_owned()));
        }
    }
    (binary, settings)
}

#[test]
fn every_flag_and_variable_the_packaging_names_is_one_the_binaries_accept() {
    let mut checked = Vec::new();
    let mut all = dockerfile();
    all.extend(compose());
    for path in [
        "deploy/systemd/meter-gateway.service",
        "deploy/systemd/meter-aggregator.service",
    ] {
        all.push(unit(path));
    }
    for (binary, settings) in &all {
        check(binary, settings);
        checked.push(settings.origin.clone());
    }
    // Both binaries from each of the three files, each with settings to check.
    assert_eq!(checked.len(), 6, "{checked:?}");
    assert!(
        all.iter()
            .all(|(_, s)| !s.args.is_empty() || !s.env.is_empty()),
        "{all:?}"
    );
    // And the check does catch a setting that does not exist.
    let typo = std::panic::catch_unwind(|| {
        check(
            "gateway",
            &Settings {
                origin: "typo".into(),
                args: vec!["--spool-directory".into(), "/x".into()],
                env: vec![],
            },
        )
    });
    assert!(typo.is_err());
}

/// The first line the process at `log` wrote, once there is one.
fn first_line(log: &Path) -> String {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().next()
            && text.contains('\n')
        {
            return line.to_owned();
        }
        assert!(Instant::now() < until, "nothing logged in {log:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn log_format_json_logs_json_lines_and_the_health_check_script_works() {
    for (bin, listen_var, health) in [
        ("aggregator", "AGGREGATOR_LISTEN", "/healthz"),
        ("gateway", "GATEWAY_LISTEN", "/readyz"),
    ] {
        let port = free_port();
        let log =
            std::env::temp_dir().join(format!("packaging-{bin}-{}.log", uuid::Uuid::new_v4()));
        let spool = std::env::temp_dir().join(format!("packaging-spool-{}", uuid::Uuid::new_v4()));
        let process = Process::spawn_logged_args(
            bin,
            bin,
            &["--log-format", "json"],
            &[
                ("REDIS_URL", redis_url().to_owned()),
                ("METER_STREAM", tests::harness::unique_stream()),
                (listen_var, format!("127.0.0.1:{port}")),
                ("GATEWAY_SPOOL_DIR", spool.display().to_string()),
                ("RUST_LOG", "info".to_owned()),
            ],
            &log,
        );
        let line = first_line(&log);
        let record: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{bin} logged a non-JSON line {line:?}: {e}"));
        assert!(record["timestamp"].is_string(), "{line}");
        assert!(record["level"].is_string(), "{line}");
        assert!(record["fields"]["message"].is_string(), "{line}");

        // The Dockerfile's HEALTHCHECK script, run as the image runs it.
        let dockerfile = read("Dockerfile");
        let script = dockerfile
            .split("<<'SH' /usr/local/bin/http-ok\n")
            .nth(1)
            .and_then(|rest| rest.split("\nSH\n").next())
            .expect("the http-ok script in the Dockerfile");
        let probe = |path: &str| {
            std::process::Command::new("bash")
                .args(["-c", script, "http-ok", &port.to_string(), path])
                .status()
                .unwrap()
                .success()
        };
        let until = Instant::now() + Duration::from_secs(60);
        while !probe(health) {
            assert!(Instant::now() < until, "{bin} {health} is not healthy");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(!probe("/no-such-route"), "{bin}: a 404 is not healthy");
        process.kill();
        let _ = std::fs::remove_file(&log);
        let _ = std::fs::remove_dir_all(&spool);
    }
}
