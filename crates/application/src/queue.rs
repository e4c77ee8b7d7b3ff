//! The waiting queue: its port, and the use cases on it.
//!
//! Two adapters implement [`WaitingQueue`]: Redis (the default: sorted sets and one Lua
//! script per operation) and MySQL (the baseline it is measured against). Both take their
//! clock from their store, so that every instance agrees on when a token expired and on
//! which admission interval it is.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use domain::queue::{Admission, AdmitPolicy, QueueStatus, QueueTokenId, TokenState};
use domain::unavailable::{Unavailable, is_unavailable};
use domain::user::{UserId, UserRepository};
use futures::StreamExt as _;
use time::OffsetDateTime;

use crate::coalesce::Coalesced;
use crate::failure::retold;

/// How a queue behaves; both adapters take the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// How long an admitted token stays valid (`QUEUE_ACTIVE_SECONDS`).
    pub active_lifetime: Duration,
    /// A waiting token nobody asked about for this long is abandoned and leaves the line.
    pub waiting_idle: Duration,
    /// `QUEUE_ADMIT_POLICY` with `QUEUE_MAX_ACTIVE` / `QUEUE_ADMIT_BATCH`.
    pub policy: AdmitPolicy,
    /// How often every instance runs the admission step (`QUEUE_ADMIT_INTERVAL_MS`).
    pub admit_interval: Duration,
    /// The window the admission rate (for wait estimates) is observed over.
    pub rate_window: Duration,
}

/// A token as issued: its state, and whether it was made now or was the user's live one.
#[derive(Debug, Clone, PartialEq)]
pub struct Issued {
    pub state: TokenState,
    /// False when the user already had a live token: the same one, place kept.
    pub created: bool,
}

/// The line itself. Every method is atomic in the store, so any number of instances may
/// call any of them at once.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait WaitingQueue: Send + Sync {
    /// A new WAITING token at the end of the line for `user_id`, or the user's live token.
    async fn issue(&self, user_id: UserId) -> anyhow::Result<Issued>;

    /// The state of a live token (`None`: unknown, expired or abandoned). Asking keeps a
    /// waiting token from being abandoned.
    async fn state(&self, token: QueueTokenId) -> anyhow::Result<Option<TokenState>>;

    /// [`WaitingQueue::state`] for many tokens in one round trip (the event streams).
    async fn states(&self, tokens: Vec<QueueTokenId>) -> anyhow::Result<Vec<Option<TokenState>>>;

    /// One admission step under the configured policy: drops expired and abandoned tokens,
    /// then admits the oldest waiting ones.
    async fn admit(&self) -> anyhow::Result<Admission>;

    /// Ends a token now (a completed payment); true when it was live.
    async fn expire(&self, token: QueueTokenId) -> anyhow::Result<bool>;
}

/// A mock's answer to [`WaitingQueue::states`] made of one answer per token (tests that
/// think token by token).
#[cfg(any(test, feature = "mocks"))]
pub fn per_token<F>(mut state: F) -> impl FnMut(Vec<QueueTokenId>) -> anyhow::Result<Vec<Option<TokenState>>>
where
    F: FnMut(QueueTokenId) -> anyhow::Result<Option<TokenState>>,
{
    move |tokens| tokens.into_iter().map(&mut state).collect()
}

/// What a client sees of its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenView {
    pub token: QueueTokenId,
    pub user_id: UserId,
    pub status: QueueStatus,
    pub position: Option<u64>,
    pub estimated_wait_seconds: Option<u64>,
    pub expires_at: Option<OffsetDateTime>,
}

