//! The queue gate that the booking routes put in front of themselves: the `Queue-Token`
//! header, the [`Admitted`] extractor, and how a refusal is answered (401 / 403).

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest, web};
use application::queue::{GateError, QueueReader};
use domain::queue::QueueTokenId;
use domain::user::UserId;
use futures::future::LocalBoxFuture;

use crate::auth::Caller;
use crate::problem::ApiError;

/// The header that carries a queue token.
pub const QUEUE_TOKEN: &str = "Queue-Token";

/// The request's `Queue-Token`: exactly one, a UUID; anything else is 401.
///
/// # Errors
/// [`ApiError::QueueTokenInvalid`].
pub fn queue_token(req: &HttpRequest) -> Result<QueueTokenId, ApiError> {
    let mut values = req.headers().get_all(QUEUE_TOKEN);
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(ApiError::QueueTokenInvalid);
    };
    let raw = value.to_str().map_err(|_| ApiError::QueueTokenInvalid)?;
    QueueTokenId::parse(raw).map_err(|_| ApiError::QueueTokenInvalid)
}

impl From<GateError> for ApiError {
    fn from(error: GateError) -> Self {
        match error {
            GateError::Invalid => Self::QueueTokenInvalid,
            GateError::NotActive => Self::QueueTokenNotActive,
            GateError::Unexpected(error) => error.into(),
        }
    }
}

/// The gate of the booking routes: a handler that takes `Admitted` runs only for an
/// authenticated caller ([`Caller`]) holding an ACTIVE queue token of its own, and gets
/// that user (never a user named in the body). The access token is checked in memory,
/// then one round trip to the queue's store.
///
/// No valid access token: `401 UNAUTHENTICATED`. No queue token, a malformed, unknown or
/// expired one, or another user's: `401 QUEUE_TOKEN_INVALID`; a WAITING token:
/// `403 QUEUE_TOKEN_NOT_ACTIVE`.
#[derive(Debug, Clone, Copy)]
pub struct Admitted(pub UserId);

impl FromRequest for Admitted {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let gate = Gate::new(req);
        Box::pin(async move { Ok(Self(gate?.admit().await?)) })
    }
}

/// The gate of [`Admitted`], not yet asked: for a handler that starts its own read while
/// the queue's store is asked (the seat map reads the cache meanwhile), so that it waits
/// for one round trip instead of two in a row. Only an authenticated caller gets one (else
/// `401 UNAUTHENTICATED` at once, nothing asked); the handler must [`Gate::admit`] before
/// it answers anything, and should start nothing that costs more than its cheapest read
/// until it has (a refused caller must not be able to load MySQL).
#[derive(Debug)]
pub struct Gate {
    user: UserId,
    token: Result<QueueTokenId, ApiError>,
    reader: Option<web::Data<QueueReader>>,
}

impl Gate {
    fn new(req: &HttpRequest) -> Result<Self, ApiError> {
        let Caller(user) = Caller::of(req)?;
        let reader = req.app_data::<web::Data<QueueReader>>().cloned();
        Ok(Self { user, token: queue_token(req), reader })
    }

    /// Whether the request carries a well-formed queue token (whether it lets the caller
    /// in is for [`Gate::admit`] to say).
    #[must_use]
    pub fn has_token(&self) -> bool {
        self.token.is_ok()
    }

    /// Asks the queue's store: the caller, if their token is ACTIVE and theirs.
    ///
    /// # Errors
    /// As [`Admitted`]: `401 QUEUE_TOKEN_INVALID`, `403 QUEUE_TOKEN_NOT_ACTIVE`, 503.
    pub async fn admit(self) -> Result<UserId, ApiError> {
        let reader =
            self.reader.ok_or_else(|| ApiError::from(anyhow::anyhow!("no QueueReader is registered")))?;
        Ok(reader.admit_holder(self.token?, self.user).await?)
    }
}

impl FromRequest for Gate {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(Self::new(req))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use actix_web::{App, HttpResponse, test as actix_test};
    use application::queue::{MockWaitingQueue, per_token};
    use domain::queue::{QueueStatus, TokenState};

    use super::*;

    async fn whoami(Admitted(user): Admitted) -> HttpResponse {
        HttpResponse::Ok().body(user.to_string())
    }

    /// Accepts the bearer `good` as `user`, nothing else.
    struct OneUser(UserId);

    impl application::identity::TokenVerifier for OneUser {
        fn verify(&self, token: &str) -> Result<UserId, application::identity::Unauthenticated> {
            if token == "good" {
                Ok(self.0)
            } else {
                Err(application::identity::Unauthenticated::BadSignature)
            }
        }
    }

    fn verifier(user: UserId) -> crate::auth::Verifier {
        web::Data::new(Arc::new(OneUser(user)) as Arc<dyn application::identity::TokenVerifier>)
    }

    fn state(status: QueueStatus, user_id: UserId) -> TokenState {
        TokenState {
            token: QueueTokenId::generate(),
            user_id,
            status,
            position: (status == QueueStatus::Waiting).then_some(4),
            expires_at: None,
            admissions_per_second: 1.0,
        }
    }

