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

pub mod benchkit;
pub mod booking;
pub mod stats;
pub mod webdriver;

/// How long an instance may take to migrate and bind. Generous: instances starting together
/// migrate one at a time, the others waiting for the migration lock (the server itself waits
/// up to 120 s for it), and a debug build on a slow, busy machine is slow at all of it. An
/// instance that exits early is reported at once, not after this.
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// Several instances of the server sharing one database.
#[derive(Debug)]
pub struct Cluster {
    pub instances: Vec<Instance>,
    /// The URL the instances were given (through a proxy, when one was asked for).
    pub database_url: String,
    /// The same database on the real server, for cleaning up.
    direct_database_url: String,
    /// What [`Cluster::restart`] starts a process with: the binary, the Redis and the
    /// environment every instance was given.
    binary: PathBuf,
    redis_url: String,
    env: Vec<(String, String)>,
}

/// One running server process, killed when dropped.
#[derive(Debug)]
pub struct Instance {
    child: Mutex<Child>,
    /// `http://127.0.0.1:<port>`: the public listener (`HTTP_ADDR`).
    pub base_url: String,
    /// `http://127.0.0.1:<port>`: the operations listener (`OPS_ADDR`: health, metrics).
    pub ops_url: String,
    /// Everything the process printed so far, for failure messages.
    pub output: Arc<Mutex<Vec<String>>>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.crash();
        // A failing test unwinds through here: show what the server said last.
        if std::thread::panicking()
            && let Ok(lines) = self.output.lock()
        {
            let tail = lines.len().saturating_sub(40);
            eprintln!("--- last lines of {} ---\n{}", self.base_url, lines[tail..].join("\n"));
        }
    }
}

impl Instance {
    /// Sends SIGTERM (a graceful stop, as a deploy does) and returns at once; see
    /// [`Instance::exited`].
    ///
    /// # Errors
    /// When the process has exited or the signal cannot be sent.
    pub fn terminate(&self) -> anyhow::Result<()> {
        self.signal("TERM")
    }

    /// Whether the process has printed a line containing `text` so far.
    #[must_use]
    pub fn printed(&self, text: &str) -> bool {
        self.output.lock().is_ok_and(|lines| lines.iter().any(|line| line.contains(text)))
    }

    /// Whether the process has exited.
    ///
    /// # Errors
    /// When its status cannot be read.
    pub fn exited(&self) -> anyhow::Result<bool> {
        let mut child = self.child.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        Ok(child.try_wait()?.is_some())
    }

    /// Sends SIGTERM (a graceful stop, as a deploy does) and waits for the process to exit.
    ///
    /// # Errors
    /// When the signal cannot be sent or the process outlives `within`.
    pub fn terminate_and_wait(&self, within: Duration) -> anyhow::Result<()> {
        let mut child = self.child.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        // A paused process ([`Instance::pause`]) handles the signal only once it runs again;
        // to one that runs, SIGCONT means nothing.
        let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).status();
        let deadline = std::time::Instant::now() + within;
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "still running after {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process's peak resident memory (`VmHWM`), in KiB, where `/proc` tells it.
    #[must_use]
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let pid = self.child.lock().ok()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Kills the process with SIGKILL: a crash, with requests and transactions in flight
    /// and locks held, not a graceful shutdown.
    pub fn crash(&self) {
        // Also when a panic poisoned the lock: the process must not outlive the test. SIGKILL
        // ends a paused (stopped) process too, so this and `Drop` need no `resume` first.
        let mut child = self.child.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Freezes the process with SIGSTOP, as a long GC pause or a stalled VM would: every
    /// thread stops where it is, with its locks, open transactions and connections, and
    /// learns nothing of the time passing. Its leases run out meanwhile; the kernel still
    /// accepts connections for it, so clients wait instead of being refused.
    ///
    /// A paused process is still killed by [`Instance::crash`] (and so when dropped), and
    /// [`Instance::terminate_and_wait`] lets it run again to handle its SIGTERM.
    ///
    /// # Errors
    /// When the process has exited or the signal cannot be sent.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal("STOP")
    }

    /// Lets a paused process go on (SIGCONT), from where it stopped, unaware that it did.
    ///
    /// # Errors
    /// As [`Instance::pause`].
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("CONT")
    }

    fn signal(&self, name: &str) -> anyhow::Result<()> {
        let mut child = self.child.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        // The pid names this process only until it is reaped; after that it may be another's.
        anyhow::ensure!(child.try_wait()?.is_none(), "the process has exited");
        let status = Command::new("kill").args([format!("-{name}"), child.id().to_string()]).status()?;
        anyhow::ensure!(status.success(), "kill -{name} failed");
        Ok(())
    }
}