impl From<&TokenState> for TokenView {
    fn from(state: &TokenState) -> Self {
        Self {
            token: state.token,
            user_id: state.user_id,
            status: state.status,
            position: state.position,
            estimated_wait_seconds: state.estimated_wait().map(|wait| wait.as_secs()),
            expires_at: state.expires_at,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IssueTokenError {
    #[error("user {0} not found")]
    UserNotFound(UserId),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// Issues queue tokens.
#[derive(Clone)]
pub struct IssueToken {
    users: Arc<dyn UserRepository>,
    queue: Arc<dyn WaitingQueue>,
}

impl std::fmt::Debug for IssueToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssueToken").finish_non_exhaustive()
    }
}

impl IssueToken {
    #[must_use]
    pub fn new(users: Arc<dyn UserRepository>, queue: Arc<dyn WaitingQueue>) -> Self {
        Self { users, queue }
    }

    /// A place in line for `user_id`, or the one the user already has.
    ///
    /// # Errors
    /// [`IssueTokenError::UserNotFound`]; [`IssueTokenError::Unexpected`] when a store fails.
    #[tracing::instrument(name = "queue.issue", skip(self), fields(%user_id))]
    pub async fn execute(&self, user_id: UserId) -> Result<(TokenView, bool), IssueTokenError> {
        let user = self
            .users
            .find(user_id)
            .await
            .map_err(|e| anyhow::Error::new(e).context("failed to read the user"))?;
        if user.is_none() {
            return Err(IssueTokenError::UserNotFound(user_id));
        }
        let issued = self.queue.issue(user_id).await.map_err(|e| e.context("failed to issue a token"))?;
        Ok((TokenView::from(&issued.state), issued.created))
    }
}

/// Why a token does not let its holder in.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// Unknown, malformed, expired or abandoned.
    #[error("the queue token is not valid")]
    Invalid,
    /// Still waiting in line.
    #[error("the queue token is still waiting")]
    NotActive,
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// The most tokens one shared state lookup asks for ([`QueueReader`]).
const MAX_LOOKUP_BATCH: usize = 256;

/// How many tokens of a failed shared lookup are asked again alone at once.
const ALONE_CONCURRENCY: usize = 8;

/// Reads tokens: the holder's view, and the gate of the booking routes.
///
/// The lookups of one instance share their round trips ([`crate::coalesce`]): a request
/// joins the next lookup to go out (one script call for many tokens, at most
/// [`MAX_LOOKUP_BATCH`]), never one already sent, so its answer is as fresh as a lookup of
/// its own (a token ended by a payment that returned is never let in again). Under a
/// crowd that is one round trip to the queue's store per round trip time, not per request.
#[derive(Clone)]
pub struct QueueReader {
    queue: Arc<dyn WaitingQueue>,
    lookups: Arc<Coalesced<QueueTokenId, anyhow::Result<Option<TokenState>>>>,
}

impl std::fmt::Debug for QueueReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueReader").finish_non_exhaustive()
    }
}

impl QueueReader {
    #[must_use]
    pub fn new(queue: Arc<dyn WaitingQueue>) -> Self {
        Self { queue, lookups: Arc::new(Coalesced::new(MAX_LOOKUP_BATCH)) }
    }

    /// The state of `token` now, from the next shared lookup.
    async fn state(&self, token: QueueTokenId) -> anyhow::Result<Option<TokenState>> {
        let queue = Arc::clone(&self.queue);
        let send = move |tokens: Vec<QueueTokenId>| {
            let queue = Arc::clone(&queue);
            async move {
                let asked = tokens.len();
                match queue.states(tokens.clone()).await {
                    Ok(states) => states.into_iter().map(Ok).collect(),
                    // The store is down or stalling: every request of the lookup gets the
                    // failure, with its meaning (503).
                    Err(error) if asked == 1 || is_unavailable(&error) => {
                        (0..asked).map(|_| Err(retold(&error))).collect()
                    }
                    // Anything else (a record that does not decode) may be one token's:
                    // each is asked alone, so it fails only its own request.
                    Err(error) => {
                        tracing::warn!(
                            error = format!("{error:#}"),
                            tokens = asked,
                            "a shared token lookup failed; asking token by token"
                        );
                        futures::stream::iter(tokens)
                            .map(|token| {
                                let queue = Arc::clone(&queue);
                                async move { queue.state(token).await }
                            })
                            .buffered(ALONE_CONCURRENCY)
                            .collect()
                            .await
                    }
                }
            }
        };
        self.lookups.ask(token, send).await.unwrap_or_else(|| {
            Err(anyhow::Error::new(Unavailable {
                reason: "stalled",
                source: "the queue's store answered none of the lookups in flight".into(),
            }))
        })
    }

