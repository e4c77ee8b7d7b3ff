//! Register a user, with the empty point account every user has.

use std::sync::Arc;

use domain::point::{PointAccount, PointRepository, PointRepositoryError};
use domain::user::{User, UserName, UserRepository, UserRepositoryError};

use crate::clock;
use crate::failure::Failure;
use crate::identity::ApiKey;
use crate::tx::{TransactionManager, in_tx};

/// Creates users. No lock: a fresh v7 id collides with nothing, and the user row, its
/// account and its API key's digest are written in one transaction so none exists without
/// the others.
#[derive(Clone)]
pub struct CreateUser {
    users: Arc<dyn UserRepository>,
    points: Arc<dyn PointRepository>,
    txm: Arc<dyn TransactionManager>,
}

#[derive(Debug, thiserror::Error)]
pub enum CreateUserError {
    /// Storage failed; nothing was stored.
    #[error(transparent)]
    Failure(Failure),
}

crate::failure_conversions!(CreateUserError);

impl std::fmt::Debug for CreateUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateUser").finish_non_exhaustive()
    }
}

impl CreateUser {
    #[must_use]
    pub fn new(
        users: Arc<dyn UserRepository>,
        points: Arc<dyn PointRepository>,
        txm: Arc<dyn TransactionManager>,
    ) -> Self {
        Self { users, points, txm }
    }

    /// The new user and its API key (shown to the caller once; only its digest is kept).
    ///
    /// # Errors
    /// [`CreateUserError::Failure`] when storage fails; nothing is then stored.
    #[tracing::instrument(name = "create_user", skip_all)]
    pub async fn execute(&self, name: UserName) -> Result<(User, ApiKey), CreateUserError> {
        let user = User::register(name, clock::now_utc());
        let key = ApiKey::generate()?;
        let digest = key.digest();
        let (users, points, stored) = (Arc::clone(&self.users), Arc::clone(&self.points), user.clone());
        in_tx(self.txm.as_ref(), move |tx| {
            Box::pin(async move {
                users.insert(tx, &stored).await?;
                points.open_account(tx, &PointAccount::open(stored.id())).await?;
                users.add_api_key(tx, stored.id(), &digest).await?;
                Ok::<_, CreateUserError>(())
            })
        })
        .await?;
        tracing::info!(user_id = %user.id(), "user created");
        Ok((user, key))
    }
}

impl From<UserRepositoryError> for CreateUserError {
    fn from(error: UserRepositoryError) -> Self {
        anyhow::Error::new(error).context("failed to store the user").into()
    }
}

impl From<PointRepositoryError> for CreateUserError {
    fn from(error: PointRepositoryError) -> Self {
        anyhow::Error::new(error).context("failed to open the point account").into()
    }
}

#[cfg(test)]
mod tests {
    use domain::point::MockPointRepository;
    use domain::user::MockUserRepository;

    use super::*;
    use crate::mocks::one_tx;
    use crate::tx::MockTransactionManager;

    fn txm(commit: bool) -> MockTransactionManager {
        one_tx(commit)
    }

    #[tokio::test]
    async fn user_and_empty_account_are_stored_in_one_transaction() {
        let mut users = MockUserRepository::new();
        users.expect_insert().withf(|_, u| u.name().as_str() == "kim").times(1).returning(|_, _| Ok(()));
        let stored_digest = Arc::new(std::sync::Mutex::new(None));
        let kept = Arc::clone(&stored_digest);
        users.expect_add_api_key().times(1).returning(move |_, _, digest| {
            *kept.lock().expect("lock") = Some(*digest);
            Ok(())
        });
        let mut points = MockPointRepository::new();
        points
            .expect_open_account()
            .withf(|_, account| account.balance().points() == 0)
            .times(1)
            .returning(|_, _| Ok(()));
        let create = CreateUser::new(Arc::new(users), Arc::new(points), Arc::new(txm(true)));

        let (user, key) = create.execute(UserName::new("kim").unwrap()).await.unwrap();

        assert_eq!(user.name().as_str(), "kim");
        assert_eq!(
            *stored_digest.lock().expect("lock"),
            Some(key.digest()),
            "only the key's digest is stored"
        );
    }

    #[tokio::test]
    async fn a_failed_account_insert_rolls_the_user_back() {
        let mut users = MockUserRepository::new();
        users.expect_insert().times(1).returning(|_, _| Ok(()));
        let mut points = MockPointRepository::new();
        points
            .expect_open_account()
            .times(1)
            .returning(|_, _| Err(PointRepositoryError::Unexpected(anyhow::anyhow!("disk full"))));
        let create = CreateUser::new(Arc::new(users), Arc::new(points), Arc::new(txm(false)));

        let result = create.execute(UserName::new("kim").unwrap()).await;

        assert!(matches!(result, Err(CreateUserError::Failure(Failure::Unexpected(_)))));
    }
}