/// How to start a [`Cluster`].
#[derive(Debug, Default, Clone)]
pub struct ClusterOptions {
    /// A Redis other than the tests' shared one.
    pub redis_url: Option<String>,
    /// Extra environment for every instance (`LOCK_WAIT_STRATEGY`, ...).
    pub env: Vec<(String, String)>,
    /// A MySQL server URL (no database) to give the instances instead of the tests' own,
    /// e.g. a [`TcpProxy`] in front of it that a test cuts.
    pub database_server: Option<String>,
    /// The database's name (a fresh `e2e_...` one when `None`): a test that drops a
    /// database and starts again on the same name gives it.
    pub database_name: Option<String>,
}

impl ClusterOptions {
    /// Options with `env` for every instance.
    #[must_use]
    pub fn with_env(env: &[(&str, &str)]) -> Self {
        Self { env: owned(env), ..Self::default() }
    }
}

/// `(name, value)` pairs as [`ClusterOptions::env`] holds them.
#[must_use]
pub fn owned(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter().map(|(name, value)| ((*name).to_owned(), (*value).to_owned())).collect()
}

/// `POINT_LOCK_WAIT_MS` at the largest value the server takes (60 s), for every test whose
/// requests queue for a point lock: storms of charges, payments racing charges, keyed
/// retries (a duplicate waits for its key's lock as long as that, plus `LOCK_MAX_HOLD_MS`).
///
/// Charges of one account are served one at a time, so the last of a storm of N waits for
/// the N - 1 before it, and how long that takes is the machine's speed: a debug build on
/// two busy cores did not get through 300 in the default 3 s. A test of exactness must not
/// depend on that. (The default is the product's; a test of a wait that runs out sets its
/// own.)
///
/// `LOCK_MAX_HOLD_MS` goes up with it: a lock's hold is counted from its acquisition, so a
/// payment (or a keyed charge) that holds its first locks while it waits its turn for the
/// account's would otherwise count that whole wait against the default 20 s and be rolled
/// back as a lost lock.
pub const PATIENT_LOCKS: &[(&str, &str)] = &[("POINT_LOCK_WAIT_MS", "60000"), ("LOCK_MAX_HOLD_MS", "120000")];

/// The distributed lock removed (`DISABLE_LOCKS_FOR_TESTING`), for the tests that show the
/// SQL guards alone keep every write exact.
///
/// Concurrent requests then queue on MySQL's row locks instead, and a row-lock wait is cut
/// at `DATABASE_STATEMENT_TIMEOUT_MS` (5 s by default): how long that queue takes is the
/// machine's speed again, so the timeout is 30 s here (and `LOCK_MAX_HOLD_MS` above it, as
/// the server requires).
pub const NO_LOCKS: &[(&str, &str)] = &[
    ("DISABLE_LOCKS_FOR_TESTING", "true"),
    ("DATABASE_STATEMENT_TIMEOUT_MS", "30000"),
    ("LOCK_MAX_HOLD_MS", "60000"),
];

