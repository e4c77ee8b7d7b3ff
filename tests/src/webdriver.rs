//! A small WebDriver client (the W3C protocol over HTTP) driving headless Chromium through
//! Debian's `chromedriver`, for the browser tests. Only what they use: sessions, navigation,
//! elements (find, click, type, text, attributes), a script to read the page, screenshots
//! and alerts.
//!
//! `chromedriver` and `chromium` come from Debian's packages (`.ci/run` and `make services`
//! install them where missing). [`Browser`] starts one `chromedriver` on a free port and
//! kills it when dropped; each [`Session`] is a separate browser (its own profile: no
//! shared storage between two users' sessions).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use serde_json::{Value, json};

/// The key under which WebDriver names an element (W3C).
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// How long [`Session::wait_for`] and its friends wait, by default: generous, since a
/// debug server on a loaded two-core machine answers slowly and the page polls every 2 s.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A running `chromedriver`, killed when dropped.
pub struct Browser {
    driver: Child,
    url: String,
    http: awc::Client,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser").field("url", &self.url).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("url", &self.url).finish_non_exhaustive()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    /// Starts `chromedriver` (found on `PATH`, or named by `CHROMEDRIVER`) and waits until
    /// it is ready.
    ///
    /// # Errors
    /// When it is not installed or does not get ready within a minute.
    pub async fn start() -> anyhow::Result<Self> {
        let binary = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let driver = Command::new(&binary)
            .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!("failed to start {binary} (Debian: apt-get install chromium chromium-driver; `make services` does)")
            })?;
        let browser = Self { driver, url: format!("http://127.0.0.1:{port}"), http: awc::Client::default() };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let ready = async {
                let mut answer = browser.http.get(format!("{}/status", browser.url)).send().await.ok()?;
                let status: Value = answer.json().await.ok()?;
                status["value"]["ready"].as_bool()
            }
            .await;
            if ready == Some(true) {
                return Ok(browser);
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "chromedriver did not get ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A new headless browser, `width` x `height` CSS pixels (a phone is about 412 x 915).
    ///
    /// # Errors
    /// When Chromium cannot start.
    pub async fn session(&self, width: u32, height: u32) -> anyhow::Result<Session> {
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-extensions", format!("--window-size={width},{height}"),
                ],
            },
        }}});
        let answer =
            call(&self.http, awc::http::Method::POST, &format!("{}/session", self.url), Some(capabilities))
                .await
                .context("a new Chromium session")?;
        let id = answer["sessionId"].as_str().context("no session id")?.to_owned();
        Ok(Session { url: format!("{}/session/{id}", self.url), http: self.http.clone(), shots: None })
    }
}

/// One browser window.
pub struct Session {
    url: String,
    http: awc::Client,
    /// Where [`Session::screenshot`] writes, and under what name prefix.
    shots: Option<(PathBuf, String)>,
}

/// An element of the page.
#[derive(Debug, Clone)]
pub struct Element(String);

impl Session {
    async fn command(
        &self,
        method: awc::http::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        call(&self.http, method, &format!("{}{path}", self.url), body).await
    }

    /// Saves screenshots under `dir`, named `<prefix>-<step>.png`.
    pub fn screenshots_to(&mut self, dir: &Path, prefix: &str) {
        self.shots = Some((dir.to_owned(), prefix.to_owned()));
    }

    /// Opens `url`.
    ///
    /// # Errors
    /// When the browser fails.
    pub async fn open(&self, url: &str) -> anyhow::Result<()> {
        self.command(awc::http::Method::POST, "/url", Some(json!({"url": url}))).await.map(drop)
    }

    /// The element matching `css`, if there is one now.
    ///
    /// # Errors
    /// When the browser fails (not when nothing matches).
    pub async fn find(&self, css: &str) -> anyhow::Result<Option<Element>> {
        let answer = self
            .command(
                awc::http::Method::POST,
                "/elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        Ok(answer
            .as_array()
            .and_then(|all| all.first())
            .and_then(|e| e[ELEMENT].as_str())
            .map(|id| Element(id.to_owned())))
    }

    /// The element matching `css`, waiting for it.
    ///
    /// # Errors
    /// When none appears within [`PATIENCE`].
    pub async fn element(&self, css: &str) -> anyhow::Result<Element> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(element) = self.find(css).await? {
                return Ok(element);
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "no {css} within {PATIENCE:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the element matching `css` (waiting for it).
    ///
    /// # Errors
    /// When it does not appear, or is not clickable.
    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        let element = self.element(css).await?;
        self.command(awc::http::Method::POST, &format!("/element/{}/click", element.0), Some(json!({})))
            .await
            .with_context(|| format!("click {css}"))
            .map(drop)
    }

