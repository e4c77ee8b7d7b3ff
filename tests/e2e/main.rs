//! End-to-end tests: several real `concert-server` processes, one MySQL, one Redis.

mod booking;
mod consolidation;
mod coupons;
mod failures;
mod faults;
mod idempotency;
mod identity;
mod nginx;
mod page;
mod payments;
mod points;
mod queue;
mod quorum;
mod ranking;
mod redis_cluster;
mod users;

use awc::http::StatusCode;
use serde_json::Value;

/// The one number `sql` selects, read straight from MySQL (the tests' view of the truth,
/// beside what the API answers).
async fn scalar(db: &sea_orm::DatabaseConnection, sql: &str) -> i64 {
    use sea_orm::ConnectionTrait as _;
    db.query_one_raw(sea_orm::Statement::from_string(sea_orm::DbBackend::MySql, sql))
        .await
        .expect("query")
        .expect("a row")
        .try_get_by_index::<i64>(0)
        .expect("a number")
}

/// Sends a request and reads its status and JSON body (or `Value::Null`).
/// The Prometheus text of `/metrics` on the operations listener at `ops` (UTF-8, as the
/// format requires).
async fn metrics_text(http: &awc::Client, ops: &str) -> String {
    let mut scrape = http.get(format!("{ops}/metrics")).send().await.expect("metrics");
    let body = scrape.body().limit(10 << 20).await.expect("body");
    String::from_utf8(body.to_vec()).expect("metrics in UTF-8")
}

async fn send(request: awc::ClientRequest, body: Option<&str>) -> (StatusCode, Option<String>, Value) {
    let mut response = match body {
        Some(body) => {
            request.insert_header(("content-type", "application/json")).send_body(body.to_owned()).await
        }
        None => request.send().await,
    }
    .expect("the server answered");
    let status = response.status();
    let content_type =
        response.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let bytes = response.body().limit(10 * 1024 * 1024).await.expect("a body");
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, content_type, json)
}

/// Asserts a problem+json answer with this status, code and (for validation) field.
fn assert_problem(
    answer: &(StatusCode, Option<String>, Value),
    status: u16,
    code: &str,
    field: Option<&str>,
) {
    let (got, content_type, body) = answer;
    assert_eq!(got.as_u16(), status, "body: {body}");
    assert_eq!(content_type.as_deref(), Some("application/problem+json"), "body: {body}");
    assert_eq!(body["status"], status, "body: {body}");
    assert_eq!(body["code"], code, "body: {body}");
    if let Some(field) = field {
        assert_eq!(body["field"], field, "body: {body}");
    }
}