    /// `owner`'s view of `token`. A token of another user is as good as none: worth
    /// nothing without its owner's credentials.
    ///
    /// # Errors
    /// [`GateError::Invalid`] when the token is not live or not `owner`'s;
    /// [`GateError::Unexpected`].
    pub async fn view(&self, token: QueueTokenId, owner: UserId) -> Result<TokenView, GateError> {
        let state =
            self.state(token).await?.filter(|state| state.user_id == owner).ok_or(GateError::Invalid)?;
        Ok(TokenView::from(&state))
    }

    /// The gate: lets `owner` in with `token` when it is `owner`'s and ACTIVE, in one round
    /// trip to the queue's store. Returns the owner.
    ///
    /// # Errors
    /// [`GateError::Invalid`] (not live, or another user's), [`GateError::NotActive`]
    /// (waiting), [`GateError::Unexpected`].
    pub async fn admit_holder(&self, token: QueueTokenId, owner: UserId) -> Result<UserId, GateError> {
        match self.state(token).await? {
            Some(state) if state.user_id != owner => Err(GateError::Invalid),
            None => Err(GateError::Invalid),
            Some(state) if state.status == QueueStatus::Waiting => Err(GateError::NotActive),
            Some(state) => Ok(state.user_id),
        }
    }

    /// Views of many tokens at once (`None` for those no longer live).
    ///
    /// # Errors
    /// When the store fails.
    pub async fn views(&self, tokens: Vec<QueueTokenId>) -> anyhow::Result<Vec<Option<TokenView>>> {
        let states = self.queue.states(tokens).await?;
        Ok(states.iter().map(|state| state.as_ref().map(TokenView::from)).collect())
    }
}

#[cfg(test)]
mod tests {
    use domain::user::{MockUserRepository, User, UserName};

    use super::*;
    use crate::clock;

    fn state(status: QueueStatus, position: Option<u64>, rate: f64) -> TokenState {
        TokenState {
            token: QueueTokenId::generate(),
            user_id: UserId::generate(),
            status,
            position,
            expires_at: None,
            admissions_per_second: rate,
        }
    }

    #[tokio::test]
    async fn an_unknown_user_gets_no_token() {
        let mut users = MockUserRepository::new();
        users.expect_find().times(1).returning(|_| Ok(None));
        let mut queue = MockWaitingQueue::new();
        queue.expect_issue().never();

        let result = IssueToken::new(Arc::new(users), Arc::new(queue)).execute(UserId::generate()).await;

        assert!(matches!(result, Err(IssueTokenError::UserNotFound(_))));
    }

    #[tokio::test]
    async fn a_known_user_gets_the_queues_token_with_an_estimate_from_the_observed_rate() {
        let user_id = UserId::generate();
        let mut users = MockUserRepository::new();
        users.expect_find().returning(move |_| {
            Ok(Some(User::restore(user_id, UserName::new("kim").unwrap(), clock::now_utc())))
        });
        let mut queue = MockWaitingQueue::new();
        queue
            .expect_issue()
            .withf(move |u| *u == user_id)
            .times(1)
            .returning(|_| Ok(Issued { state: state(QueueStatus::Waiting, Some(12), 4.0), created: false }));

        let (view, created) =
            IssueToken::new(Arc::new(users), Arc::new(queue)).execute(user_id).await.unwrap();

        assert!(!created, "the user's live token came back");
        assert_eq!(view.position, Some(12));
        assert_eq!(view.estimated_wait_seconds, Some(3));
    }

