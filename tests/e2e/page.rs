//! The booking page in a real browser: headless Chromium driven over WebDriver through the
//! whole flow (sign up, charge, queue, seat, hold, pay), a second browser watching the seat
//! change without reloading, and a user whose name is markup. Screenshots of each step go
//! to `target/tmp/page/` (Cargo's scratch directory for integration tests).

use std::path::PathBuf;

use e2e::booking::{self, open_schedule};
use e2e::webdriver::{Browser, Session};
use e2e::{Cluster, ClusterOptions, client};
use serde_json::json;

use super::send;

const PRICE: i64 = 7_000;
const MARKUP_NAME: &str = "<img src=x onerror=alert(1)>";

fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("page")
}

/// Opens the page and waits until its script has wired everything.
async fn open_page(browser: &Browser, base: &str, name: &str) -> Session {
    // A phone-sized window: the page must work there.
    let mut session = browser.session(412, 915).await.expect("a browser");
    session.screenshots_to(&screenshots(), name);
    session.open(&format!("{base}/")).await.expect("the page");
    session
        .wait_for("the page's script", "return document.body.dataset.ready === 'true';", json!([]))
        .await
        .expect("ready");
    session
}

/// Signs up through the form, charges `points` and waits until the queue admits the user
/// and the seat map of the only open date is shown.
async fn sign_up_charge_and_queue(page: &Session, name: &str, points: i64) -> String {
    page.type_into("#signup-name", name).await.expect("name typed");
    page.click("#signup-button").await.expect("sign up");
    page.wait_for(
        "an apiKey shown once",
        "return document.getElementById('api-key').textContent.startsWith('ck_');",
        json!([]),
    )
    .await
    .expect("apiKey");
    let api_key = page.text("#api-key").await.expect("apiKey");
    page.wait_for_text("#who", name).await.expect("signed in");
    page.screenshot("1-signed-up").await.expect("screenshot");

    page.type_into("#charge-amount", &points.to_string()).await.expect("amount typed");
    page.click("#charge-button").await.expect("charge");
    page.wait_for_text("#balance", &points.to_string()).await.expect("balance");

    page.click("#queue-button").await.expect("queue");
    page.wait_for_text("#queue-status", "ACTIVE").await.expect("admitted");
    page.wait_for(
        "the 50-seat map",
        "return document.querySelectorAll('#seat-map button.seat').length === 50;",
        json!([]),
    )
    .await
    .expect("seat map");
    page.screenshot("2-admitted").await.expect("screenshot");
    api_key
}

async fn seat_status(page: &Session, seat: u32) -> String {
    page.read(
        "const b = document.querySelector(`#seat-map button.seat[data-seat=\"${arguments[0]}\"]`); return b ? b.dataset.status : null;",
        json!([seat]),
    )
    .await
    .expect("read")
    .as_str()
    .unwrap_or_default()
    .to_owned()
}

async fn wait_for_seat(page: &Session, seat: u32, status: &str) {
    page.wait_for(
        &format!("seat {seat} shown {status}"),
        "const b = document.querySelector(`#seat-map button.seat[data-seat=\"${arguments[0]}\"]`); return b !== null && b.dataset.status === arguments[1];",
        json!([seat, status]),
    )
    .await
    .expect("seat status");
}