/// Every per-client rate limit off (`0`): the harness's default, since all of a test's
/// clients come from one address. A test of the limits sets its own values after these.
pub const NO_RATE_LIMITS: &[(&str, &str)] = &[
    ("RATE_LIMIT_SIGNUPS_PER_MINUTE", "0"),
    ("RATE_LIMIT_AUTH_PER_MINUTE", "0"),
    ("RATE_LIMIT_QUEUE_TOKENS_PER_MINUTE", "0"),
    ("RATE_LIMIT_CHARGES_PER_MINUTE", "0"),
    ("RATE_LIMIT_COUPONS_PER_MINUTE", "0"),
];

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
        let direct = test_support::mysql_server_url().await;
        let name =
            options.database_name.clone().unwrap_or_else(|| format!("e2e_{}", uuid::Uuid::new_v4().simple()));
        let server = options.database_server.clone().unwrap_or_else(|| direct.clone());
        let database_url = format!("{server}/{name}");
        let direct_database_url = format!("{direct}/{name}");
        let redis_url = match &options.redis_url {
            Some(url) => url.clone(),
            None => test_support::redis_url().await,
        };
        let binary = server_binary()?;
        // A line of its own on the shared Redis (a test may still name one). The per-client
        // rate limits are off: every test's clients share one address (127.0.0.1); the
        // tests of the limits set their own (a later value of a name wins).
        let mut env = vec![("QUEUE_NAME".to_owned(), format!("e2e-{name}"))];
        env.extend(owned(NO_RATE_LIMITS));
        env.extend(options.env.iter().cloned());
        // Each process belongs to an `Instance` from the moment it exists, so that whatever
        // fails below (another spawn, another start) kills it on the way out.
        let mut instances = Vec::with_capacity(count);
        let mut readiness = Vec::with_capacity(count);
        for _ in 0..count {
            let (child, ready, output) = spawn(&binary, &database_url, &redis_url, &env)?;
            instances.push(Instance {
                child: Mutex::new(child),
                base_url: String::new(),
                ops_url: String::new(),
                output,
            });
            readiness.push(ready);
        }
        for (instance, ready) in instances.iter_mut().zip(readiness) {
            await_listening(instance, ready).await?;
        }
        Ok(Self { instances, database_url, direct_database_url, binary, redis_url, env })
    }

    /// Replaces instance `i` by a fresh process started as the first ones were (the same
    /// database, Redis and environment), as an orchestrator replaces a dead container. The
    /// old process is killed first (SIGKILL) if it still runs. The new one migrates (there is
    /// nothing left to do) and listens on new ports: read [`Cluster::url`] and
    /// [`Cluster::ops_url`] again afterwards.
    ///
    /// # Errors
    /// When there is no instance `i`, or the new process does not come up in time; instance
    /// `i` is then still the old, dead one.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let count = self.instances.len();
        let old = self.instances.get(i).with_context(|| format!("no instance {i} of {count}"))?;
        old.crash();
        let (child, ready, output) = spawn(&self.binary, &self.database_url, &self.redis_url, &self.env)?;
        // Owned from the start, so that a start that fails kills it on the way out.
        let mut fresh =
            Instance { child: Mutex::new(child), base_url: String::new(), ops_url: String::new(), output };
        await_listening(&mut fresh, ready).await?;
        self.instances[i] = fresh;
        Ok(())
    }

    /// The database on the real server (not through a proxy).
    #[must_use]
    pub fn direct_database_url(&self) -> &str {
        &self.direct_database_url
    }

    /// The base URL of instance `i % count`: spreads requests round-robin.
    #[must_use]
    pub fn url(&self, i: usize) -> &str {
        &self.instances[i % self.instances.len()].base_url
    }

    /// The operations URL (health, metrics) of instance `i % count`.
    #[must_use]
    pub fn ops_url(&self, i: usize) -> &str {
        &self.instances[i % self.instances.len()].ops_url
    }

    /// Stops every instance and drops the database.
    pub async fn shut_down(mut self) {
        self.instances.clear();
        let _ = test_support::drop_database(&self.direct_database_url).await;
    }
}

/// Waits until `instance`'s log says where it listens (both listeners), and records it.
async fn await_listening(instance: &mut Instance, ready: mpsc::Receiver<Listening>) -> anyhow::Result<()> {
    let output = Arc::clone(&instance.output);
    let (base_url, ops_url) = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        let (mut public, mut ops) = (None, None);
        while public.is_none() || ops.is_none() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match ready.recv_timeout(left)? {
                Listening::Public(url) => public = Some(url),
                Listening::Ops(url) => ops = Some(url),
            }
        }
        Ok::<_, mpsc::RecvTimeoutError>((public.unwrap_or_default(), ops.unwrap_or_default()))
    })
    .await?
    .map_err(|error| {
        let why = match error {
            mpsc::RecvTimeoutError::Timeout => format!("did not listen within {START_TIMEOUT:?}"),
            mpsc::RecvTimeoutError::Disconnected => "exited before listening".to_owned(),
        };
        anyhow::anyhow!("an instance {why}:\n{}", output.lock().map(|o| o.join("\n")).unwrap_or_default())
    })?;
    instance.base_url = base_url;
    instance.ops_url = ops_url;
    Ok(())
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

/// What an instance's log says it listens on.
enum Listening {
    Public(String),
    Ops(String),
}