    #[tokio::test]
    async fn the_gate_lets_an_active_token_in_and_tells_waiting_from_invalid() {
        let active = state(QueueStatus::Active, None, 0.0);
        let holder = active.user_id;
        let mut queue = MockWaitingQueue::new();
        let mut seq = mockall::Sequence::new();
        queue
            .expect_states()
            .times(1)
            .in_sequence(&mut seq)
            .returning(per_token(move |_| Ok(Some(active.clone()))));
        queue
            .expect_states()
            .times(1)
            .in_sequence(&mut seq)
            .returning(per_token(|_| Ok(Some(state(QueueStatus::Waiting, Some(3), 1.0)))));
        queue.expect_states().times(1).in_sequence(&mut seq).returning(per_token(|_| Ok(None)));
        let reader = QueueReader::new(Arc::new(queue));
        let token = QueueTokenId::generate();

        assert_eq!(reader.admit_holder(token, holder).await.unwrap(), holder);
        let waiting_owner = UserId::generate();
        assert!(
            matches!(reader.admit_holder(token, waiting_owner).await, Err(GateError::Invalid)),
            "not the owner's"
        );
        assert!(matches!(reader.admit_holder(token, holder).await, Err(GateError::Invalid)));
    }

    #[tokio::test]
    async fn a_token_is_worth_nothing_to_anyone_but_its_owner() {
        let active = state(QueueStatus::Active, None, 0.0);
        let waiting = state(QueueStatus::Waiting, Some(3), 1.0);
        let (owner, waiter) = (active.user_id, waiting.user_id);
        let mut queue = MockWaitingQueue::new();
        let (a, w) = (active.clone(), waiting.clone());
        queue.expect_states().returning(per_token(move |token| {
            Ok(Some(if token == a.token { a.clone() } else { w.clone() }))
        }));
        let reader = QueueReader::new(Arc::new(queue));
        let stranger = UserId::generate();

        assert!(matches!(reader.admit_holder(active.token, stranger).await, Err(GateError::Invalid)));
        assert!(matches!(reader.view(active.token, stranger).await, Err(GateError::Invalid)));
        // A stranger is not even told the token is waiting.
        assert!(matches!(reader.admit_holder(waiting.token, stranger).await, Err(GateError::Invalid)));
        assert!(matches!(reader.admit_holder(waiting.token, waiter).await, Err(GateError::NotActive)));
        assert_eq!(reader.view(active.token, owner).await.unwrap().user_id, owner);
    }

    #[tokio::test]
    async fn a_token_that_is_gone_has_no_view_and_a_store_failure_is_not_invalid() {
        let mut queue = MockWaitingQueue::new();
        let mut seq = mockall::Sequence::new();
        queue.expect_states().times(1).in_sequence(&mut seq).returning(per_token(|_| Ok(None)));
        queue
            .expect_states()
            .times(1)
            .in_sequence(&mut seq)
            .returning(per_token(|_| Err(anyhow::anyhow!("redis down"))));
        let reader = QueueReader::new(Arc::new(queue));

        assert!(matches!(
            reader.view(QueueTokenId::generate(), UserId::generate()).await,
            Err(GateError::Invalid)
        ));
        assert!(matches!(
            reader.view(QueueTokenId::generate(), UserId::generate()).await,
            Err(GateError::Unexpected(_))
        ));
    }

    /// A queue whose lookups wait for `open`, recording how many tokens each asked for; a
    /// lookup that includes `bad` (a record that does not decode) fails.
    struct FakeQueue {
        live: std::collections::HashMap<QueueTokenId, TokenState>,
        bad: Option<QueueTokenId>,
        open: tokio::sync::Semaphore,
        sizes: std::sync::Mutex<Vec<usize>>,
    }

    impl FakeQueue {
        fn new(live: impl IntoIterator<Item = TokenState>, bad: Option<QueueTokenId>) -> Arc<Self> {
            Arc::new(Self {
                live: live.into_iter().map(|state| (state.token, state)).collect(),
                bad,
                open: tokio::sync::Semaphore::new(0),
                sizes: std::sync::Mutex::default(),
            })
        }
    }

    #[async_trait]
    impl WaitingQueue for FakeQueue {
        async fn issue(&self, _: UserId) -> anyhow::Result<Issued> {
            unreachable!("the gate issues nothing")
        }
        async fn state(&self, token: QueueTokenId) -> anyhow::Result<Option<TokenState>> {
            anyhow::ensure!(Some(token) != self.bad, "a record that does not decode");
            Ok(self.live.get(&token).cloned())
        }
        async fn states(&self, tokens: Vec<QueueTokenId>) -> anyhow::Result<Vec<Option<TokenState>>> {
            self.sizes.lock().unwrap().push(tokens.len());
            let _open = self.open.acquire().await?;
            anyhow::ensure!(
                self.bad.is_none_or(|bad| !tokens.contains(&bad)),
                "a record that does not decode"
            );
            Ok(tokens.iter().map(|token| self.live.get(token).cloned()).collect())
        }
        async fn admit(&self) -> anyhow::Result<Admission> {
            unreachable!("the gate admits nobody")
        }
        async fn expire(&self, _: QueueTokenId) -> anyhow::Result<bool> {
            unreachable!("the gate ends no token")
        }
    }

