//! `scripts/dev.sh`, the README's first command, run for real: on ports and a run dir of its
//! own, with its own private Redis, twice in the same run dir, stopped with SIGINT as Ctrl-C
//! does.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::harness::free_port;

const ADMIN_TOKEN: &str = "demo-test-admin";

struct Ports {
    gateway: u16,
    aggregator: u16,
    mock: u16,
    redis: u16,
}

/// One run of the script. Dropping it kills the script's process group and every process the
/// script started (it writes their pids to `pids` in the run dir: they run in sessions of their
/// own, out of the script's group), so a failing test leaves nothing behind.
struct Demo {
    child: Child,
    run_dir: PathBuf,
    output: Arc<Mutex<String>>,
}

impl Demo {
    fn start(run_dir: &Path, ports: &Ports) -> Self {
        use std::os::unix::process::CommandExt;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/dev.sh");
        let mut child = Command::new("bash")
            .arg(script)
            .env_remove("REDIS_URL")
            .env("CARGO", env!("CARGO"))
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            .env("METER_DEMO_DIR", run_dir)
            .env("METER_DEMO_GATEWAY_PORT", ports.gateway.to_string())
            .env("METER_DEMO_AGGREGATOR_PORT", ports.aggregator.to_string())
            .env("METER_DEMO_MOCK_PORT", ports.mock.to_string())
            .env("METER_DEMO_REDIS_PORT", ports.redis.to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let mut output = output.lock().unwrap();
                    output.push_str(&line);
                    output.push('\n');
                }
            });
        }
        Self {
            child,
            run_dir: run_dir.to_owned(),
            output,
        }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits until the script printed its "try this" text (it builds first: the test built the
    /// binaries already, so that is quick, but the machine may be loaded).
    fn wait_until_ready(&mut self) -> String {
        let until = Instant::now() + Duration::from_secs(600);
        loop {
            let output = self.output();
            if output.contains("stops everything") {
                return output;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("dev.sh exited early ({status}):\n{output}");
            }
            assert!(Instant::now() < until, "dev.sh is not ready:\n{output}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGINT, as a Ctrl-C in the terminal sends to the script; the exit status and output.
    fn interrupt(mut self) -> (std::process::ExitStatus, String) {
        let sent = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let until = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < until,
                "dev.sh did not stop:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        // The reader threads see the end of both pipes shortly after the exit.
        std::thread::sleep(Duration::from_millis(200));
        (status, self.output())
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let pids = std::fs::read_to_string(self.run_dir.join("pids")).unwrap_or_default();
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

/// The value after `label` on the line that starts with it.
fn printed(output: &str, label: &str) -> String {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {label:?} in:\n{output}"))
        .to_owned()
}

async fn admin_list(http: &reqwest::Client, gateway: u16, what: &str) -> Vec<Value> {
    let list: Value = http
        .get(format!("http://127.0.0.1:{gateway}/admin/{what}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list["data"].as_array().unwrap().clone()
}

/// Both routes answer 200 with the demo key: the Anthropic one (`x-api-key`) and the OpenAI
/// one (bearer).
async fn both_providers_answer(http: &reqwest::Client, gateway: u16, key: &str) {
    let messages = http
        .post(format!("http://127.0.0.1:{gateway}/v1/messages"))
        .header("x-api-key", key)
        .json(&json!({"model": "claude-sonnet-4-5", "max_tokens": 64,
                      "messages": [{"role": "user", "content": "Hello"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(messages.status(), 200, "{:?}", messages.text().await);
    let chat = http
        .post(format!("http://127.0.0.1:{gateway}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 200, "{:?}", chat.text().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_script_runs_twice_with_its_own_redis_and_stops_cleanly_on_ctrl_c() {
    // Built once for the whole test binary; the script's own `cargo build` then finds them fresh.
    for bin in ["gateway", "aggregator"] {
        tests::process::binary(bin, bin);
    }
    tests::process::binary("tests", "mock-upstream");
    let run_dir =
        std::env::temp_dir().join(format!("meter-demo-{}", uuid::Uuid::new_v4().simple()));
    let ports = Ports {
        gateway: free_port(),
        aggregator: free_port(),
        mock: free_port(),
        redis: free_port(),
    };
    let http = reqwest::Client::new();

    let mut first = Demo::start(&run_dir, &ports);
    let output = tokio::task::block_in_place(|| first.wait_until_ready());
    let key = printed(&output, "demo key:");
    let key_id = printed(&output, "demo key id:");
    assert!(
        key.starts_with("mk-") && key_id.starts_with("key_"),
        "{output}"
    );
    // Its own Redis, and the usage command it prints says which.
    let redis_url = format!("redis://127.0.0.1:{}", ports.redis);
    assert!(
        output.contains(&format!("redis       {redis_url}")),
        "{output}"
    );
    assert!(
        output.contains(&format!("usage --redis-url {redis_url}")),
        "{output}"
    );
    // The dashboard it points at is there.
    let dashboard = format!("http://127.0.0.1:{}/", ports.aggregator);
    assert!(
        output.contains(&format!("dashboard   {dashboard}")),
        "{output}"
    );
    let page = http.get(&dashboard).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("<html"));
    let key_file = run_dir.join("demo-key");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{key_file:?}");
    }
    both_providers_answer(&http, ports.gateway, &key).await;
    let accounts = admin_list(&http, ports.gateway, "accounts").await;
    let keys = admin_list(&http, ports.gateway, "keys").await;
    assert_eq!(accounts.len(), 2, "{accounts:?}");
    assert_eq!(keys.len(), 1, "{keys:?}");
    let (status, output) = tokio::task::block_in_place(|| first.interrupt());
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(!output.contains("unexpectedly"), "{output}");

    // The second run finds the accounts and the key again and reprints the same key.
    let mut second = Demo::start(&run_dir, &ports);
    let output = tokio::task::block_in_place(|| second.wait_until_ready());
    assert_eq!(printed(&output, "demo key:"), key, "{output}");
    assert_eq!(printed(&output, "demo key id:"), key_id, "{output}");
    both_providers_answer(&http, ports.gateway, &key).await;
    assert_eq!(admin_list(&http, ports.gateway, "accounts").await.len(), 2);
    assert_eq!(admin_list(&http, ports.gateway, "keys").await.len(), 1);
    let (status, output) = tokio::task::block_in_place(|| second.interrupt());
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(!output.contains("unexpectedly"), "{output}");

    // Logs are for files and log shippers: no terminal colour codes.
    let mut logs = 0;
    for entry in std::fs::read_dir(&run_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(!text.contains("\x1b["), "colour codes in {path:?}:\n{text}");
            logs += 1;
        }
    }
    assert!(
        logs >= 4,
        "gateway, aggregator, mock and redis logs in {run_dir:?}"
    );
    let _ = std::fs::remove_dir_all(&run_dir);
}
