//! The waiting queue over several instances: admission order, the cap, lifetimes, the
//! event stream and bad input.

use std::time::{Duration, Instant};

use e2e::booking::{AsFan as _, Fan};
use e2e::{Cluster, ClusterOptions, client};
use futures::StreamExt as _;
use serde_json::Value;

use super::{assert_problem, send};

async fn new_user(http: &awc::Client, base: &str) -> Fan {
    e2e::booking::new_user(http, base).await.expect("a user")
}

/// `POST /api/v1/queue/tokens` as `user` on `base`: its status and body.
async fn issue(http: &awc::Client, base: &str, user: &Fan) -> (u16, Value) {
    let answer = send(http.post(format!("{base}/api/v1/queue/tokens")).bearer(user), Some("{}")).await;
    (answer.0.as_u16(), answer.2)
}

/// A token as one read of its view shows it. A token only ever moves forward through
/// these: waiting (at a place that only falls), active, gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Waiting(u64),
    Active,
    Gone,
}

impl Seen {
    /// How far along it is: 0 waiting, 1 active, 2 gone.
    const fn stage(self) -> u8 {
        match self {
            Self::Waiting(_) => 0,
            Self::Active => 1,
            Self::Gone => 2,
        }
    }
}

/// Reads `token`'s view on `base` as its owner `user` (401 is gone), checking that its
/// fields fit its status.
async fn read(http: &awc::Client, base: &str, (user, token): (&Fan, &str)) -> Seen {
    let answer =
        send(http.get(format!("{base}/api/v1/queue/tokens/me")).bearer(user).queue(token), None).await;
    if answer.0.as_u16() == 401 {
        assert_problem(&answer, 401, "QUEUE_TOKEN_INVALID", None);
        return Seen::Gone;
    }
    let view = &answer.2;
    assert_eq!(answer.0.as_u16(), 200, "{view}");
    match view["status"].as_str() {
        Some("ACTIVE") => {
            assert!(view["expiresAt"].as_str().is_some_and(|at| at.ends_with('Z')), "{view}");
            assert!(view["position"].is_null() && view["estimatedWaitSeconds"].is_null(), "{view}");
            Seen::Active
        }
        Some("WAITING") => {
            assert!(view["expiresAt"].is_null(), "{view}");
            let position = view["position"].as_u64().unwrap_or_else(|| panic!("no position: {view}"));
            assert!(position >= 1, "{view}");
            Seen::Waiting(position)
        }
        _ => panic!("not a token view: {view}"),
    }
}

/// Checks one pass over a line of tokens (`pass[i]`: the token issued `i`-th), read from
/// the last token to the first. `left_line[i]`: token `i` was seen active or gone in an
/// earlier pass.
///
/// A pass is not a snapshot, and on a slow machine it may take long, so what is checked is
/// what holds however the reads fall in time. The line is first come, first served and
/// every token lives as long, so at any instant no token is further along than one issued
/// before it; each token is read after every token behind it, when it can only be as far
/// along or further, so the pass must show that order. The same reasoning makes the cap
/// exact: every token read ACTIVE was active at the instant the rearmost of them was read.
/// And a waiting token's place counts, at its read, at least the tokens ahead of it read
/// waiting after it (they were waiting then too) and at most those not yet seen out of the
/// line.
fn check_pass(pass: &[Seen], left_line: &[bool], cap: usize) {
    for (i, pair) in pass.windows(2).enumerate() {
        assert!(pair[0].stage() >= pair[1].stage(), "token {} ahead of token {i}: {pass:?}", i + 1);
    }
    let active = pass.iter().filter(|seen| **seen == Seen::Active).count();
    assert!(active <= cap, "{active} active at once, over the cap of {cap}: {pass:?}");
    let mut previous = 0;
    for (j, seen) in pass.iter().enumerate() {
        let Seen::Waiting(position) = *seen else { continue };
        let surely_ahead = pass[..j].iter().filter(|seen| matches!(seen, Seen::Waiting(_))).count();
        let maybe_ahead = left_line[..j].iter().filter(|left| !**left).count();
        let low = u64::try_from(surely_ahead + 1).expect("small");
        let high = u64::try_from(maybe_ahead + 1).expect("small");
        assert!((low..=high).contains(&position), "token {j} at {position}, not {low}..={high}: {pass:?}");
        assert!(position > previous, "places out of issue order: {pass:?}");
        previous = position;
    }
}

fn options(max_active: &str, active_seconds: &str) -> ClusterOptions {
    ClusterOptions {
        env: vec![
            ("QUEUE_MAX_ACTIVE".into(), max_active.into()),
            ("QUEUE_ACTIVE_SECONDS".into(), active_seconds.into()),
            ("QUEUE_ADMIT_INTERVAL_MS".into(), "100".into()),
        ],
        ..ClusterOptions::default()
    }
}

