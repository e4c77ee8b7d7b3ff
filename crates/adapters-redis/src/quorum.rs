//! The quorum lock (Redlock): one lock over N independent Redis nodes.
//!
//! A single Redis is a single point of failure for the lock: when it is down nobody can
//! write (the lock fails closed), and a failover to an asynchronously replicated replica can
//! hand a held key to a second holder. The quorum lock keeps working while a minority of its
//! nodes is down, and never has two holders while a majority keeps its data.
//!
//! - **Acquire**: one fail-fast attempt per node (the single-node acquire script, with its
//!   owner token and fencing counter), each bounded by [`QuorumOptions::node_timeout`],
//!   **in the same order on every instance**. Granted by a majority (`N / 2 + 1`) →
//!   acquired (the nodes after it are asked too: a grant on more nodes survives more node
//!   failures during the hold). Busy on a node while holding some grants short of a
//!   majority → they are given back at once and the attempt is busy: contenders meet at the
//!   first node they both took, so a storm on one key does not split the vote (asking every
//!   node at once did: 200 charges on one account, each contender holding one node of
//!   three, livelocked). Busy while holding none → the next node is asked, so that one
//!   stale grant on an early node does not block a key the others would give.
//!   So many nodes failed that no majority can be reached → unavailable (locks fail
//!   closed). A node that failed is skipped for a second ([`NodeHealth`]) rather than cost
//!   every acquisition its timeout; an attempt it did not answer in time is dropped, and
//!   the single-node lock undoes it on that node.
//! - **Validity and clock drift**: each node's grant is trusted until the time its attempt
//!   was *sent* plus the lease, minus the single-node lock's margin (a tenth of the lease).
//!   The margin is Redlock's drift allowance (the algorithm's own is 1 % of the lease plus
//!   2 ms; a tenth is larger for every lease the settings allow). A grant that took so long
//!   that fewer than a majority are still trusted when the round ends is given back, as
//!   Redlock's "validity time" check does.
//! - **Fencing**: every node hands out `max(last + 1, its clock in µs)`; the quorum's
//!   number is the highest of its majority, and it is **written back** to that majority
//!   (never lowering a counter) before it is handed out. Any two majorities share a node,
//!   so the next holder's majority contains a node that has seen this number, and its own
//!   number is higher: the numbers strictly increase without trusting the nodes' clocks to
//!   agree, as long as that node's counter survives (it lives an hour past the key's last
//!   acquisition and is lost with an empty restart; then the clocks decide, as with one
//!   Redis, and a number too low is refused by the database: it fails closed). (Without the write-back, majority {A, B} could hand out B's 200 and the next
//!   majority {A, C} C's 150.)
//! - **Renewal and loss**: each node's grant is renewed by its own watchdog, as a
//!   single-node guard is. The quorum guard counts as lost as soon as fewer than a majority
//!   of its grants are trusted, and its `lease_lost` resolves then.
//! - **Release**: on every node that granted it (compare-and-delete). A node whose attempt
//!   timed out is cleaned up by the single-node lock's undo of unanswered attempts, so no
//!   node is left holding a key we gave up on.
//! - **Waiting**: retries after a random pause (exponential backoff, full jitter), as
//!   Redlock prescribes: two contenders that split the nodes both give back and retry at
//!   different moments. No pub/sub wake-up: a release on one node says little about a
//!   majority.
//!
//! What it does not protect against: a node that restarts without its data (no AOF with
//! `fsync always`) forgets the keys it granted, so a majority can briefly be formed twice;
//! restart a node only after the longest lease has passed, or run the nodes with
//! persistence. The fencing numbers in the database still refuse the older holder's writes
//! (see `docs/locking.md`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use application::lock::{DistributedLock, FencingToken, LockError, LockGuard, LockKey, WaitPolicy};
use async_trait::async_trait;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio::time::Instant;

use crate::lock::{RedisLock, RedisLockGuard, record_acquire};

/// The default bound on one node's answer during an acquisition.
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_millis(250);

