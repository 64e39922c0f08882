//! The wrk driver: the same closed loop as `load`, sent by the `wrk` executable instead of our
//! reqwest client, whose per-request CPU on a 2-core machine caps what the gateway can show.
//!
//! A run writes a Lua script that turns wrk's default GET into exactly the request `load` sends,
//! then runs wrk twice: a warm-up process, and the measured one, separately so that the caller
//! can sample the gateway right around it. wrk reports no per-request data, only a summary on
//! stdout, which [`parse`] reads. When it stops, wrk closes its connections with requests still
//! in flight; those are in none of its counts.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::Command;

use crate::load::{LoadResult, LoadSpec, request_body};

/// wrk's bound on one request (its default is 2 s), the same as the reqwest driver's timeout.
const TIMEOUT: &str = "10s";

/// True when a `wrk` executable is on `PATH`.
pub fn on_path() -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| is_executable(&dir.join("wrk")))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// One run's script and command line. The script lives in a directory of its own that is
/// removed on drop, also when an interrupt drops the run halfway.
pub struct Wrk {
    dir: PathBuf,
    script: PathBuf,
    url: String,
    concurrency: usize,
}

impl Wrk {
    pub fn prepare(spec: &LoadSpec) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("meter-loadgen-wrk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let script = dir.join("request.lua");
        // Owned from here, so a failed write below still removes the directory.
        let wrk = Self {
            dir,
            script,
            url: spec.url.clone(),
            concurrency: spec.concurrency,
        };
        std::fs::write(&wrk.script, lua_script(spec))
            .with_context(|| format!("writing {}", wrk.script.display()))?;
        Ok(wrk)
    }

    /// Runs wrk for `duration`, in whole seconds and at least one (its `-d` takes no finer
    /// unit), and parses its summary.
    pub async fn run(&self, duration: Duration) -> anyhow::Result<WrkOutput> {
        // wrk needs at least as many connections as threads; two threads match the two cores.
        let threads = if self.concurrency < 2 { 1 } else { 2 };
        let output = Command::new("wrk")
            .arg(format!("-t{threads}"))
            .arg(format!("-c{}", self.concurrency))
            .arg(format!("-d{}s", duration.as_secs().max(1)))
            .args(["--timeout", TIMEOUT, "--latency", "-s"])
            .arg(&self.script)
            .arg(&self.url)
            .stdin(Stdio::null())
            // An interrupt drops this future; wrk must not keep loading the servers after it.
            .kill_on_drop(true)
            .output()
            .await
            .context("running wrk")?;
        if !output.status.success() {
            bail!(
                "wrk exited ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        parse(&String::from_utf8_lossy(&output.stdout))
    }
}

impl Drop for Wrk {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The Lua script that makes every wrk request the one `load::request_body` describes.
fn lua_script(spec: &LoadSpec) -> String {
    let body = request_body(spec.stream);
    format!(
        "-- Written by loadgen: the request of its reqwest driver, for wrk.\n\
         wrk.method = \"POST\"\n\
         wrk.body = {}\n\
         wrk.headers[\"content-type\"] = \"application/json\"\n\
         wrk.headers[\"x-api-key\"] = {}\n\
         wrk.headers[\"anthropic-version\"] = \"2023-06-01\"\n",
        lua_string(&body),
        lua_string(spec.api_key.as_bytes()),
    )
}

/// A double-quoted Lua string literal of `bytes`. Everything but printable ASCII becomes a
/// three-digit decimal escape, the one form that LuaJIT (wrk's Lua) and every Lua since 5.1 read
/// the same and that a following digit cannot extend.
fn lua_string(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 2);
    out.push('"');
    for &b in bytes {
        match b {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(char::from(b));
            }
            b' '..=b'~' => out.push(char::from(b)),
            _ => out.push_str(&format!("\\{b:03}")),
        }
    }
    out.push('"');
    out
}

/// What one wrk process printed, as far as the report needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct WrkOutput {
    /// Complete responses of any status (`N requests in T`).
    pub requests: u64,
    /// `T` of that line; wrk prints it with two decimals.
    pub elapsed_us: u64,
    pub requests_per_sec: f64,
    /// From the `--latency` distribution, over every response, non-2xx included.
    pub p50_us: u64,
    pub p99_us: u64,
    /// `Non-2xx or 3xx responses`, a line wrk prints only when there are some.
    pub non_2xx: u64,
    /// `Socket errors`, a line wrk prints only when there are some.
    pub socket: SocketErrors,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketErrors {
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub timeout: u64,
}

impl SocketErrors {
    fn total(self) -> u64 {
        self.connect + self.read + self.write + self.timeout
    }
}

impl WrkOutput {
    /// wrk counts 3xx as success too; the servers here send none.
    fn ok(&self) -> u64 {
        self.requests.saturating_sub(self.non_2xx)
    }