#[actix_web::test]
async fn a_person_books_and_pays_in_the_browser_while_another_watches_the_seat_go() {
    let options = ClusterOptions { env: booking::env(2), ..ClusterOptions::default() };
    let cluster = Cluster::start_with(1, &options).await.expect("cluster");
    let base = cluster.url(0);
    let http = client();
    open_schedule(&http, base, PRICE).await.expect("a date to book");
    let browser = Browser::start().await.expect("chromedriver (apt-get install chromium chromium-driver)");

    // The page itself: served with its policy.
    let mut index = http.get(format!("{base}/")).send().await.expect("the page");
    assert_eq!(index.status().as_u16(), 200);
    let csp =
        index.headers().get("content-security-policy").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(index.headers().get("x-content-type-options").and_then(|v| v.to_str().ok()), Some("nosniff"));
    let _ = index.body().await;

    // A books: sign up, charge, queue, ACTIVE, seat map.
    let buyer = open_page(&browser, base, "buyer").await;
    let api_key = sign_up_charge_and_queue(&buyer, "Ada", 50_000).await;
    // B, whose name is markup, watches the same date from another browser.
    let watcher = open_page(&browser, base, "watcher").await;
    sign_up_charge_and_queue(&watcher, MARKUP_NAME, 10_000).await;
    assert_eq!(watcher.text("#who").await.expect("who"), MARKUP_NAME, "the name is shown as text");
    let injected = watcher
        .read("return document.querySelectorAll('#who img, img[src=\"x\"]').length;", json!([]))
        .await
        .expect("read");
    assert_eq!(injected, json!(0), "a user's name became markup");
    assert_eq!(watcher.alert().await.expect("alert state"), None, "a user's name ran script");

    // A bad charge is refused with the problem's detail, as text.
    buyer.type_into("#charge-amount", "0").await.expect("typed");
    buyer.click("#charge-button").await.expect("charge");
    buyer
        .wait_for(
            "the refusal's detail",
            "return document.getElementById('error').textContent.trim().length > 0;",
            json!([]),
        )
        .await
        .expect("an error shown");
    let error = buyer.text("#error").await.expect("error");
    assert!(!error.contains('{') && !error.contains("VALIDATION_FAILED"), "raw JSON shown: {error}");
    buyer.wait_for_text("#balance", "50000").await.expect("the balance did not move");
    buyer.scroll_to("#error").await.expect("scrolled");
    buyer.screenshot("3-refused-charge").await.expect("screenshot");

    // A holds seat 7; B sees it HELD without reloading.
    wait_for_seat(&watcher, 7, "AVAILABLE").await;
    buyer.click("#seat-map button.seat[data-seat=\"7\"]").await.expect("hold");
    buyer.wait_for_text("#hold-seat", "7").await.expect("holding seat 7");
    let countdown = buyer.text("#hold-countdown").await.expect("countdown");
    assert!(
        countdown.len() == 5
            && countdown.as_bytes()[2] == b':'
            && countdown.replace(':', "").bytes().all(|b| b.is_ascii_digit()),
        "countdown {countdown:?}"
    );
    buyer.screenshot("4-held").await.expect("screenshot");
    wait_for_seat(&watcher, 7, "HELD").await;
    watcher.scroll_to("#seat-map").await.expect("scrolled");
    watcher.screenshot("3-sees-held").await.expect("screenshot");

    // A pays with a double click: paid once.
    buyer.click("#pay-button").await.expect("pay");
    let _ = buyer.click("#pay-button").await; // the second click may find the button disabled or gone
    buyer
        .wait_for(
            "the payment's result",
            "return document.getElementById('payment-result').textContent.includes('Paid');",
            json!([]),
        )
        .await
        .expect("paid");
    buyer.wait_for_text("#balance", &(50_000 - PRICE).to_string()).await.expect("balance after paying");
    buyer.scroll_to("#payment-result").await.expect("scrolled");
    buyer.screenshot("5-paid").await.expect("screenshot");
    wait_for_seat(&watcher, 7, "SOLD").await;
    watcher.screenshot("4-sees-sold").await.expect("screenshot");
    assert_eq!(seat_status(&watcher, 8).await, "AVAILABLE", "only the paid seat changed");

    // Through the API: one payment, one USE row, the balance down by the price once.
    let token = booking::access_token(&http, base, &api_key).await.expect("an access token");
    let history = send(
        http.get(format!("{base}/api/v1/users/{}/points/history", user_id(&token)))
            .insert_header(("Authorization", format!("Bearer {token}"))),
        None,
    )
    .await;
    let uses: Vec<_> = history.2.as_array().expect("history").iter().filter(|e| e["kind"] == "USE").collect();
    assert_eq!(uses.len(), 1, "{}", history.2);
    assert_eq!(uses[0]["amount"], PRICE);
    // The page lists that history too.
    buyer
        .wait_for(
            "two history rows",
            "return document.querySelectorAll('#history li').length === 2;",
            json!([]),
        )
        .await
        .expect("history shown");

    buyer.close().await;
    watcher.close().await;
    drop(browser);
    cluster.shut_down().await;
}

/// The subject of an access token (the user's id), read without checking the signature:
/// the server that made it is the one being tested.
fn user_id(token: &str) -> String {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).expect("a JWT");
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("base64url");
    let claims: serde_json::Value = serde_json::from_slice(&claims).expect("JSON claims");
    claims["sub"].as_str().expect("a subject").to_owned()
}