    /// Replaces the value of the input matching `css` with `text`, typed as a user would.
    ///
    /// # Errors
    /// When it does not appear, or takes no text.
    pub async fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let element = self.element(css).await?;
        self.command(awc::http::Method::POST, &format!("/element/{}/clear", element.0), Some(json!({})))
            .await?;
        self.command(
            awc::http::Method::POST,
            &format!("/element/{}/value", element.0),
            Some(json!({"text": text})),
        )
        .await
        .with_context(|| format!("type into {css}"))
        .map(drop)
    }

    /// The text of the element matching `css` as the user sees it.
    ///
    /// # Errors
    /// When it does not appear.
    pub async fn text(&self, css: &str) -> anyhow::Result<String> {
        let element = self.element(css).await?;
        let text =
            self.command(awc::http::Method::GET, &format!("/element/{}/text", element.0), None).await?;
        Ok(text.as_str().unwrap_or_default().to_owned())
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page and returns its
    /// value. For reading the page only: the tests act through clicks and keys.
    ///
    /// # Errors
    /// When the script throws or the browser fails.
    pub async fn read(&self, script: &str, args: Value) -> anyhow::Result<Value> {
        self.command(awc::http::Method::POST, "/execute/sync", Some(json!({"script": script, "args": args})))
            .await
    }

    /// Scrolls the element matching `css` into the middle of the window (for a screenshot
    /// that shows it).
    ///
    /// # Errors
    /// When it does not appear.
    pub async fn scroll_to(&self, css: &str) -> anyhow::Result<()> {
        self.element(css).await?;
        self.read(
            "document.querySelector(arguments[0]).scrollIntoView({block: 'center'}); return true;",
            json!([css]),
        )
        .await
        .map(drop)
    }

    /// Polls `script` until it returns `true`, for up to [`PATIENCE`].
    ///
    /// # Errors
    /// When it never does; the message says what was awaited and what the page showed.
    pub async fn wait_for(&self, what: &str, script: &str, args: Value) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if self.read(script, args.clone()).await?.as_bool() == Some(true) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let shown =
                    self.read("return document.getElementById('error')?.textContent ?? '';", json!([])).await;
                anyhow::bail!("{what}: not within {PATIENCE:?} (the page's error line: {shown:?})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the element matching `css` shows exactly `expected`.
    ///
    /// # Errors
    /// As [`Session::wait_for`].
    pub async fn wait_for_text(&self, css: &str, expected: &str) -> anyhow::Result<()> {
        self.wait_for(
            &format!("{css} showing {expected:?}"),
            "const e = document.querySelector(arguments[0]); return e !== null && e.textContent.trim() === arguments[1];",
            json!([css, expected]),
        )
        .await
    }

    /// The text of an open `alert()`, if one is open (none should ever be).
    ///
    /// # Errors
    /// When the browser fails.
    pub async fn alert(&self) -> anyhow::Result<Option<String>> {
        match self.command(awc::http::Method::GET, "/alert/text", None).await {
            Ok(text) => Ok(text.as_str().map(str::to_owned)),
            Err(error) if format!("{error:#}").contains("no such alert") => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Saves a screenshot of the window as `<prefix>-<step>.png` where
    /// [`Session::screenshots_to`] said (nothing, when it was not called).
    ///
    /// # Errors
    /// When the browser or the file system fails.
    pub async fn screenshot(&self, step: &str) -> anyhow::Result<()> {
        let Some((dir, prefix)) = &self.shots else { return Ok(()) };
        let png = self.command(awc::http::Method::GET, "/screenshot", None).await?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().context("no screenshot")?)
            .context("screenshot is not base64")?;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join(format!("{prefix}-{step}.png")), bytes)?;
        Ok(())
    }

    /// Closes the browser.
    pub async fn close(self) {
        let _ = self.command(awc::http::Method::DELETE, "", None).await;
    }
}

/// One WebDriver command: its `value`, or an error naming the WebDriver error.
async fn call(
    http: &awc::Client,
    method: awc::http::Method,
    url: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let request = http.request(method, url).timeout(Duration::from_secs(120));
    let mut answer = match body {
        Some(body) => request.send_json(&body).await,
        None => request.send().await,
    }
    .map_err(|error| anyhow::anyhow!("WebDriver {url}: {error}"))?;
    let status = answer.status();
    let body: Value = answer.json().limit(64 * 1024 * 1024).await.context("WebDriver answered no JSON")?;
    let value = body.get("value").cloned().unwrap_or(Value::Null);
    if status.is_success() {
        Ok(value)
    } else {
        anyhow::bail!("WebDriver {url}: {} ({})", value["error"], value["message"])
    }
}