    fn errors(&self) -> u64 {
        self.non_2xx + self.socket.total()
    }

    /// wrk's own elapsed time. `Requests/sec` is `requests` over it unrounded, so dividing the
    /// two recovers it far more precisely than the two decimals of `T`, which is the fallback
    /// when there were no requests.
    fn elapsed(&self) -> Duration {
        if self.requests > 0 && self.requests_per_sec > 0.0 {
            Duration::from_secs_f64(self.requests as f64 / self.requests_per_sec)
        } else {
            Duration::from_micros(self.elapsed_us)
        }
    }

    fn error_summary(&self) -> Option<String> {
        let s = self.socket;
        let mut parts = Vec::new();
        if self.non_2xx > 0 {
            parts.push(format!("{} non-2xx responses", self.non_2xx));
        }
        if s.total() > 0 {
            parts.push(format!(
                "socket errors: connect {}, read {}, write {}, timeout {}",
                s.connect, s.read, s.write, s.timeout
            ));
        }
        (!parts.is_empty()).then(|| format!("wrk: {}", parts.join("; ")))
    }
}

/// The run's result from its two processes: the window is the measured one, the whole-run
/// totals (responses for the client count, errors) add the warm-up.
///
/// Throughput is 2xx responses over wrk's own elapsed time rather than over the nominal `-d`:
/// wrk's run lasts a little longer than `-d` when its threads cannot stop at once, and the
/// responses it counts are those of its whole run. That is wrk's `Requests/sec` scaled by the
/// share of 2xx. Its percentiles cover every response; with no 2xx there are none to report,
/// as with the reqwest driver.
pub fn result(warmup: &WrkOutput, measured: &WrkOutput) -> LoadResult {
    let ok = measured.ok();
    LoadResult {
        ok,
        p50_us: (ok > 0).then_some(measured.p50_us),
        p99_us: (ok > 0).then_some(measured.p99_us),
        errors: measured.errors(),
        errors_total: warmup.errors() + measured.errors(),
        first_error: warmup
            .error_summary()
            .map(|e| format!("in the warm-up, {e}"))
            .or_else(|| measured.error_summary()),
        responses: warmup.requests + measured.requests,
        window: measured.elapsed(),
    }
}

/// Reads wrk's summary (run with `--latency`); fails, quoting it, when a needed line is missing
/// or unreadable.
pub fn parse(text: &str) -> anyhow::Result<WrkOutput> {
    parse_lines(text).with_context(|| format!("unexpected wrk output:\n{}", text.trim_end()))
}

fn parse_lines(text: &str) -> anyhow::Result<WrkOutput> {
    let (mut requests, mut elapsed_us, mut requests_per_sec) = (None, None, None);
    let (mut p50_us, mut p99_us) = (None, None);
    let (mut non_2xx, mut socket) = (0, SocketErrors::default());
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            requests_per_sec = Some(number(v).context("Requests/sec")?);
        } else if let Some(v) = line.strip_prefix("50%") {
            p50_us = Some(micros(v).context("the 50% latency")?);
        } else if let Some(v) = line.strip_prefix("99%") {
            p99_us = Some(micros(v).context("the 99% latency")?);
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            non_2xx = count(v).context("Non-2xx or 3xx responses")?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            socket = socket_errors(v).context("Socket errors")?;
        } else if let Some((n, rest)) = line.split_once(" requests in ") {
            // `30878 requests in 1.00s, 37.90MB read`
            requests = Some(count(n).context("the request count")?);
            let t = rest.split(',').next().unwrap_or(rest);
            elapsed_us = Some(micros(t).context("the run's time")?);
        }
    }
    Ok(WrkOutput {
        requests: requests.context("no `N requests in T` line")?,
        elapsed_us: elapsed_us.context("no run time")?,
        requests_per_sec: requests_per_sec.context("no `Requests/sec` line")?,
        p50_us: p50_us.context("no `50%` line (was wrk run with --latency?)")?,
        p99_us: p99_us.context("no `99%` line (was wrk run with --latency?)")?,
        non_2xx,
        socket,
    })
}

