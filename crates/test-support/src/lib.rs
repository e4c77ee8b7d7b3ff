//! Where the tests' MySQL and Redis are, and per-test isolation on them.
//!
//! `TEST_DATABASE_URL` (a server URL, no database: `mysql://root@127.0.0.1:3306`) and
//! `TEST_REDIS_URL` name running services. When one is unset, a container is started with
//! testcontainers (needs a Docker engine) and shared by every test of the binary. Each test
//! then gets its own database ([`fresh_database`]) or key namespace ([`unique_prefix`]), so
//! tests run in parallel without seeing each other's rows or keys.

pub mod queue_contract;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use sea_orm::{ConnectionTrait, Database};
use testcontainers_modules::mariadb::Mariadb;
use testcontainers_modules::redis::Redis;
use testcontainers_modules::testcontainers::ContainerAsync;
use testcontainers_modules::testcontainers::runners::AsyncRunner;
use tokio::sync::OnceCell;

/// Containers started for this test binary, kept alive until it exits.
static MARIADB: OnceCell<(ContainerAsync<Mariadb>, String)> = OnceCell::const_new();
static REDIS: OnceCell<(ContainerAsync<Redis>, String)> = OnceCell::const_new();

/// The URL of a MySQL/MariaDB server (no database part).
///
/// # Panics
/// When `TEST_DATABASE_URL` is unset and no container can be started; the message says
/// what to set.
pub async fn mysql_server_url() -> String {
    if let Ok(url) = std::env::var("TEST_DATABASE_URL") {
        return url.trim_end_matches('/').to_owned();
    }
    let (_, url) = MARIADB
        .get_or_try_init(|| async {
            let container = Mariadb::default().start().await?;
            let port = container.get_host_port_ipv4(3306).await?;
            anyhow::Ok((container, format!("mysql://root@127.0.0.1:{port}")))
        })
        .await
        .unwrap_or_else(|e| panic!("set TEST_DATABASE_URL (no Docker for testcontainers: {e:#})"));
    url.clone()
}

/// The URL of a Redis server.
///
/// # Panics
/// When `TEST_REDIS_URL` is unset and no container can be started.
pub async fn redis_url() -> String {
    if let Ok(url) = std::env::var("TEST_REDIS_URL") {
        return url;
    }
    let (_, url) = REDIS
        .get_or_try_init(|| async {
            let container = Redis::default().start().await?;
            let port = container.get_host_port_ipv4(6379).await?;
            anyhow::Ok((container, format!("redis://127.0.0.1:{port}")))
        })
        .await
        .unwrap_or_else(|e| panic!("set TEST_REDIS_URL (no Docker for testcontainers: {e:#})"));
    url.clone()
}

