//! Idempotent charges: a key makes a charge happen once, whatever the retries.

use std::io::Write as _;

use awc::http::StatusCode;
use e2e::booking::{AsFan as _, Fan};
use e2e::{Cluster, ClusterOptions, client};
use futures::future::join_all;

use super::{assert_problem, send};

/// Status, `Idempotent-Replayed` and the exact body bytes of a keyed charge.
async fn charge(
    http: &awc::Client,
    base: &str,
    user: &Fan,
    key: &str,
    amount: i64,
) -> (StatusCode, Option<String>, Vec<u8>) {
    let mut response = http
        .post(format!("{base}/api/v1/users/{}/points/charge", user.id))
        .bearer(user)
        .insert_header(("Idempotency-Key", key))
        .insert_header(("content-type", "application/json"))
        .send_body(format!(r#"{{"amount": {amount}}}"#))
        .await
        .expect("answered");
    let replayed =
        response.headers().get("idempotent-replayed").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = response.body().await.expect("body").to_vec();
    (response.status(), replayed, body)
}

async fn new_user(http: &awc::Client, base: &str) -> Fan {
    e2e::booking::sign_up(http, base, "idem").await.expect("a user")
}

async fn balance_and_history(http: &awc::Client, base: &str, user: &Fan) -> (i64, usize) {
    let id = &user.id;
    let balance = send(http.get(format!("{base}/api/v1/users/{id}/points")).bearer(user), None).await;
    let history =
        send(http.get(format!("{base}/api/v1/users/{id}/points/history?limit=1000")).bearer(user), None)
            .await;
    (balance.2["balance"].as_i64().expect("balance"), history.2.as_array().expect("list").len())
}

#[actix_web::test]
async fn replays_and_concurrent_duplicates_of_a_keyed_charge_are_applied_once_with_identical_answers() {
    // Concurrent duplicates wait for the first with their key: none may give up for want of
    // time on a slow machine.
    let options = ClusterOptions::with_env(e2e::PATIENT_LOCKS);
    let cluster = Cluster::start_with(3, &options).await.expect("cluster");
    let http = client();
    let user = new_user(&http, cluster.url(0)).await;

    // Sequential replays, each on another instance.
    let first = charge(&http, cluster.url(0), &user, "order-1", 700).await;
    assert_eq!(first.0.as_u16(), 200, "{:?}", String::from_utf8_lossy(&first.2));
    assert_eq!(first.1, None, "a first answer is not a replay");
    for i in 1..3 {
        let again = charge(&http, cluster.url(i), &user, "order-1", 700).await;
        assert_eq!(again.0, first.0);
        assert_eq!(again.2, first.2, "a replay is the first answer, byte for byte");
        assert_eq!(again.1.as_deref(), Some("true"));
    }
    assert_eq!(balance_and_history(&http, cluster.url(1), &user).await, (700, 1));

    // Eight at once with one new key, over every instance.
    let answers = join_all((0..8).map(|i| charge(&http, cluster.url(i), &user, "order-2", 300))).await;
    assert!(answers.iter().all(|a| a.0.as_u16() == 200), "{answers:?}");
    assert!(answers.iter().all(|a| a.2 == answers[0].2), "the answers differ: {answers:?}");
    assert_eq!(answers.iter().filter(|a| a.1.is_none()).count(), 1, "exactly one ran");
    let body: serde_json::Value = serde_json::from_slice(&answers[0].2).expect("json");
    assert_eq!(body["balance"], 1_000);
    assert_eq!(balance_and_history(&http, cluster.url(2), &user).await, (1_000, 2));

    // The key of one charge, reused for another amount, is refused and changes nothing.
    let reused = send(
        http.post(format!("{}/api/v1/users/{}/points/charge", cluster.url(0), user.id))
            .bearer(&user)
            .insert_header(("Idempotency-Key", "order-1")),
        Some(r#"{"amount": 701}"#),
    )
    .await;
    assert_problem(&reused, 422, "IDEMPOTENCY_KEY_REUSED", None);
    // Keys belong to their user: another user's "order-1" is a charge of its own.
    let other = new_user(&http, cluster.url(0)).await;
    assert_eq!(charge(&http, cluster.url(0), &other, "order-1", 700).await.1, None);

    // Malformed keys are refused before anything runs.
    for bad in ["", "has space", &"k".repeat(65), "caf\u{e9}"] {
        let refused = send(
            http.post(format!("{}/api/v1/users/{}/points/charge", cluster.url(0), user.id))
                .bearer(&user)
                .insert_header(("Idempotency-Key", bad)),
            Some(r#"{"amount": 5}"#),
        )
        .await;
        assert_problem(&refused, 400, "VALIDATION_FAILED", Some("Idempotency-Key"));
    }
    assert_eq!(balance_and_history(&http, cluster.url(0), &user).await, (1_000, 2));
    cluster.shut_down().await;
}

#[actix_web::test]
async fn a_charge_whose_answer_was_lost_is_applied_once_when_retried_with_its_key() {
    const CHARGES: usize = 6;
    // A retry may arrive while its first attempt still runs, and then waits for it.
    let options = ClusterOptions::with_env(e2e::PATIENT_LOCKS);
    let cluster = Cluster::start_with(2, &options).await.expect("cluster");
    let http = client();
    let user = new_user(&http, cluster.url(0)).await;
    let address = cluster.url(0).trim_start_matches("http://").to_owned();

    for n in 0..CHARGES {
        // The client sends the whole request and hangs up without reading the answer: it
        // cannot tell whether the charge happened.
        let body = r#"{"amount": 50}"#;
        let request = format!(
            "POST /api/v1/users/{}/points/charge HTTP/1.1\r\nHost: {address}\r\n\
             Authorization: Bearer {}\r\n\
             Content-Type: application/json\r\nIdempotency-Key: lost-{n}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            user.id,
            user.access,
            body.len()
        );
        let mut stream = std::net::TcpStream::connect(&address).expect("connect");
        stream.write_all(request.as_bytes()).expect("sent");
        stream.shutdown(std::net::Shutdown::Both).expect("hung up");
        drop(stream);

        // So it retries with the same key, on another instance.
        let retried = charge(&http, cluster.url(n + 1), &user, &format!("lost-{n}"), 50).await;
        assert_eq!(retried.0.as_u16(), 200, "{}", String::from_utf8_lossy(&retried.2));
    }

    // Every charge happened once: whether the first attempt committed, was cut off, or was
    // still running when the retry came, the retry either replayed it, waited for it, or
    // ran in its place.
    assert_eq!(balance_and_history(&http, cluster.url(1), &user).await, (50 * CHARGES as i64, CHARGES));
    cluster.shut_down().await;
}