fn count(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    text.parse()
        .with_context(|| format!("{text:?} is not a count"))
}

fn number(text: &str) -> anyhow::Result<f64> {
    let text = text.trim();
    text.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .with_context(|| format!("{text:?} is not a number"))
}

/// A wrk time such as `920.00us`, `0.92ms`, `1.00s` or `1.50m`, in microseconds.
fn micros(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let unit_at = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("{text:?} has no unit"))?;
    let (value, unit) = text.split_at(unit_at);
    let per_unit = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => bail!("{text:?} has an unknown unit"),
    };
    Ok((number(value)? * per_unit).round() as u64)
}

/// `connect 0, read 64, write 20869, timeout 0`
fn socket_errors(text: &str) -> anyhow::Result<SocketErrors> {
    let mut errors = SocketErrors::default();
    let mut seen = 0;
    for part in text.split(',') {
        let (name, n) = part
            .trim()
            .split_once(' ')
            .with_context(|| format!("{part:?} is not `name count`"))?;
        let slot = match name {
            "connect" => &mut errors.connect,
            "read" => &mut errors.read,
            "write" => &mut errors.write,
            "timeout" => &mut errors.timeout,
            _ => bail!("unknown socket error kind {name:?}"),
        };
        *slot = count(n)?;
        seen += 1;
    }
    if seen != 4 {
        bail!("{text:?} does not have the four kinds of socket error");
    }
    Ok(errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `wrk -t2 -c32 -d1s --latency` against the mock upstream, non-streaming.
    const CLEAN: &str = "Running 1s test @ http://127.0.0.1:39123/v1/messages
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.30ms    1.45ms  20.99ms   89.66%
    Req/Sec    15.51k     4.11k   22.56k    70.00%
  Latency Distribution
     50%    0.92ms
     75%    1.41ms
     90%    2.82ms
     99%    7.90ms
  30878 requests in 1.00s, 37.90MB read
Requests/sec:  30790.95
Transfer/sec:     37.79MB
";

    /// `wrk -t1 -c1 -d1s --latency` against a path the mock answers with 404.
    const NON_2XX: &str = "Running 1s test @ http://127.0.0.1:39123/nope
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   233.53us  683.97us   5.45ms   92.11%
    Req/Sec    23.53k     8.39k   31.55k    70.00%
  Latency Distribution
     50%   32.00us
     75%   50.00us
     90%  410.00us
     99%    3.65ms
  23413 requests in 1.00s, 20.45MB read
  Non-2xx or 3xx responses: 23413
Requests/sec:  23360.86
Transfer/sec:     20.41MB
";

    /// `wrk -t2 -c32 -d1s --latency` with the mock killed halfway.
    const SOCKET_ERRORS: &str = "Running 1s test @ http://127.0.0.1:39123/v1/messages
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.98ms    0.89ms  13.60ms   86.01%
    Req/Sec    14.14k     7.17k   23.08k    58.33%
  Latency Distribution
     50%  761.00us
     75%    1.03ms
     90%    2.02ms
     99%    4.64ms
  16906 requests in 1.11s, 20.75MB read
  Socket errors: connect 0, read 64, write 20869, timeout 0
Requests/sec:  15288.88
Transfer/sec:     18.77MB
";

    /// `wrk -t1 -c1 -d1s --latency` against a server that accepts and never answers.
    const NO_ANSWER: &str = "Running 1s test @ http://127.0.0.1:39124/v1/messages
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     0.00      0.00     0.00      -nan%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  0 requests in 1.00s, 0.00B read
Requests/sec:      0.00
Transfer/sec:       0.00B
";

    #[test]
    fn a_clean_run_is_read_in_full() {
        let out = parse(CLEAN).unwrap();
        assert_eq!(
            out,
            WrkOutput {
                requests: 30878,
                elapsed_us: 1_000_000,
                requests_per_sec: 30790.95,
                p50_us: 920,
                p99_us: 7900,
                non_2xx: 0,
                socket: SocketErrors::default(),
            }
        );
    }

    #[test]
    fn non_2xx_responses_are_counted() {
        let out = parse(NON_2XX).unwrap();
        assert_eq!(out.requests, 23413);
        assert_eq!(out.non_2xx, 23413);
        assert_eq!((out.p50_us, out.p99_us), (32, 3650));
        assert_eq!(out.socket, SocketErrors::default());
    }

    #[test]
    fn socket_errors_are_read_by_kind() {
        let out = parse(SOCKET_ERRORS).unwrap();
        assert_eq!(out.non_2xx, 0);
        assert_eq!(
            out.socket,
            SocketErrors {
                connect: 0,
                read: 64,
                write: 20869,
                timeout: 0
            }
        );
        assert_eq!(out.elapsed_us, 1_110_000);
        assert_eq!(out.p50_us, 761);
    }

    #[test]
    fn times_are_read_in_every_unit() {
        assert_eq!(micros("920.00us").unwrap(), 920);
        assert_eq!(micros(" 7.90ms").unwrap(), 7900);
        assert_eq!(micros("1.11s").unwrap(), 1_110_000);
        assert_eq!(micros("1.50m").unwrap(), 90_000_000);
        assert!(micros("1.5").is_err());
        assert!(micros("1.5ns").is_err());
        assert!(micros("-1ms").is_err());
    }

    #[test]
    fn malformed_output_is_an_error_that_quotes_it() {
        let truncated = CLEAN.replace("Requests/sec:  30790.95\n", "");
        let error = format!("{:#}", parse(&truncated).unwrap_err());
        assert!(error.contains("Requests/sec"), "{error}");
        assert!(error.contains("30878 requests in 1.00s"), "{error}");
        let without_latency = CLEAN.replace("     99%    7.90ms\n", "");
        assert!(parse(&without_latency).is_err());
        assert!(parse(&CLEAN.replace("0.92ms", "fast")).is_err());
        assert!(parse(&NON_2XX.replace(": 23413", ": many")).is_err());
        let two_kinds = SOCKET_ERRORS.replace(", write 20869, timeout 0", "");
        assert!(parse(&two_kinds).is_err());
        assert!(parse("").is_err());
        assert!(parse("unable to connect to 127.0.0.1:1 Connection refused").is_err());
    }

    #[test]
    fn the_result_counts_2xx_over_the_elapsed_time_and_warm_up_in_totals() {
        let warmup = parse(NON_2XX).unwrap();
        let measured = parse(SOCKET_ERRORS).unwrap();
        let r = result(&warmup, &measured);
        assert_eq!(r.ok, 16906);
        assert_eq!(r.errors, 64 + 20869);
        assert_eq!(r.errors_total, 23413 + 64 + 20869);
        assert_eq!(r.responses, 23413 + 16906);
        assert_eq!((r.p50_us, r.p99_us), (Some(761), Some(4640)));
        // 16906 / 15288.88 s, not the 1.11 s printed.
        assert!((r.requests_per_sec() - 15288.88).abs() < 0.01);
        let first = r.first_error.unwrap();
        assert!(
            first.starts_with("in the warm-up, wrk: 23413 non-2xx"),
            "{first}"
        );
    }

    #[test]
    fn a_run_without_answers_has_no_percentiles_and_no_rate() {
        let out = parse(NO_ANSWER).unwrap();
        let r = result(&out, &out);
        assert_eq!((r.ok, r.errors, r.p50_us, r.p99_us), (0, 0, None, None));
        assert_eq!(r.window, Duration::from_secs(1));
        assert_eq!(r.requests_per_sec(), 0.0);
        assert_eq!(r.first_error, None);
    }

    #[test]
    fn the_script_carries_the_reqwest_body_as_a_lua_string() {
        let spec = LoadSpec {
            url: "http://127.0.0.1:1/v1/messages".to_owned(),
            api_key: "sk-\"q\"".to_owned(),
            stream: true,
            concurrency: 1,
            warmup: Duration::ZERO,
            duration: Duration::ZERO,
        };
        let lua = lua_script(&spec);
        let body = String::from_utf8(request_body(true).to_vec()).unwrap();
        let quoted = format!("wrk.body = \"{}\"\n", body.replace('"', "\\\""));
        assert!(lua.contains(&quoted), "{lua}");
        assert!(lua.contains("wrk.method = \"POST\"\n"));
        assert!(lua.contains("wrk.headers[\"x-api-key\"] = \"sk-\\\"q\\\"\"\n"));
        assert!(lua.contains("wrk.headers[\"content-type\"] = \"application/json\"\n"));
        assert!(lua.contains("wrk.headers[\"anthropic-version\"] = \"2023-06-01\"\n"));
    }

    #[test]
    fn lua_strings_escape_quotes_backslashes_and_everything_unprintable() {
        assert_eq!(lua_string(br#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(lua_string(b"x\ny\0" as &[u8]), r#""x\010y\000""#);
        assert_eq!(lua_string("é1".as_bytes()), r#""\195\1691""#);
    }
}