/// Settings of a [`QuorumLock`] (the lease, renewal and longest hold are the nodes').
#[derive(Debug, Clone, Copy)]
pub struct QuorumOptions {
    /// How long an acquisition waits for one node before counting it as down. Small next
    /// to the lease: the lease runs on the nodes that did answer meanwhile.
    pub node_timeout: Duration,
    /// The first pause between two attempts of a waiting acquisition (doubling up to
    /// `retry_max`, each drawn uniformly below it).
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl Default for QuorumOptions {
    fn default() -> Self {
        Self {
            node_timeout: DEFAULT_NODE_TIMEOUT,
            retry_initial: Duration::from_millis(5),
            retry_max: Duration::from_millis(100),
        }
    }
}

/// A lock held on a majority of independent Redis nodes. Cheap to clone.
#[derive(Clone)]
pub struct QuorumLock {
    inner: Arc<Inner>,
}

struct Inner {
    nodes: Vec<RedisLock>,
    /// One per node, in the same order.
    health: Vec<NodeHealth>,
    quorum: usize,
    options: QuorumOptions,
}

/// How long a node that failed is skipped before it is asked again.
const NODE_REST: Duration = Duration::from_secs(1);

/// Whether a node failed a moment ago. A dead node is skipped for [`NODE_REST`] after each
/// failure instead of costing every acquisition the node timeout; the first acquisition
/// after the rest asks it again.
#[derive(Default)]
struct NodeHealth {
    resting_until: std::sync::Mutex<Option<Instant>>,
}

impl NodeHealth {
    fn is_resting(&self) -> bool {
        let mut until = self.resting_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match *until {
            Some(at) if Instant::now() < at => true,
            Some(_) => {
                // Rest over: this caller probes it; the others keep skipping it until the
                // probe answers or fails.
                *until = Some(Instant::now() + NODE_REST);
                false
            }
            None => false,
        }
    }

    fn answered(&self) {
        *self.resting_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    fn failed(&self) {
        *self.resting_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(Instant::now() + NODE_REST);
    }
}

impl fmt::Debug for QuorumLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuorumLock")
            .field("nodes", &self.inner.nodes.len())
            .field("quorum", &self.inner.quorum)
            .field("options", &self.inner.options)
            .finish()
    }
}

impl QuorumLock {
    /// A lock over `nodes`, one single-node lock per independent Redis (they should all
    /// have the same lease settings).
    ///
    /// # Errors
    /// With fewer than three nodes: a majority of two is both nodes, so one node down
    /// would stop every write, which is worse than a single Redis.
    pub fn new(nodes: Vec<RedisLock>, options: QuorumOptions) -> anyhow::Result<Self> {
        anyhow::ensure!(nodes.len() >= 3, "a quorum lock needs at least three nodes, got {}", nodes.len());
        anyhow::ensure!(!options.node_timeout.is_zero(), "the node timeout must be above zero");
        let quorum = nodes.len() / 2 + 1;
        let health = nodes.iter().map(|_| NodeHealth::default()).collect();
        Ok(Self { inner: Arc::new(Inner { nodes, health, quorum, options }) })
    }

    /// How many nodes must grant a key.
    #[must_use]
    pub fn quorum(&self) -> usize {
        self.inner.quorum
    }

    /// How many tokens may still hold a key on some node (see [`RedisLock::outstanding`]).
    #[must_use]
    pub fn outstanding(&self) -> usize {
        self.inner.nodes.iter().map(RedisLock::outstanding).sum()
    }

    /// Releases every key this process may still hold on any node, waiting at most
    /// `within` (see [`RedisLock::release_all`]). Returns how many node grants were freed.
    pub async fn release_all(&self, within: Duration) -> usize {
        futures::future::join_all(self.inner.nodes.iter().map(|node| node.release_all(within)))
            .await
            .into_iter()
            .sum()
    }

