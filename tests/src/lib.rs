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
    child: Mutex<Child>,
    /// `http://127.0.0.1:<port>`
    pub base_url: String,
    /// Everything the process printed so far, for failure messages.
    pub output: Arc<Mutex<Vec<String>>>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.crash();
    }
}

impl Instance {
    /// Kills the process with SIGKILL: a crash, with requests and transactions in flight
    /// and locks held, not a graceful shutdown.
    pub fn crash(&self) {
        if let Ok(mut child) = self.child.lock() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// How to start a [`Cluster`].
#[derive(Debug, Default, Clone)]
pub struct ClusterOptions {
    /// A Redis other than the tests' shared one.
    pub redis_url: Option<String>,
    /// Extra environment for every instance (`LOCK_WAIT_STRATEGY`, ...).
    pub env: Vec<(String, String)>,
}

impl Cluster {
    /// Starts `count` instances at once against a database that does not exist yet (they
    /// create and migrate it concurrently, as a fresh deployment would).
    ///
    /// # Errors
    /// When the binary is missing or an instance does not come up in time.
    pub async fn start(count: usize) -> anyhow::Result<Self> {
        Self::start_with(count, &ClusterOptions::default()).await
    }

    /// [`Cluster::start`] with options.
    ///
    /// # Errors
    /// As [`Cluster::start`].
    pub async fn start_with(count: usize, options: &ClusterOptions) -> anyhow::Result<Self> {
        let server = test_support::mysql_server_url().await;
        let database_url = format!("{server}/e2e_{}", uuid::Uuid::new_v4().simple());
        let redis_url = match &options.redis_url {
            Some(url) => url.clone(),
            None => test_support::redis_url().await,
        };
        let binary = server_binary()?;
        let spawned: Vec<_> = (0..count)
            .map(|_| spawn(&binary, &database_url, &redis_url, &options.env))
            .collect::<anyhow::Result<_>>()?;
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
            instances.push(Instance { child: Mutex::new(child), base_url, output });
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
    // A test runs from target/<profile>/deps/, a harness binary (the benchmark) from
    // target/<profile>/; the server sits in target/<profile>/.
    let exe = std::env::current_exe()?;
    let name = format!("concert-server{}", std::env::consts::EXE_SUFFIX);
    let dir = exe.parent().context("the running binary has no directory")?;
    let candidates = [Some(dir.join(&name)), dir.parent().map(|profile| profile.join(&name))];
    candidates.into_iter().flatten().find(|path| path.exists()).with_context(|| {
        format!(
            "no {name} next to {}: run `cargo build --workspace --bins` first (`make test` does)",
            exe.display()
        )
    })
}

type Spawned = (Child, mpsc::Receiver<String>, Arc<Mutex<Vec<String>>>);

fn spawn(
    binary: &PathBuf,
    database_url: &str,
    redis_url: &str,
    env: &[(String, String)],
) -> anyhow::Result<Spawned> {
    let mut child = Command::new(binary)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
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

pub use test_support::PrivateRedis;

/// An HTTP client for many concurrent requests.
#[must_use]
pub fn client() -> awc::Client {
    awc::Client::builder()
        .connector(awc::Connector::new().limit(1_000))
        .timeout(Duration::from_secs(30))
        .finish()
}
