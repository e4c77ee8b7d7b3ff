//! The end-to-end harness: real `concert-server` processes on random ports, sharing one
//! fresh MySQL database and one Redis, driven over HTTP.
//!
//! The binary is the one `cargo build --workspace --bins` made (`make test` builds it
//! first), found next to the test executable, or named by `CONCERT_SERVER_BIN`.

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use anyhow::Context as _;

/// How long an instance may take to migrate and bind.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Several instances of the server sharing one database.
#[derive(Debug)]
pub struct Cluster {
    pub instances: Vec<Instance>,
    pub database_url: String,
}

/// One running server process, killed when dropped.
#[derive(Debug)]
pub struct Instance {
    child: Child,
    /// `http://127.0.0.1:<port>`
    pub base_url: String,
    /// Everything the process printed so far, for failure messages.
    pub output: Arc<Mutex<Vec<String>>>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Cluster {
    /// Starts `count` instances at once against a database that does not exist yet (they
    /// create and migrate it concurrently, as a fresh deployment would).
    ///
    /// # Errors
    /// When the binary is missing or an instance does not come up in time.
    pub async fn start(count: usize) -> anyhow::Result<Self> {
        let server = test_support::mysql_server_url().await;
        let database_url = format!("{server}/e2e_{}", uuid::Uuid::new_v4().simple());
        let redis_url = test_support::redis_url().await;
        let binary = server_binary()?;
        let spawned: Vec<_> =
            (0..count).map(|_| spawn(&binary, &database_url, &redis_url)).collect::<anyhow::Result<_>>()?;
        let mut instances = Vec::with_capacity(count);
        for (child, ready, output) in spawned {
            let base_url = tokio::task::spawn_blocking(move || ready.recv_timeout(START_TIMEOUT))
                .await?
                .map_err(|_| {
                    anyhow::anyhow!(
                        "an instance did not start:\n{}",
                        output.lock().map(|o| o.join("\n")).unwrap_or_default()
                    )
                })?;
            instances.push(Instance { child, base_url, output });
        }
        Ok(Self { instances, database_url })
    }

    /// The base URL of instance `i % count`: spreads requests round-robin.
    #[must_use]
    pub fn url(&self, i: usize) -> &str {
        &self.instances[i % self.instances.len()].base_url
    }

    /// Stops every instance and drops the database.
    pub async fn shut_down(mut self) {
        self.instances.clear();
        let _ = test_support::drop_database(&self.database_url).await;
    }
}

fn server_binary() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("CONCERT_SERVER_BIN") {
        return Ok(PathBuf::from(path));
    }
    // target/<profile>/deps/e2e-<hash> -> target/<profile>/concert-server
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join(format!("concert-server{}", std::env::consts::EXE_SUFFIX)))
        .context("no target directory above the test binary")?;
    anyhow::ensure!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (`make test` does)",
        path.display()
    );
    Ok(path)
}

type Spawned = (Child, mpsc::Receiver<String>, Arc<Mutex<Vec<String>>>);

fn spawn(binary: &PathBuf, database_url: &str, redis_url: &str) -> anyhow::Result<Spawned> {
    let mut child = Command::new(binary)
        .env("DATABASE_URL", database_url)
        .env("REDIS_URL", redis_url)
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("LOG_FORMAT", "text")
        .env("RUST_LOG", std::env::var("E2E_SERVER_LOG").unwrap_or_else(|_| "info".into()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start {}", binary.display()))?;
    let output = Arc::new(Mutex::new(Vec::new()));
    let (ready_tx, ready_rx) = mpsc::channel();
    // Drain both pipes for the life of the process, so it never blocks on a full pipe.
    for stream in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let (output, ready_tx) = (Arc::clone(&output), ready_tx.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let address: String =
                        rest.chars().take_while(|c| !c.is_whitespace() && *c != '"').collect();
                    let _ = ready_tx.send(format!("http://{address}"));
                }
                if let Ok(mut lines) = output.lock() {
                    lines.push(line);
                }
            }
        });
    }
    Ok((child, ready_rx, output))
}

/// An HTTP client for many concurrent requests.
#[must_use]
pub fn client() -> awc::Client {
    awc::Client::builder()
        .connector(awc::Connector::new().limit(1_000))
        .timeout(Duration::from_secs(30))
        .finish()
}
