//! List a user's point history, newest first.

use std::sync::Arc;

use domain::point::{HistoryLimit, PointHistoryEntry, PointRepository};
use domain::user::{UserId, UserRepository};

#[derive(Clone)]
pub struct PointHistory {
    users: Arc<dyn UserRepository>,
    points: Arc<dyn PointRepository>,
}

#[derive(Debug, thiserror::Error)]
pub enum PointHistoryError {
    #[error("user {0} not found")]
    UserNotFound(UserId),
    #[error(transparent)]
    Failure(crate::failure::Failure),
}

crate::failure_conversions!(PointHistoryError);

impl std::fmt::Debug for PointHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointHistory").finish_non_exhaustive()
    }
}

impl PointHistory {
    #[must_use]
    pub fn new(users: Arc<dyn UserRepository>, points: Arc<dyn PointRepository>) -> Self {
        Self { users, points }
    }

    /// # Errors
    /// [`PointHistoryError::UserNotFound`] for an unknown user (a known user with no
    /// history gets an empty list).
    #[tracing::instrument(name = "point_history", skip(self), fields(%user_id, limit = limit.get()))]
    pub async fn execute(
        &self,
        user_id: UserId,
        limit: HistoryLimit,
    ) -> Result<Vec<PointHistoryEntry>, PointHistoryError> {
        let user = self
            .users
            .find(user_id)
            .await
            .map_err(|e| anyhow::Error::new(e).context("failed to read the user"))?;
        if user.is_none() {
            return Err(PointHistoryError::UserNotFound(user_id));
        }
        let entries = self
            .points
            .history(user_id, limit)
            .await
            .map_err(|e| anyhow::Error::new(e).context("failed to read the point history"))?;
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use domain::point::{ChargeAmount, MockPointRepository, PointAccount};
    use domain::user::{MockUserRepository, User, UserName};

    use super::*;
    use crate::clock;

    #[tokio::test]
    async fn history_of_a_known_user_is_read_with_the_limit_asked() {
        let user = User::register(UserName::new("kim").unwrap(), clock::now_utc());
        let id = user.id();
        let mut users = MockUserRepository::new();
        users.expect_find().times(1).return_once(move |_| Ok(Some(user)));
        let mut account = PointAccount::open(id);
        let entry = account.charge(ChargeAmount::new(10).unwrap(), clock::now_utc()).unwrap();
        let mut points = MockPointRepository::new();
        points
            .expect_history()
            .withf(move |u, limit| *u == id && limit.get() == 20)
            .times(1)
            .return_once(move |_, _| Ok(vec![entry]));

        let entries = PointHistory::new(Arc::new(users), Arc::new(points))
            .execute(id, HistoryLimit::new(20).unwrap())
            .await
            .unwrap();

        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].balance_after().points(), 10);
    }

    #[tokio::test]
    async fn unknown_user_is_not_found_and_history_is_not_read() {
        let mut users = MockUserRepository::new();
        users.expect_find().times(1).returning(|_| Ok(None));
        let mut points = MockPointRepository::new();
        points.expect_history().never();

        let result = PointHistory::new(Arc::new(users), Arc::new(points))
            .execute(UserId::generate(), HistoryLimit::default())
            .await;

        assert!(matches!(result, Err(PointHistoryError::UserNotFound(_))));
    }
}