    #[tokio::test]
    async fn requests_at_the_gate_share_lookups_and_each_gets_its_own_tokens_answer() {
        // Thirty holders: a third active, a third waiting, a third with a token that ended.
        let holders: Vec<(QueueTokenId, UserId, Option<QueueStatus>)> = (0..30)
            .map(|n| {
                let status = [Some(QueueStatus::Active), Some(QueueStatus::Waiting), None][n % 3];
                (QueueTokenId::generate(), UserId::generate(), status)
            })
            .collect();
        let live = holders.iter().filter_map(|(token, user, status)| {
            status.map(|status| TokenState { token: *token, user_id: *user, ..state(status, None, 1.0) })
        });
        let queue = FakeQueue::new(live, None);
        let reader = QueueReader::new(Arc::clone(&queue) as Arc<dyn WaitingQueue>);
        let ask = |(token, user, _): (QueueTokenId, UserId, Option<QueueStatus>)| {
            let reader = reader.clone();
            tokio::spawn(async move { reader.admit_holder(token, user).await })
        };
        // The first lookup goes out and is held; the other 29 arrive meanwhile.
        let first = ask(holders[0]);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while queue.sizes.lock().unwrap().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "the first lookup never went out");
            tokio::task::yield_now().await;
        }
        let rest: Vec<_> = holders[1..].iter().map(|holder| ask(*holder)).collect();
        while reader.lookups.waiting() < 29 {
            assert!(tokio::time::Instant::now() < deadline, "the others never queued");
            tokio::task::yield_now().await;
        }
        queue.open.add_permits(10);

        for (answer, (_, user, status)) in std::iter::once(first).chain(rest).zip(holders) {
            match (answer.await.unwrap(), status) {
                (Ok(admitted), Some(QueueStatus::Active)) => assert_eq!(admitted, user),
                (Err(GateError::NotActive), Some(QueueStatus::Waiting)) | (Err(GateError::Invalid), None) => {
                }
                (answer, status) => panic!("{status:?} answered {answer:?}"),
            }
        }
        assert_eq!(*queue.sizes.lock().unwrap(), vec![1, 29], "thirty requests, two lookups");
    }

    #[tokio::test]
    async fn a_record_that_fails_a_shared_lookup_fails_only_its_own_request() {
        let good = state(QueueStatus::Active, None, 1.0);
        let (bad, stranger) = (QueueTokenId::generate(), UserId::generate());
        let queue = FakeQueue::new([good.clone()], Some(bad));
        let reader = QueueReader::new(Arc::clone(&queue) as Arc<dyn WaitingQueue>);
        let ask = |token, user| {
            let reader = reader.clone();
            tokio::spawn(async move { reader.admit_holder(token, user).await })
        };
        // A first lookup out and held, then the good and the bad token share the next one.
        let first = ask(QueueTokenId::generate(), stranger);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while reader.lookups.waiting() > 0 || !reader.lookups.is_sending() {
            assert!(tokio::time::Instant::now() < deadline, "the first lookup never went out");
            tokio::task::yield_now().await;
        }
        let (good_answer, bad_answer) = (ask(good.token, good.user_id), ask(bad, stranger));
        while reader.lookups.waiting() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "the two never queued");
            tokio::task::yield_now().await;
        }
        queue.open.add_permits(10);

        assert!(matches!(first.await.unwrap(), Err(GateError::Invalid)));
        assert_eq!(good_answer.await.unwrap().unwrap(), good.user_id, "the good token still gets in");
        assert!(matches!(bad_answer.await.unwrap(), Err(GateError::Unexpected(_))));
    }
}