type Spawned = (Child, mpsc::Receiver<Listening>, Arc<Mutex<Vec<String>>>);

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
        .env("OPS_ADDR", "127.0.0.1:0")
        .env("LOG_FORMAT", "text")
        // A test's own filter wins over the harness's; the start-up lines the harness waits
        // for ("listening on") are always kept.
        .env(
            "RUST_LOG",
            format!(
                "{},bootstrap::startup=info",
                env.iter()
                    .rev()
                    .find(|(k, _)| k == "RUST_LOG")
                    .map(|(_, v)| v.clone())
                    .or_else(|| std::env::var("E2E_SERVER_LOG").ok())
                    .unwrap_or_else(|| "info".into())
            ),
        )
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
                let address = |rest: &str| -> String {
                    let address: String =
                        rest.chars().take_while(|c| !c.is_whitespace() && *c != '"').collect();
                    format!("http://{address}")
                };
                if let Some(rest) = line.split("operations listening on http://").nth(1) {
                    let _ = ready_tx.send(Listening::Ops(address(rest)));
                } else if let Some(rest) = line.split("listening on http://").nth(1) {
                    let _ = ready_tx.send(Listening::Public(address(rest)));
                }
                if let Ok(mut lines) = output.lock() {
                    lines.push(line);
                }
            }
        });
    }
    Ok((child, ready_rx, output))
}

pub use test_support::{PrivateRedis, ScriptedRedis};

/// A TCP proxy on a free loopback port in front of `target`, so that a test can make a
/// dependency unreachable ([`TcpProxy::cut`]) and bring it back ([`TcpProxy::restore`])
/// without stopping the shared server: to the clients, a server that went down (every
/// connection dropped, new ones refused) and was restarted on the same address.
#[derive(Debug)]
pub struct TcpProxy {
    port: u16,
    target: String,
    /// The accept loop while the proxy listens (`None` once cut): aborting it closes the
    /// listener.
    accept: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Every forwarded connection's pipe: aborting one drops both of its sockets.
    pipes: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

/// How long [`TcpProxy::restore`] tries to bind the port again.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(10);

impl TcpProxy {
    /// Starts forwarding connections to `target` (`host:port`).
    ///
    /// # Errors
    /// When no local port can be bound.
    pub async fn start(target: &str) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let proxy = Self {
            port: listener.local_addr()?.port(),
            target: target.to_owned(),
            accept: Mutex::default(),
            pipes: Arc::default(),
        };
        proxy.forward(listener);
        Ok(proxy)
    }

    #[must_use]
    pub const fn port(&self) -> u16 {
        self.port
    }

    /// Accepts on `listener` and pipes each connection to the target, until cut.
    fn forward(&self, listener: tokio::net::TcpListener) {
        let (target, pipes) = (self.target.clone(), Arc::clone(&self.pipes));
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let pipe = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                if let Ok(mut pipes) = pipes.lock() {
                    pipes.retain(|pipe| !pipe.is_finished());
                    pipes.push(pipe);
                }
            }
        });
        *self.accept.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(accept);
    }

    /// Drops every connection and stops listening: new connections are refused, as by a
    /// server that is down. Both happen when the runtime next gets to the aborted tasks, a
    /// moment after this returns (a test that must know waits until a connection is
    /// refused).
    pub fn cut(&self) {
        if let Some(accept) = self.accept.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            accept.abort();
        }
        if let Ok(mut pipes) = self.pipes.lock() {
            for pipe in pipes.drain(..) {
                pipe.abort();
            }
        }
    }

    /// After [`TcpProxy::cut`], listens again on the same port and forwards new
    /// connections: the server is back (the connections cut stay cut, as a restart's
    /// would). Does nothing while the proxy listens.
    ///
    /// Binding is retried for a while: the old listener closes only when the runtime gets
    /// to its aborted task, and the port may briefly be another socket's.
    ///
    /// # Errors
    /// When the port cannot be bound again within 10 s.
    pub async fn restore(&self) -> anyhow::Result<()> {
        let listening = self.accept.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some();
        if listening {
            return Ok(());
        }
        let deadline = std::time::Instant::now() + RESTORE_TIMEOUT;
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(listener) => break listener,
                Err(error) if std::time::Instant::now() >= deadline => {
                    return Err(error).with_context(|| {
                        format!("port {} could not be bound again within {RESTORE_TIMEOUT:?}", self.port)
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.forward(listener);
        Ok(())
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// An HTTP client for many concurrent requests.
///
/// Its timeouts are not what a test measures, so they outlast every wait a test gives its
/// servers (a lock wait of 60 s, a keyed duplicate's wait of that plus `LOCK_MAX_HOLD_MS`),
/// however slow the machine: a slow answer is the server's answer, not a client giving up.
/// Idle connections are dropped after 2 s, before the server's keep-alive (5 s) closes
/// them, so a request is never sent on a connection the server is closing.
#[must_use]
pub fn client() -> awc::Client {
    awc::Client::builder()
        .connector(
            awc::Connector::new()
                .limit(1_000)
                .timeout(Duration::from_secs(30))
                .conn_keep_alive(Duration::from_secs(2)),
        )
        .timeout(Duration::from_secs(240))
        .finish()
}
