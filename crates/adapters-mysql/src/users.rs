//! `UserRepository` on MySQL.

use async_trait::async_trait;
use domain::unit_of_work::Tx;
use domain::user::{ApiKeyDigest, User, UserId, UserName, UserRepository, UserRepositoryError};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, Set, SqlErr, Statement};

use crate::entities::user;
use crate::tx::connection;
use crate::{DbContext as _, db_error};
use crate::{column, from_db_time, sql, to_db_time};

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

    #[tracing::instrument(name = "users.add_api_key", skip_all, fields(user_id = %user))]
    async fn add_api_key(
        &self,
        tx: &mut Tx,
        user: UserId,
        key: &ApiKeyDigest,
    ) -> Result<(), UserRepositoryError> {
        connection(tx)?
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::ADD_API_KEY,
                [key.0.to_vec().into(), (*user.as_uuid()).into()],
            ))
            .await
            .db_context("failed to store the API key's digest")?;
        Ok(())
    }

    #[tracing::instrument(name = "users.find_by_api_key", skip_all)]
    async fn find_by_api_key(&self, key: &ApiKeyDigest) -> Result<Option<UserId>, UserRepositoryError> {
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::FIND_API_KEY,
                [key.0.to_vec().into()],
            ))
            .await
            .db_context("failed to look up the API key")?;
        Ok(row.map(|row| column::<uuid::Uuid>(&row, "user_id")).transpose()?.map(UserId::from_uuid))
    }
}
