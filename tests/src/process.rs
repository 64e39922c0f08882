//! The built binaries, for tests that must kill or restart a real process.
//!
//! `CARGO_BIN_EXE_*` only exists inside the package that owns a binary, so the binaries are
//! built here once per test process with the same cargo and profile as the test run.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test support: failing loudly is the point

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// Path of the binary `bin` of package `package`, built on first use.
pub fn binary(package: &str, bin: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap();
    if let Some(path) = built.get(bin) {
        return path.clone();
    }
    let output = Command::new(env!("CARGO"))
        .args([
            // Every binary of the workspace at once: with `-p <package>` cargo resolves another
            // feature set and rebuilds reqwest, rustls and the binary on each test run.
            "build",
            "--workspace",
            "--bins",
            "--quiet",
            "--message-format=json",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit())
        .output()
        .expect("cargo runs");
    assert!(output.status.success(), "building {bin} failed");
    let path = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| {
            m["reason"] == "compiler-artifact"
                && m["target"]["name"] == bin
                && m["target"]["kind"] == serde_json::json!(["bin"])
                && m["package_id"]
                    .as_str()
                    .is_some_and(|id| id.contains(package))
        })
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo reports the executable");
    built.insert(bin.to_owned(), path.clone());
    path
}

/// A child process that is SIGKILLed when dropped, so a failing test leaves nothing behind.
pub struct Process {
    child: Child,
}

impl Process {
    pub fn spawn(package: &str, bin: &str, env: &[(&str, String)]) -> Self {
        let mut command = Self::command(package, bin, env);
        command.stdout(Stdio::inherit());
        Self {
            child: command.spawn().expect("binary starts"),
        }
    }

    /// Like [`Process::spawn`], with stdout and stderr appended to the file `log`, for tests
    /// that read what a process printed.
    pub fn spawn_logged(
        package: &str,
        bin: &str,
        env: &[(&str, String)],
        log: &std::path::Path,
    ) -> Self {
        Self::spawn_logged_args(package, bin, &[], env, log)
    }

    /// Like [`Process::spawn_logged`], with command-line arguments.
    pub fn spawn_logged_args(
        package: &str,
        bin: &str,
        args: &[&str],
        env: &[(&str, String)],
        log: &std::path::Path,
    ) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file opens");
        let mut command = Self::command(package, bin, env);
        command
            .args(args)
            .stdout(file.try_clone().expect("log file handle"))
            .stderr(file);
        Self {
            child: command.spawn().expect("binary starts"),
        }
    }

    fn command(package: &str, bin: &str, env: &[(&str, String)]) -> Command {
        let mut command = Command::new(binary(package, bin));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        for (k, v) in env {
            command.env(k, v);
        }
        command
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown code runs, exactly like a crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (a `kill` name: `STOP`, `CONT`, ...) without waiting for anything.
    pub fn signal(&self, signal: &str) {
        assert!(
            self.try_signal(signal),
            "kill -{signal} {}",
            self.child.id()
        );
    }

    /// Whether the process has exited (without waiting).
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_some()
    }

    /// Sends `signal`; false if the process is gone already.
    pub fn try_signal(&self, signal: &str) -> bool {
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs")
            .success()
    }

    /// The exit status once the process has exited, or `None` if it still runs after `limit`.
    pub fn wait_for_exit(
        &mut self,
        limit: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        let until = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return Some(status);
            }
            if std::time::Instant::now() >= until {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().expect("wait")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last 1,500 characters of a child's log file (empty if unreadable), for an error that
/// says why the child stopped.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text
        .char_indices()
        .rev()
        .nth(1500)
        .map_or(0, |(index, _)| index);
    text[start..].to_owned()
}
