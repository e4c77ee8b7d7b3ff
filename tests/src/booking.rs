//! Steps the booking tests and benchmarks share: admitted users, a fresh date to book.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};

/// The admin key the tests and benchmarks give their servers.
pub const ADMIN_KEY: &str = "e2e-admin-key-0123456789-abcdefghij";

/// Environment for a booking cluster: the admin API on, room for `max_active` admitted
/// users, admission every 100 ms, no demo data.
#[must_use]
pub fn env(max_active: usize) -> Vec<(String, String)> {
    vec![
        ("ADMIN_API_KEY".into(), ADMIN_KEY.into()),
        ("QUEUE_MAX_ACTIVE".into(), max_active.to_string()),
        ("QUEUE_ADMIT_INTERVAL_MS".into(), "100".into()),
        ("SEED_DEMO_DATA".into(), "false".into()),
    ]
}

/// A request's status and JSON body.
///
/// # Errors
/// When the server does not answer.
pub async fn call(request: awc::ClientRequest, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
    let mut response = match body {
        Some(body) => request.send_json(&body).await,
        None => request.send().await,
    }
    .map_err(|e| anyhow::anyhow!("no answer: {e}"))?;
    let bytes = response.body().limit(10 * 1024 * 1024).await.context("a body")?;
    Ok((response.status().as_u16(), serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
}

/// A signed-up user: the id, the apiKey sign-up showed once, and an access token.
#[derive(Debug, Clone)]
pub struct Fan {
    pub id: String,
    pub api_key: String,
    /// The access token (`Authorization: Bearer <access>`).
    pub access: String,
}

/// Adds the caller's credentials to a request.
pub trait AsFan: Sized {
    /// `Authorization: Bearer <fan's access token>`.
    #[must_use]
    fn bearer(self, fan: &Fan) -> Self;
    /// `Queue-Token: <token>`.
    #[must_use]
    fn queue(self, token: &str) -> Self;
}

impl AsFan for awc::ClientRequest {
    fn bearer(self, fan: &Fan) -> Self {
        self.insert_header(("Authorization", format!("Bearer {}", fan.access)))
    }

    fn queue(self, token: &str) -> Self {
        self.insert_header(("Queue-Token", token.to_owned()))
    }
}

/// Signs up a user named `name` on `base` and takes an access token for it.
///
/// # Errors
/// When either step is refused.
pub async fn sign_up(http: &awc::Client, base: &str, name: &str) -> anyhow::Result<Fan> {
    let (status, body) = call(http.post(format!("{base}/api/v1/users")), Some(json!({"name": name}))).await?;
    anyhow::ensure!(status == 201, "user not created: {status} {body}");
    let id = body["id"].as_str().context("an id")?.to_owned();
    let api_key = body["apiKey"].as_str().context("an apiKey")?.to_owned();
    let access = access_token(http, base, &api_key).await?;
    Ok(Fan { id, api_key, access })
}

/// A fresh access token for `api_key`.
///
/// # Errors
/// When the key is refused.
pub async fn access_token(http: &awc::Client, base: &str, api_key: &str) -> anyhow::Result<String> {
    let (status, body) = call(
        http.post(format!("{base}/api/v1/auth/tokens"))
            .insert_header(("Authorization", format!("Bearer {api_key}"))),
        None,
    )
    .await?;
    anyhow::ensure!(status == 201, "no access token: {status} {body}");
    body["accessToken"].as_str().map(str::to_owned).context("an accessToken")
}

/// A user, on `base`.
///
/// # Errors
/// When the user is not created.
pub async fn new_user(http: &awc::Client, base: &str) -> anyhow::Result<Fan> {
    sign_up(http, base, "fan").await
}

/// A queue token for `fan` on `base`: `(status, token)` (201 new, 200 the live one).
///
/// # Errors
/// When no token is issued.
pub async fn queue_token(http: &awc::Client, base: &str, fan: &Fan) -> anyhow::Result<(u16, String)> {
    let (status, body) =
        call(http.post(format!("{base}/api/v1/queue/tokens")).bearer(fan), Some(json!({}))).await?;
    anyhow::ensure!(status == 201 || status == 200, "no token: {status} {body}");
    Ok((status, body["token"].as_str().context("a token")?.to_owned()))
}

/// `n` users with ACTIVE queue tokens, created and queued round-robin over `bases`:
/// `(user, token)` pairs.
///
/// # Errors
/// When a step fails or the tokens are not admitted within a minute.
pub async fn admitted_users(
    http: &awc::Client,
    bases: &[&str],
    n: usize,
) -> anyhow::Result<Vec<(Fan, String)>> {
    let mut users = Vec::with_capacity(n);
    // In slices, so that a large n does not open thousands of connections at once.
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let made = futures::future::join_all(chunk.iter().map(|i| async move {
            let base = bases[i % bases.len()];
            let user = new_user(http, base).await?;
            let (status, token) = queue_token(http, base, &user).await?;
            anyhow::ensure!(status == 201, "not a new token: {status}");
            Ok::<_, anyhow::Error>((user, token))
        }))
        .await;
        users.extend(made.into_iter().collect::<anyhow::Result<Vec<_>>>()?);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, (user, token)) in users.iter().enumerate() {
        loop {
            let base = bases[i % bases.len()];
            let (_, view) =
                call(http.get(format!("{base}/api/v1/queue/tokens/me")).bearer(user).queue(token), None)
                    .await?;
            if view["status"] == "ACTIVE" {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "token {token} not admitted: {view}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(users)
}

/// A new concert with one date open for booking now (50 seats at `price`), made through
/// the admin API on `base`: the date's id.
///
/// # Errors
/// When the admin API refuses.
pub async fn open_schedule(http: &awc::Client, base: &str, price: i64) -> anyhow::Result<String> {
    let (status, concert) = call(
        http.post(format!("{base}/api/v1/admin/concerts")).insert_header(("X-Admin-Key", ADMIN_KEY)),
        Some(json!({"title": "Storm Night", "venue": "Hall 1"})),
    )
    .await?;
    anyhow::ensure!(status == 201, "concert not created: {status} {concert}");
    let id = concert["id"].as_str().context("a concert id")?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let at = |offset: i64| -> String {
        let secs = i64::try_from(now).unwrap_or(0) + offset;
        rfc3339(secs)
    };
    let (status, schedule) = call(
        http.post(format!("{base}/api/v1/admin/concerts/{id}/schedules"))
            .insert_header(("X-Admin-Key", ADMIN_KEY)),
        Some(json!({
            "startsAt": at(30 * 86_400),
            "bookingOpensAt": at(-3_600),
            "bookingClosesAt": at(29 * 86_400),
            "seatPrice": price,
        })),
    )
    .await?;
    anyhow::ensure!(status == 201, "schedule not created: {status} {schedule}");
    schedule["id"].as_str().map(str::to_owned).context("a schedule id")
}

/// Seconds since the epoch as RFC 3339 UTC (civil-from-days, proleptic Gregorian).
#[must_use]
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3_600, rem % 3_600 / 60, rem % 60)
}

/// The seat map of `schedule` on `base`, as `(seatNumber, status)` pairs.
///
/// # Errors
/// When the answer is not a seat map.
pub async fn seat_statuses(
    http: &awc::Client,
    base: &str,
    (user, token): (&Fan, &str),
    schedule: &str,
) -> anyhow::Result<Vec<(u64, String)>> {
    let (status, map) =
        call(http.get(format!("{base}/api/v1/schedules/{schedule}/seats")).bearer(user).queue(token), None)
            .await?;
    anyhow::ensure!(status == 200, "no seat map: {status} {map}");
    map["seats"]
        .as_array()
        .context("seats")?
        .iter()
        .map(|s| {
            Ok((
                s["seatNumber"].as_u64().context("seatNumber")?,
                s["status"].as_str().context("status")?.to_owned(),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_is_civil_time() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_305_600), "2026-11-22T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