#[actix_web::test]
async fn tokens_are_admitted_in_issue_order_across_instances_never_past_the_cap() {
    const TOKENS: usize = 8;
    const CAP: usize = 3;
    const LIFETIME: Duration = Duration::from_secs(3);
    let options = options(&CAP.to_string(), &LIFETIME.as_secs().to_string());
    let cluster = Cluster::start_with(3, &options).await.expect("cluster");
    let http = client();
    let issuing = Instant::now();
    let mut tokens = Vec::new();
    for i in 0..TOKENS {
        let user = new_user(&http, cluster.url(i)).await;
        let issued = issue(&http, cluster.url(i), &user).await;
        assert_eq!(issued.0, 201, "{}", issued.1);
        assert_eq!(issued.1["userId"], user.id.as_str());
        // Asking again, on another instance, gives the same token back.
        let again = issue(&http, cluster.url(i + 1), &user).await;
        assert_eq!(again.0, 200, "{}", again.1);
        assert_eq!(again.1["token"], issued.1["token"]);
        tokens.push((user, issued.1["token"].as_str().expect("token").to_owned()));
    }

    // Every instance runs admission: three at a time are let in, in issue order, each for
    // its lifetime; then they are gone (401), and the next get in. The line is watched
    // until every token has been through it. No pass is expected to be a given snapshot
    // (with 3 s lifetimes, a slow machine may miss any one of them): each pass is checked
    // against what holds whenever its reads fall (`check_pass`).
    let mut left_line = [false; TOKENS];
    let mut seen_active = [false; TOKENS];
    let mut last_read: [Option<Instant>; TOKENS] = [None; TOKENS];
    let mut longest_gap = Duration::ZERO;
    let mut first_pass_done = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut pass = [Seen::Gone; TOKENS];
        for i in (0..TOKENS).rev() {
            pass[i] = read(&http, cluster.url(i), (&tokens[i].0, tokens[i].1.as_str())).await;
            let now = Instant::now();
            if let Some(before) = last_read[i] {
                longest_gap = longest_gap.max(now - before);
            }
            last_read[i] = Some(now);
        }
        if first_pass_done.is_none() {
            first_pass_done = Some(Instant::now());
        }
        check_pass(&pass, &left_line, CAP);
        for (i, seen) in pass.iter().enumerate() {
            left_line[i] |= !matches!(seen, Seen::Waiting(_));
            seen_active[i] |= *seen == Seen::Active;
        }
        if pass.iter().all(|seen| *seen == Seen::Gone) {
            break;
        }
        assert!(Instant::now() < deadline, "the line never emptied: {pass:?}");
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    // Each token was caught ACTIVE, when every token was read at least once per lifetime
    // from before the first could have been let in until it was gone. A machine too slow
    // for that still had order, cap and places checked above.
    let margin = Duration::from_millis(500);
    let read_often_enough = first_pass_done.is_some_and(|done| done - issuing + margin < LIFETIME)
        && longest_gap + margin < LIFETIME;
    if read_often_enough {
        assert!(seen_active.iter().all(|active| *active), "a token was never seen active: {seen_active:?}");
    } else {
        eprintln!("reads too far apart (at most {longest_gap:?}) to catch every token active: not checked");
    }
    cluster.shut_down().await;
}