    #[actix_web::test]
    async fn the_gate_lets_in_only_an_active_token_and_hands_the_handler_its_user() {
        let (active, waiting) = (QueueTokenId::generate(), QueueTokenId::generate());
        let holder = UserId::generate();
        let mut queue = MockWaitingQueue::new();
        queue.expect_states().returning(per_token(move |token| {
            Ok(if token == active {
                Some(state(QueueStatus::Active, holder))
            } else if token == waiting {
                Some(state(QueueStatus::Waiting, holder))
            } else {
                None
            })
        }));
        let app = actix_test::init_service(
            App::new()
                .app_data(web::Data::new(QueueReader::new(Arc::new(queue))))
                .app_data(verifier(holder))
                .route("/booking", web::get().to(whoami)),
        )
        .await;
        let call = |headers: Vec<&'static str>| {
            let mut request = actix_test::TestRequest::get()
                .uri("/booking")
                .append_header(("Authorization", "Bearer good"));
            for value in headers {
                request = request.append_header((QUEUE_TOKEN, value));
            }
            request.to_request()
        };
        let active_header: &'static str = Box::leak(active.to_string().into_boxed_str());
        let waiting_header: &'static str = Box::leak(waiting.to_string().into_boxed_str());
        let unknown_header: &'static str = Box::leak(QueueTokenId::generate().to_string().into_boxed_str());

        let admitted = actix_test::call_service(&app, call(vec![active_header])).await;
        assert_eq!(admitted.status().as_u16(), 200);
        assert_eq!(actix_test::read_body(admitted).await, holder.to_string().as_bytes());

        let waiting_answer = actix_test::call_service(&app, call(vec![waiting_header])).await;
        assert_eq!(waiting_answer.status().as_u16(), 403);
        let body: serde_json::Value = actix_test::read_body_json(waiting_answer).await;
        assert_eq!(body["code"], "QUEUE_TOKEN_NOT_ACTIVE");

        for headers in [vec![], vec!["not-a-uuid"], vec![unknown_header], vec![active_header, active_header]]
        {
            let refused = actix_test::call_service(&app, call(headers.clone())).await;
            assert_eq!(refused.status().as_u16(), 401, "{headers:?}");
            let body: serde_json::Value = actix_test::read_body_json(refused).await;
            assert_eq!(body["code"], "QUEUE_TOKEN_INVALID");
        }

        // Without the owner's access token, even the owner's ACTIVE token lets nobody in.
        for bearer in [None, Some("Bearer forged"), Some("Basic Z29vZA==")] {
            let mut request =
                actix_test::TestRequest::get().uri("/booking").append_header((QUEUE_TOKEN, active_header));
            if let Some(bearer) = bearer {
                request = request.append_header(("Authorization", bearer));
            }
            let refused = actix_test::call_service(&app, request.to_request()).await;
            assert_eq!(refused.status().as_u16(), 401, "{bearer:?}");
            assert!(
                refused
                    .headers()
                    .get("www-authenticate")
                    .is_some_and(|v| v.as_bytes().starts_with(b"Bearer"))
            );
            let body: serde_json::Value = actix_test::read_body_json(refused).await;
            assert_eq!(body["code"], "UNAUTHENTICATED");
        }
    }

    #[actix_web::test]
    async fn another_users_active_token_is_401_queue_token_invalid() {
        let (token, owner, caller) = (QueueTokenId::generate(), UserId::generate(), UserId::generate());
        let mut queue = MockWaitingQueue::new();
        queue.expect_states().returning(per_token(move |_| {
            Ok(Some(TokenState { token, ..state(QueueStatus::Active, owner) }))
        }));
        let app = actix_test::init_service(
            App::new()
                .app_data(web::Data::new(QueueReader::new(Arc::new(queue))))
                .app_data(verifier(caller))
                .route("/booking", web::get().to(whoami)),
        )
        .await;
        let request = actix_test::TestRequest::get()
            .uri("/booking")
            .append_header(("Authorization", "Bearer good"))
            .append_header((QUEUE_TOKEN, token.to_string()))
            .to_request();

        let refused = actix_test::call_service(&app, request).await;

        assert_eq!(refused.status().as_u16(), 401);
        let body: serde_json::Value = actix_test::read_body_json(refused).await;
        assert_eq!(body["code"], "QUEUE_TOKEN_INVALID");
    }

    #[actix_web::test]
    async fn a_queue_store_failure_at_the_gate_is_a_503_not_a_401() {
        let mut queue = MockWaitingQueue::new();
        queue.expect_states().returning(per_token(|_| {
            Err(anyhow::Error::new(domain::unavailable::Unavailable {
                reason: "redis",
                source: Box::new(std::io::Error::other("connection refused")),
            }))
        }));
        let app = actix_test::init_service(
            App::new()
                .app_data(web::Data::new(QueueReader::new(Arc::new(queue))))
                .app_data(verifier(UserId::generate()))
                .route("/booking", web::get().to(whoami)),
        )
        .await;
        let request = actix_test::TestRequest::get()
            .uri("/booking")
            .append_header(("Authorization", "Bearer good"))
            .append_header((QUEUE_TOKEN, QueueTokenId::generate().to_string()))
            .to_request();

        let answer = actix_test::call_service(&app, request).await;

        assert_eq!(answer.status().as_u16(), 503);
    }
}