    /// One round over the nodes, in order.
    async fn attempt(&self, key: &LockKey) -> Result<QuorumGuard, LockError> {
        let inner = &self.inner;
        let spare = inner.nodes.len() - inner.quorum;
        let mut granted = Vec::with_capacity(inner.nodes.len());
        let (mut busy, mut failed) = (0, 0);
        let mut last_failure = None;
        for (node, lock) in inner.nodes.iter().enumerate() {
            if failed > spare {
                break;
            }
            if inner.health[node].is_resting() {
                failed += 1;
                last_failure =
                    Some(LockError::Unavailable(anyhow::anyhow!("node {node} failed a moment ago")));
                continue;
            }
            // The node's own connections time a command out at the node timeout (so that
            // fred never sends an abandoned acquire later); this bound is a backstop.
            let answer = tokio::time::timeout(
                inner.options.node_timeout * 2,
                lock.acquire_guard(key, WaitPolicy::FailFast, false),
            )
            .await
            .unwrap_or_else(|_| {
                Err(LockError::Unavailable(anyhow::anyhow!(
                    "no answer within {:?}",
                    inner.options.node_timeout * 2
                )))
            });
            match answer {
                Ok(guard) => {
                    inner.health[node].answered();
                    granted.push((node, guard));
                }
                Err(LockError::Busy { .. }) => {
                    inner.health[node].answered();
                    busy += 1;
                    // Held by someone else. Holding grants of our own short of a majority,
                    // we give them back at once: contenders meet at the first node they
                    // both took, and grants that only split the vote are not kept. Holding
                    // none, we go on: one stale grant on an early node (a holder's release
                    // that never arrived) must not block a key the other nodes would give.
                    // Past a majority, a busy node is one grant fewer.
                    let split = !granted.is_empty() && granted.len() < inner.quorum;
                    if split || busy + failed > spare {
                        give_back(granted.into_iter().map(|(_, guard)| guard).collect()).await;
                        return Err(LockError::Busy { key: key.clone() });
                    }
                }
                Err(error) => {
                    failed += 1;
                    inner.health[node].failed();
                    metrics::counter!("lock_quorum_node_failures_total", "node" => node.to_string())
                        .increment(1);
                    tracing::debug!(node, error = %error, "a lock node failed");
                    last_failure = Some(error);
                }
            }
        }
        if granted.len() < inner.quorum {
            give_back(granted.into_iter().map(|(_, guard)| guard).collect()).await;
            if failed <= spare {
                return Err(LockError::Busy { key: key.clone() });
            }
            let why = last_failure.map_or_else(|| anyhow::anyhow!("no node answered"), anyhow::Error::new);
            return Err(LockError::Unavailable(why.context(format!(
                "{failed} of {} lock nodes failed; a majority of {} cannot be reached",
                inner.nodes.len(),
                inner.quorum
            ))));
        }
        let fence = if key.is_fenced() {
            match self.agree_on_fence(key, &granted).await {
                Ok(fence) => fence,
                Err(error) => {
                    give_back(granted.into_iter().map(|(_, guard)| guard).collect()).await;
                    return Err(error);
                }
            }
        } else {
            None
        };
        let guard = QuorumGuard {
            key: key.clone(),
            fence,
            guards: granted.into_iter().map(|(_, guard)| guard).collect(),
            quorum: inner.quorum,
            acquired_at: Instant::now(),
            released: false,
        };
        if guard.is_lost() {
            // The round took so long that a majority's leases are no longer trusted: the
            // nodes are too slow to lock on (not someone else holding the key).
            let _ = Box::new(guard).release().await;
            return Err(LockError::Unavailable(anyhow::anyhow!(
                "a majority was reached too late to trust its leases"
            )));
        }
        Ok(guard)
    }

    /// The highest fencing number of the granting nodes, written back to a majority of them.
    async fn agree_on_fence(
        &self,
        key: &LockKey,
        granted: &[(usize, RedisLockGuard)],
    ) -> Result<Option<FencingToken>, LockError> {
        let Some(fence) = granted.iter().filter_map(|(_, guard)| guard.fencing_token()).max() else {
            return Ok(None);
        };
        let timeout = self.inner.options.node_timeout;
        let raised = futures::future::join_all(granted.iter().map(|(node, guard)| {
            let node_lock = &self.inner.nodes[*node];
            async move {
                // The node that gave the highest number has it already.
                if guard.fencing_token() == Some(fence) {
                    return true;
                }
                matches!(tokio::time::timeout(timeout, node_lock.raise_fence(key, fence)).await, Ok(Ok(())))
            }
        }))
        .await;
        let confirmed = raised.into_iter().filter(|ok| *ok).count();
        if confirmed < self.inner.quorum {
            return Err(LockError::Unavailable(anyhow::anyhow!(
                "the fencing number reached {confirmed} lock nodes, fewer than a majority of {}",
                self.inner.quorum
            )));
        }
        Ok(Some(fence))
    }