/// A burst of token requests, then of status reads, on the MySQL queue
/// (`QUEUE_BACKEND=mysql`) over two instances, each running an admission step every 50 ms
/// (ten let in for two seconds at a time): each is answered, none with 503. Issues, seen-marks
/// and removals meet the steps on the same rows and index entries, and InnoDB picks one of
/// them as a deadlock's victim now and then; the adapter runs it again. (Before it did, a
/// CI run answered one of sixteen issues 503, and this test failed in its reads: one
/// mark's deadlock answered 503 to every read that shared the instance's lookup with it.)
#[actix_web::test]
async fn a_burst_on_the_mysql_queue_is_answered_without_a_503() {
    const USERS: usize = 100;
    const READS: usize = 10;
    let mut options = options("10", "2");
    options.env.push(("QUEUE_BACKEND".into(), "mysql".into()));
    let cluster = Cluster::start_with(2, &options).await.expect("cluster");
    let http = client();
    let users = futures::future::join_all((0..USERS).map(|i| new_user(&http, cluster.url(i)))).await;

    let issued = futures::future::join_all(
        users.iter().enumerate().map(|(i, user)| issue(&http, cluster.url(i), user)),
    )
    .await;
    let mut tokens = Vec::with_capacity(USERS);
    for (status, body) in &issued {
        assert_eq!(*status, 201, "{body}");
        tokens.push(body["token"].as_str().expect("a token").to_owned());
    }
    let distinct: std::collections::HashSet<&String> = tokens.iter().collect();
    assert_eq!(distinct.len(), USERS, "a token each");

    // Each read of a waiting token marks it seen; an active one lives 2 s, then is gone.
    for _ in 0..READS {
        let reads =
            futures::future::join_all(users.iter().zip(&tokens).enumerate().map(|(i, (user, token))| {
                let url = format!("{}/api/v1/queue/tokens/me", cluster.url(i + 1));
                send(http.get(url).bearer(user).queue(token), None)
            }))
            .await;
        for answer in &reads {
            match answer.0.as_u16() {
                200 => {
                    assert!(matches!(answer.2["status"].as_str(), Some("WAITING" | "ACTIVE")), "{answer:?}")
                }
                401 => assert_problem(answer, 401, "QUEUE_TOKEN_INVALID", None),
                _ => panic!("a status read answered {answer:?}"),
            }
        }
    }
    // How often a deadlock was met and run through again: a reading (it depends on timing,
    // so it is printed, not asserted; the answers above are the test).
    for i in 0..2 {
        let text = super::metrics_text(&http, cluster.ops_url(i)).await;
        let retried = text.lines().find(|l| l.starts_with("queue_mysql_deadlock_retries_total"));
        eprintln!("instance {i}: {}", retried.unwrap_or("no deadlock run again"));
    }
    cluster.shut_down().await;
}

/// Reads SSE frames from `response` until the stream ends or `within` passes: the events,
/// and whether the stream ended.
async fn read_events(
    mut body: awc::ClientResponse<
        impl futures::Stream<Item = Result<actix_web::web::Bytes, awc::error::PayloadError>> + Unpin,
    >,
    within: Duration,
) -> (Vec<(String, Value)>, bool) {
    let mut buffer = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    let ended = loop {
        let chunk = match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(chunk)) => chunk.expect("a chunk"),
            Ok(None) => break true,
            Err(_) => break false,
        };
        buffer.push_str(std::str::from_utf8(&chunk).expect("utf-8"));
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let mut name = String::new();
            let mut data = Value::Null;
            for line in frame.lines() {
                if let Some(rest) = line.strip_prefix("event: ") {
                    name = rest.to_owned();
                } else if let Some(rest) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(rest).expect("json data");
                }
            }
            if !name.is_empty() {
                events.push((name, data));
            }
        }
    };
    (events, ended)
}

#[actix_web::test]
async fn an_event_stream_shows_the_position_falling_then_active_and_ends() {
    // Two let in at a time, for 3 s each.
    const CAP: u64 = 2;
    let cluster = Cluster::start_with(2, &options(&CAP.to_string(), "3")).await.expect("cluster");
    let http = client();
    let mut tokens = Vec::new();
    for i in 0..6 {
        let user = new_user(&http, cluster.url(i)).await;
        let issued = issue(&http, cluster.url(i), &user).await;
        tokens.push((user, issued.1["token"].as_str().expect("token").to_owned()));
    }
    let (owner, last) = tokens.last().expect("six").clone();

    let response = client()
        .get(format!("{}/api/v1/queue/tokens/me/events", cluster.url(1)))
        .bearer(&owner)
        .queue(&last)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("stream");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let (events, ended) = read_events(response, Duration::from_secs(90)).await;
    assert!(ended, "the stream did not end after ACTIVE: {events:?}");

    assert!(events.iter().all(|(name, _)| name == "status"), "{events:?}");
    let (_, final_view) = events.last().expect("events");
    assert_eq!(final_view["status"], "ACTIVE", "{events:?}");
    let positions: Vec<u64> = events.iter().filter_map(|(_, v)| v["position"].as_u64()).collect();
    // A view changes with its estimate too, so a position may repeat; it never rises.
    assert!(positions.windows(2).all(|w| w[0] >= w[1]), "positions only fall: {positions:?}");
    // From behind more than two others, it cannot be let in before a whole lifetime (3 s)
    // has passed with it at a lower place, which the stream (polled every 100 ms) shows. A
    // slow machine may open the stream later, at place 1 or 2 or already ACTIVE: then
    // there is no fall to see.
    if positions.first().is_some_and(|first| *first > CAP) {
        assert!(positions.first() > positions.last(), "the position was seen falling: {positions:?}");
    } else {
        eprintln!("the stream opened at {positions:?}, too late to see the place fall: not checked");
    }
    cluster.shut_down().await;
}