/// A database of its own for one test: created empty, named `t_<label>_<random>`, and
/// returned as a full URL. Databases left by failed runs are removed by `make clean-test-dbs`.
///
/// # Errors
/// When the server cannot be reached or refuses `CREATE DATABASE`.
pub async fn fresh_database(label: &str) -> anyhow::Result<String> {
    let server = mysql_server_url().await;
    let name = format!("t_{label}_{}", uuid::Uuid::new_v4().simple());
    let admin = Database::connect(server.as_str()).await.context("connect to the test MySQL server")?;
    admin
        .execute_unprepared(&format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"))
        .await
        .with_context(|| format!("create database {name}"))?;
    admin.close().await.ok();
    Ok(format!("{server}/{name}"))
}

/// Drops a database made by [`fresh_database`].
///
/// # Errors
/// When the server cannot be reached.
pub async fn drop_database(url: &str) -> anyhow::Result<()> {
    let (server, name) = url.rsplit_once('/').context("a database URL ends in /<name>")?;
    let admin = Database::connect(server).await?;
    admin.execute_unprepared(&format!("DROP DATABASE IF EXISTS `{name}`")).await?;
    admin.close().await.ok();
    Ok(())
}

/// A key prefix no other test uses: `t:<label>:<random>:`.
#[must_use]
pub fn unique_prefix(label: &str) -> String {
    format!("t:{label}:{}:", uuid::Uuid::new_v4().simple())
}

/// A Redis of its own, on a free port, for tests that stop it. Killed when dropped.
#[derive(Debug)]
pub struct PrivateRedis {
    child: Option<Child>,
    port: u16,
}

impl PrivateRedis {
    /// Starts `redis-server` (which must be on `PATH`) without persistence and waits
    /// until it answers.
    ///
    /// # Errors
    /// When it cannot be started or does not answer within a few seconds.
    pub fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::start_on(port)
    }

    /// Starts it again on the same port after [`PrivateRedis::kill`] (empty, as a Redis
    /// without persistence comes back), and waits until it answers.
    ///
    /// # Errors
    /// As [`PrivateRedis::start`].
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        *self = Self::start_on(self.port)?;
        Ok(())
    }

    /// Starts a replica of `master` (asynchronous replication, as Redis does), on a free
    /// port, and waits until it answers (not until it has synchronised).
    ///
    /// # Errors
    /// As [`PrivateRedis::start`].
    pub fn start_replica_of(master: &Self) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::start_with(port, &["--replicaof", "127.0.0.1", &master.port.to_string()])
    }

    fn start_on(port: u16) -> anyhow::Result<Self> {
        Self::start_with(port, &[])
    }

    fn start_with(port: u16, extra: &[&str]) -> anyhow::Result<Self> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            // A replica writes the snapshot its master sends: into the temporary directory,
            // under a name of its own, never into the working tree.
            .args([
                "--dir",
                &std::env::temp_dir().to_string_lossy(),
                "--dbfilename",
                &format!("concert-test-{port}.rdb"),
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("failed to start redis-server (is it installed? `make services` installs it)")?;
        let mut redis = Self { child: Some(child), port };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !redis.answers() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "redis-server on port {port} did not answer"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The answer must be this process's: a server that could not bind (the port taken
        // by another in the meantime) has exited.
        let exited = redis.child.as_mut().map(|child| child.try_wait().map(|status| status.is_some()));
        anyhow::ensure!(matches!(exited, Some(Ok(false))), "redis-server on port {port} exited at start");
        Ok(redis)
    }

    #[must_use]
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Whether it answers PING now.
    #[must_use]
    pub fn answers(&self) -> bool {
        use std::io::{Read as _, Write as _};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reply = [0_u8; 5];
        stream.write_all(b"PING\r\n").is_ok() && stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG"
    }

    /// Kills it (SIGKILL: a crash, not a shutdown).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis topology of several processes on loopback, started and stopped by the project's
/// own scripts (`deploy/redis-cluster.sh`, `deploy/redis-sentinel.sh`), so that the tests
/// and a developer run the same thing. Stopped (every process, its directory removed) when
/// dropped.
#[derive(Debug)]
pub struct ScriptedRedis {
    script: std::path::PathBuf,
    dir: std::path::PathBuf,
    url: String,
}

impl ScriptedRedis {
    /// A Redis Cluster of three masters (no replicas) on free loopback ports; its URL is
    /// `redis-cluster://...`.
    ///
    /// # Errors
    /// When the script fails (`redis-server`/`redis-cli` missing, the cluster not ready in
    /// time); it stops what it started.
    pub fn cluster() -> anyhow::Result<Self> {
        // A cluster node also listens on its port + 10000 (the cluster bus).
        Self::start("redis-cluster.sh", "cluster", 3, |port| port < 55_000 && port_is_free(port + 10_000))
    }

    /// A master, a replica and three sentinels (quorum two, the master judged down after
    /// one second) on free loopback ports; its URL is `redis-sentinel://...` naming the
    /// three sentinels and the service `concert`.
    ///
    /// # Errors
    /// As [`ScriptedRedis::cluster`].
    pub fn sentinel() -> anyhow::Result<Self> {
        Self::start("redis-sentinel.sh", "sentinel", 5, |_| true)
    }

    fn start(script: &str, label: &str, ports: usize, fits: impl Fn(u16) -> bool) -> anyhow::Result<Self> {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy").join(script);
        let dir =
            std::env::temp_dir().join(format!("concert-redis-{label}-{}", uuid::Uuid::new_v4().simple()));
        // Ports another process could take between our check and the script's start: the
        // script refuses a taken port, and the next attempt picks others.
        let mut last_error = None;
        for _ in 0..3 {
            let chosen = free_ports(ports, &fits)?;
            let output = Command::new(&script)
                .arg("start")
                .arg(&dir)
                .args(chosen.iter().map(ToString::to_string))
                .stderr(Stdio::piped())
                .output()
                .with_context(|| format!("run {}", script.display()))?;
            if output.status.success() {
                let url = String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                anyhow::ensure!(!url.is_empty(), "{} printed no URL", script.display());
                return Ok(Self { script, dir, url });
            }
            let _ = Command::new(&script).arg("stop").arg(&dir).stderr(Stdio::null()).status();
            last_error = Some(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        anyhow::bail!("{} start failed: {}", script.display(), last_error.unwrap_or_default())
    }

    /// The URL to give `REDIS_URL`.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sentinel only: SIGKILLs the master the sentinels report now; returns its port.
    ///
    /// # Errors
    /// When the script fails.
    pub fn kill_master(&self) -> anyhow::Result<u16> {
        self.run(&["kill-master"])?.trim().parse().context("a port")
    }

    /// Sentinel only: the master's `host:port` as the sentinels report it now.
    ///
    /// # Errors
    /// When no sentinel answers.
    pub fn master(&self) -> anyhow::Result<String> {
        Ok(self.run(&["master"])?.trim().to_owned())
    }

    fn run(&self, command: &[&str]) -> anyhow::Result<String> {
        let output =
            Command::new(&self.script).args(command).arg(&self.dir).stderr(Stdio::piped()).output()?;
        anyhow::ensure!(
            output.status.success(),
            "{} {command:?} failed: {}",
            self.script.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

impl Drop for ScriptedRedis {
    fn drop(&mut self) {
        let _ = Command::new(&self.script).arg("stop").arg(&self.dir).stderr(Stdio::null()).status();
    }
}

/// `n` distinct free loopback ports for which `fits` holds.
fn free_ports(n: usize, fits: &impl Fn(u16) -> bool) -> anyhow::Result<Vec<u16>> {
    let mut ports = Vec::with_capacity(n);
    for _ in 0..1_000 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if fits(port) && !ports.contains(&port) {
            ports.push(port);
            if ports.len() == n {
                return Ok(ports);
            }
        }
    }
    anyhow::bail!("no {n} free ports found")
}

fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}
