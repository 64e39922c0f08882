//! A headless Chromium for the dashboard's end-to-end test, driven through chromedriver over the
//! WebDriver protocol, which is plain JSON over HTTP: reqwest is all it takes.
//!
//! chromedriver runs on a free port for one [`Browser`]; dropping the `Browser` ends the session
//! (which closes Chromium) and kills chromedriver, on a panic too.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test support: failing loudly is the point

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{eventually, free_port};

pub const CHROMIUM: &str = "/usr/bin/chromium";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    http: reqwest::Client,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium of 1280×1600. Panics, naming the packages,
    /// when either is missing: the test must not pass by skipping.
    pub async fn start() -> Self {
        for tool in [CHROMIUM, "chromedriver"] {
            let found = Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                found,
                "`{tool}` is not installed; the dashboard test needs Debian's chromium and \
                 chromium-driver packages (`apt-get install chromium chromium-driver`, as .ci/run does)"
            );
        }
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        eventually(Duration::from_secs(30), || async {
            let status = http.get(format!("{base}/status")).send().await.ok()?;
            let body: Value = status.json().await.ok()?;
            (body["value"]["ready"] == true).then_some(())
        })
        .await;
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--window-size=1280,1600", "--disable-dev-shm-usage"],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let response: Value = http
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await
            .expect("chromedriver answers")
            .json()
            .await
            .expect("a JSON answer");
        let session = response["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {response}"))
            .to_owned();
        Self {
            driver,
            port,
            session,
            http,
        }
    }

    /// One WebDriver command; returns its `value`, panicking on a WebDriver error.
    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        self.try_command(method, path, body)
            .await
            .unwrap_or_else(|(error, message)| panic!("WebDriver {path}: {error}: {message}"))
    }

    /// One WebDriver command; a WebDriver error as (error code, message).
    async fn try_command(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, (String, String)> {
        let url = format!(
            "http://127.0.0.1:{}/session/{}{path}",
            self.port, self.session
        );
        let mut request = self.http.request(method, url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer: Value = request.send().await.unwrap().json().await.unwrap();
        match answer["value"]["error"].as_str() {
            Some(error) => Err((error.to_owned(), answer["value"]["message"].to_string())),
            None => Ok(answer["value"].clone()),
        }
    }

    pub async fn goto(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    /// Runs `body` as a function in the page and returns what it returns.
    pub async fn script(&self, body: &str) -> Value {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": body, "args": []})),
        )
        .await
    }

    /// The text content of the first element matching `css`, or `None` while there is none or
    /// it is not displayed.
    pub async fn text(&self, css: &str) -> Option<String> {
        let css = serde_json::to_string(css).unwrap();
        self.script(&format!(
            "const e = document.querySelector({css}); return e && e.checkVisibility() ? e.textContent : null;"
        ))
        .await
        .as_str()
        .map(str::to_owned)
    }

    /// An attribute of the first element matching `css`.
    pub async fn attribute(&self, css: &str, name: &str) -> Option<String> {
        let css = serde_json::to_string(css).unwrap();
        let name = serde_json::to_string(name).unwrap();
        self.script(&format!(
            "const e = document.querySelector({css}); return e && e.getAttribute({name});"
        ))
        .await
        .as_str()
        .map(str::to_owned)
    }

    /// Waits (generously: the machine is loaded) until the text of `css` satisfies `ok`.
    pub async fn wait_for_text(&self, css: &str, ok: impl Fn(&str) -> bool) -> String {
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let text = self.text(css).await;
            if let Some(text) = &text
                && ok(text)
            {
                return text.clone();
            }
            assert!(
                tokio::time::Instant::now() < until,
                "{css} never showed the expected text; last: {text:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn element(&self, css: &str) -> String {
        let found = self
            .command(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        found[ELEMENT].as_str().unwrap().to_owned()
    }

    /// Clicks the element matching `css` as a user would (it must be visible). The page
    /// re-renders on its own every 30 s: an element replaced between finding and clicking is
    /// found again.
    pub async fn click(&self, css: &str) {
        for _ in 0..5 {
            let id = self.element(css).await;
            match self
                .try_command(
                    reqwest::Method::POST,
                    &format!("/element/{id}/click"),
                    Some(json!({})),
                )
                .await
            {
                Ok(_) => return,
                Err((error, _)) if error == "stale element reference" => continue,
                Err((error, message)) => panic!("clicking {css}: {error}: {message}"),
            }
        }
        panic!("{css} kept being replaced before it could be clicked");
    }

    /// Types `text` into the element matching `css`.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    /// The browser console's entries since the last call (chromedriver's log endpoint).
    pub async fn console(&self) -> Vec<Value> {
        let log = self
            .command(
                reqwest::Method::POST,
                "/se/log",
                Some(json!({"type": "browser"})),
            )
            .await;
        log.as_array().cloned().unwrap_or_default()
    }

    /// Resizes the window, as a phone or a narrow laptop window would be.
    pub async fn resize(&self, width: u32, height: u32) {
        self.command(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Vec<u8> {
        let encoded = self
            .command(reqwest::Method::GET, "/screenshot", None)
            .await;
        base64_decode(encoded.as_str().unwrap())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A blocking `DELETE /session/{id}` (Drop cannot await): it closes Chromium, which
        // would otherwise outlive chromedriver.
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let request = format!(
                "DELETE /session/{} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.session, self.port
            );
            if stream.write_all(request.as_bytes()).is_ok() {
                let _ = stream.read_to_end(&mut Vec::new());
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .map(value)
        .collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, d)| n | u32::from(*d) << (18 - 6 * i));
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_decodes_with_and_without_padding() {
        assert_eq!(super::base64_decode("TWFu"), b"Man");
        assert_eq!(super::base64_decode("TWE="), b"Ma");
        assert_eq!(super::base64_decode("TQ=="), b"M");
    }
}