#[actix_web::test]
async fn bad_queue_requests_are_problems() {
    let cluster = Cluster::start(1).await.expect("cluster");
    let http = client();
    let base = cluster.url(0);
    let fan = new_user(&http, base).await;
    let someone = new_user(&http, base).await;
    let tokens = format!("{base}/api/v1/queue/tokens");
    let post = || http.post(&tokens).bearer(&fan);
    // The caller is the bearer's subject: a `userId`, when sent, must be a user id.
    for body in [r#"{"userId": "nope"}"#, r#"{"userId": 5}"#] {
        assert_problem(&send(post(), Some(body)).await, 400, "VALIDATION_FAILED", Some("userId"));
    }
    assert_problem(&send(post(), Some("[]")).await, 400, "VALIDATION_FAILED", None);
    assert_problem(&send(post(), Some("{")).await, 400, "MALFORMED_JSON", None);
    // ... and the caller's: nobody's id, or another user's, is forbidden (and issues nothing).
    let stranger = uuid::Uuid::now_v7().to_string();
    for id in [stranger.as_str(), someone.id.as_str()] {
        let body = format!(r#"{{"userId": "{id}"}}"#);
        assert_problem(&send(post(), Some(&body)).await, 403, "FORBIDDEN", None);
    }
    let (status, theirs) = issue(&http, base, &someone).await;
    assert_eq!(status, 201, "a refused request issued the other user a token: {theirs}");
    // The caller's own id is the same as none.
    let own = send(post(), Some(&format!(r#"{{"userId": "{}"}}"#, fan.id))).await;
    assert_eq!(own.0.as_u16(), 201, "{}", own.2);
    assert_eq!(own.2["userId"], fan.id.as_str());
    let again = issue(&http, base, &fan).await;
    assert_eq!((again.0, &again.1["token"]), (200, &own.2["token"]), "{}", again.1);
    // Without an access token, nothing is issued.
    assert_problem(&send(http.post(&tokens), Some("{}")).await, 401, "UNAUTHENTICATED", None);

    let mine = own.2["token"].as_str().expect("token");
    let theirs = theirs["token"].as_str().expect("token");
    for path in ["/api/v1/queue/tokens/me", "/api/v1/queue/tokens/me/events"] {
        let url = format!("{base}{path}");
        assert_problem(&send(http.get(&url).bearer(&fan), None).await, 401, "QUEUE_TOKEN_INVALID", None);
        // A made-up token, or another user's live one: worth nothing to this caller.
        for token in ["nope", "", &uuid::Uuid::now_v7().to_string(), theirs] {
            let answer = send(http.get(&url).bearer(&fan).queue(token), None).await;
            assert_problem(&answer, 401, "QUEUE_TOKEN_INVALID", None);
        }
        // Its own token without its access token: not authenticated.
        assert_problem(&send(http.get(&url).queue(mine), None).await, 401, "UNAUTHENTICATED", None);
    }
    cluster.shut_down().await;
}

#[actix_web::test]
async fn open_event_streams_end_when_the_instance_stops_instead_of_holding_the_shutdown() {
    // A grace far longer than the stop may take, however slow the machine: a stop that
    // waited for the open streams would take all of it.
    let mut options = options("1", "600");
    options.env.push(("SHUTDOWN_GRACE_SECONDS".into(), "180".into()));
    let cluster = Cluster::start_with(1, &options).await.expect("cluster");
    let http = client();
    let base = cluster.url(0).to_owned();
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let user = new_user(&http, &base).await;
        let issued = issue(&http, &base, &user).await;
        tokens.push((user, issued.1["token"].as_str().expect("token").to_owned()));
    }
    // One is let in; the other two wait, their streams open.
    let mut streams = Vec::new();
    for (user, token) in &tokens[1..] {
        let response = client()
            .get(format!("{base}/api/v1/queue/tokens/me/events"))
            .bearer(user)
            .queue(token)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .expect("stream");
        assert_eq!(response.status().as_u16(), 200);
        streams.push(response);
    }
    let readers: Vec<_> =
        streams.into_iter().map(|s| actix_web::rt::spawn(read_events(s, Duration::from_secs(90)))).collect();

    cluster.instances[0]
        .terminate_and_wait(Duration::from_secs(60))
        .expect("stopped without waiting out the grace");

    for reader in readers {
        let (events, ended) = reader.await.expect("read");
        assert!(ended, "a stream did not end with its instance: {events:?}");
        assert!(
            events.iter().all(|(name, view)| name == "status" && view["status"] == "WAITING"),
            "{events:?}"
        );
    }
    cluster.shut_down().await;
}
