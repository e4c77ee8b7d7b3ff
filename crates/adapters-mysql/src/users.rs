//! `UserRepository` on MySQL.

use async_trait::async_trait;
use domain::unit_of_work::Tx;
use domain::user::{User, UserId, UserName, UserRepository, UserRepositoryError};
use sea_orm::{DatabaseConnection, EntityTrait, Set, SqlErr};

use crate::entities::user;
use crate::tx::connection;
use crate::{DbContext as _, db_error};
use crate::{from_db_time, to_db_time};

#[derive(Clone, Debug)]
pub struct MySqlUserRepository {
    db: DatabaseConnection,
}

impl MySqlUserRepository {
    #[must_use]
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

#[async_trait]
impl UserRepository for MySqlUserRepository {
    #[tracing::instrument(name = "users.insert", skip_all, fields(user_id = %user.id()))]
    async fn insert(&self, tx: &mut Tx, user: &User) -> Result<(), UserRepositoryError> {
        let row = user::ActiveModel {
            id: Set(*user.id().as_uuid()),
            name: Set(user.name().as_str().to_owned()),
            created_at: Set(to_db_time(user.created_at())),
        };
        match user::Entity::insert(row).exec_without_returning(connection(tx)?).await {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                Err(UserRepositoryError::Duplicate(user.id()))
            }
            Err(e) => Err(db_error(e, "failed to insert the user").into()),
        }
    }

    #[tracing::instrument(name = "users.find", skip(self))]
    async fn find(&self, id: UserId) -> Result<Option<User>, UserRepositoryError> {
        let row = user::Entity::find_by_id(*id.as_uuid())
            .one(&self.db)
            .await
            .db_context("failed to read the user")?;
        // The name as stored: one given under older rules still reads back.
        Ok(row.map(|row| {
            User::restore(
                UserId::from_uuid(row.id),
                UserName::restore(row.name),
                from_db_time(row.created_at),
            )
        }))
    }
}