    async fn attempt_until(
        &self,
        key: &LockKey,
        started: Instant,
        limit: Duration,
    ) -> Result<QuorumGuard, LockError> {
        let deadline = started + limit;
        let mut backoff = self.inner.options.retry_initial;
        loop {
            match self.attempt(key).await {
                Err(LockError::Busy { .. }) => {}
                outcome => return outcome,
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(LockError::Timeout { key: key.clone(), waited: now - started });
            }
            tokio::time::sleep(crate::lock::jitter(backoff).min(deadline - now)).await;
            backoff = (backoff * 2).min(self.inner.options.retry_max);
        }
    }
}

/// Releases grants that did not make a majority, all at once. If this is cancelled, the
/// guards' `Drop` releases them in the background.
async fn give_back(guards: Vec<RedisLockGuard>) {
    futures::future::join_all(guards.into_iter().map(|guard| Box::new(guard).release())).await;
}

#[async_trait]
impl DistributedLock for QuorumLock {
    #[tracing::instrument(name = "lock.acquire", skip(self), fields(key = %key, nodes = self.inner.nodes.len()))]
    async fn acquire(&self, key: &LockKey, wait: WaitPolicy) -> Result<Box<dyn LockGuard>, LockError> {
        let started = Instant::now();
        let outcome = match wait {
            WaitPolicy::FailFast => self.attempt(key).await,
            WaitPolicy::WaitUpTo(limit) => self.attempt_until(key, started, limit).await,
        };
        record_acquire(key, started, outcome.as_ref().map(|_| ()));
        let guard = outcome?;
        tracing::debug!(
            fence = guard.fence.map(|fence| fence.0),
            nodes = guard.guards.len(),
            "lock acquired"
        );
        Ok(Box::new(guard))
    }
}

/// A key held on a majority of nodes.
#[derive(Debug)]
pub struct QuorumGuard {
    key: LockKey,
    fence: Option<FencingToken>,
    /// One grant per node that gave one (at least a majority).
    guards: Vec<RedisLockGuard>,
    quorum: usize,
    acquired_at: Instant,
    released: bool,
}

impl QuorumGuard {
    fn record_hold(&self) {
        metrics::histogram!("lock_hold_seconds", "kind" => self.key.kind())
            .record(self.acquired_at.elapsed().as_secs_f64());
    }
}

#[async_trait]
impl LockGuard for QuorumGuard {
    fn key(&self) -> &LockKey {
        &self.key
    }

    fn fencing_token(&self) -> Option<FencingToken> {
        self.fence
    }

    fn is_lost(&self) -> bool {
        self.guards.iter().filter(|guard| !guard.is_lost()).count() < self.quorum
    }

    fn lease_lost(&self) -> BoxFuture<'static, ()> {
        // Lost once this many grants are: fewer than a majority are left.
        let losses = (self.guards.len() + 1).saturating_sub(self.quorum);
        let mut lost: FuturesUnordered<_> = self.guards.iter().map(|guard| guard.lease_lost()).collect();
        Box::pin(async move {
            for _ in 0..losses {
                if lost.next().await.is_none() {
                    std::future::pending::<()>().await;
                }
            }
        })
    }

    async fn release(mut self: Box<Self>) -> Result<(), LockError> {
        self.released = true;
        self.record_hold();
        let guards = std::mem::take(&mut self.guards);
        let answers =
            futures::future::join_all(guards.into_iter().map(|guard| Box::new(guard).release())).await;
        let ours = answers.iter().filter(|answer| answer.is_ok()).count();
        if ours >= self.quorum {
            return Ok(());
        }
        // Fewer than a majority were still ours: the lease had run out on the rest, or
        // their nodes could not be reached (their leases free them).
        match answers.into_iter().find_map(|answer| match answer {
            Err(LockError::Unavailable(error)) => Some(error),
            _ => None,
        }) {
            Some(error) => Err(LockError::Unavailable(error)),
            None => {
                metrics::counter!("lock_lease_lost_total", "kind" => self.key.kind()).increment(1);
                Err(LockError::LeaseLost { key: self.key.clone() })
            }
        }
    }
}

impl Drop for QuorumGuard {
    fn drop(&mut self) {
        // The node guards release themselves in the background as they drop.
        if !self.released {
            self.record_hold();
        }
    }
}
