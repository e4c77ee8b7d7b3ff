//! Read a user's balance. Not cached: it changes often, is read rarely, and must be exact.

use std::sync::Arc;

use domain::point::{Balance, PointRepository, PointRepositoryError};
use domain::user::UserId;

#[derive(Clone)]
pub struct GetBalance {
    points: Arc<dyn PointRepository>,
}

#[derive(Debug, thiserror::Error)]
pub enum GetBalanceError {
    #[error("user {0} not found")]
    UserNotFound(UserId),
    #[error(transparent)]
    Failure(crate::failure::Failure),
}

crate::failure_conversions!(GetBalanceError);

impl std::fmt::Debug for GetBalance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GetBalance").finish_non_exhaustive()
    }
}

impl GetBalance {
    #[must_use]
    pub fn new(points: Arc<dyn PointRepository>) -> Self {
        Self { points }
    }

    /// # Errors
    /// [`GetBalanceError::UserNotFound`] for an unknown user (every user has an account).
    #[tracing::instrument(name = "get_balance", skip(self), fields(%user_id))]
    pub async fn execute(&self, user_id: UserId) -> Result<Balance, GetBalanceError> {
        self.points
            .balance(user_id)
            .await
            .map_err(|e: PointRepositoryError| anyhow::Error::new(e).context("failed to read the balance"))?
            .ok_or(GetBalanceError::UserNotFound(user_id))
    }
}

#[cfg(test)]
mod tests {
    use domain::point::MockPointRepository;

    use super::*;

    #[tokio::test]
    async fn balance_of_a_known_user_is_returned() {
        let mut points = MockPointRepository::new();
        points.expect_balance().times(1).returning(|_| Ok(Some(Balance::new(1_234).unwrap())));

        let balance = GetBalance::new(Arc::new(points)).execute(UserId::generate()).await.unwrap();

        assert_eq!(balance.points(), 1_234);
    }

    #[tokio::test]
    async fn unknown_user_is_not_found() {
        let mut points = MockPointRepository::new();
        points.expect_balance().times(1).returning(|_| Ok(None));
        let id = UserId::generate();

        let result = GetBalance::new(Arc::new(points)).execute(id).await;

        assert!(matches!(result, Err(GetBalanceError::UserNotFound(missing)) if missing == id));
    }
}
