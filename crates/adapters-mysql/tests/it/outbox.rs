//! The outbox on the real database: relays running at once send each event once and in
//! order per aggregate; a relay that dies before marking its events sent leaves them to
//! be sent again. And one payment per reservation, whatever the locks did.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use adapters_mysql::outbox::MySqlOutboxStore;
use application::clock;
use application::failure::Failure;
use application::outbox::{EventPublisher, OutboxEvent, OutboxRelay, OutboxStore, PendingEvent};
use application::tx::{TransactionManager, in_tx};
use async_trait::async_trait;
use uuid::Uuid;

use super::Db;

/// Records what it publishes, slowly (so that relays overlap); fails on `fail_on` calls.
#[derive(Default)]
struct Recording {
    sent: Mutex<Vec<(Uuid, Uuid)>>,
    calls: Mutex<usize>,
    fail_on: Option<usize>,
}

#[async_trait]
impl EventPublisher for Recording {
    async fn publish(&self, event: &PendingEvent) -> anyhow::Result<()> {
        let call = {
            let mut calls = self.calls.lock().expect("not poisoned");
            *calls += 1;
            *calls
        };
        tokio::time::sleep(Duration::from_millis(2)).await;
        if self.fail_on == Some(call) {
            anyhow::bail!("the relay died here");
        }
        self.sent.lock().expect("not poisoned").push((event.aggregate_id, event.id));
        Ok(())
    }
}

/// `per_aggregate` events for each of `aggregates` new aggregates, written in turn.
async fn write_events(
    db: &Db,
    store: &Arc<MySqlOutboxStore>,
    aggregates: usize,
    per_aggregate: usize,
) -> Vec<(Uuid, Uuid)> {
    let ids: Vec<Uuid> = (0..aggregates).map(|_| Uuid::now_v7()).collect();
    let mut written = Vec::new();
    for round in 0..per_aggregate {
        for aggregate in &ids {
            let event = OutboxEvent {
                id: Uuid::now_v7(),
                aggregate_id: *aggregate,
                event_type: "PaymentCompleted",
                payload: format!(r#"{{"round":{round}}}"#),
                created_at: clock::now_utc(),
            };
            let store = Arc::clone(store);
            let appended = event.clone();
            in_tx(db.txm.as_ref(), move |tx| {
                Box::pin(async move {
                    store.append(tx, &appended).await.map_err(Failure::Unexpected)?;
                    Ok::<_, Failure>(())
                })
            })
            .await
            .expect("written");
            written.push((event.aggregate_id, event.id));
        }
    }
    written
}

fn relay(db: &Db, store: &Arc<MySqlOutboxStore>, publisher: &Arc<Recording>, batch: u32) -> OutboxRelay {
    let txm: Arc<dyn TransactionManager> = db.txm.clone();
    OutboxRelay::new(store.clone(), publisher.clone(), txm, batch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_at_once_send_every_event_once_and_in_order_per_aggregate() {
    let db = Db::fresh("outbox_two").await;
    let store = Arc::new(MySqlOutboxStore::new(db.conn.clone()));
    let written = write_events(&db, &store, 10, 3).await;
    let publisher = Arc::new(Recording::default());
    let (a, b) = (relay(&db, &store, &publisher, 4), relay(&db, &store, &publisher, 4));

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while store.pending().await.expect("pending") > 0 {
        assert!(std::time::Instant::now() < deadline, "events left unsent");
        let (ra, rb) = tokio::join!(a.relay_once(), b.relay_once());
        ra.expect("relay a");
        rb.expect("relay b");
    }

    let sent = publisher.sent.lock().unwrap().clone();
    let mut ids: Vec<Uuid> = sent.iter().map(|(_, id)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!((sent.len(), ids.len()), (written.len(), written.len()), "each event exactly once");
    for aggregate in written.iter().map(|(a, _)| *a).collect::<std::collections::BTreeSet<_>>() {
        let expected: Vec<Uuid> =
            written.iter().filter(|(a, _)| *a == aggregate).map(|(_, id)| *id).collect();
        let got: Vec<Uuid> = sent.iter().filter(|(a, _)| *a == aggregate).map(|(_, id)| *id).collect();
        assert_eq!(got, expected, "events of one aggregate in the order written");
    }
    db.drop_now().await;
}

#[tokio::test]
async fn a_relay_that_dies_before_marking_its_events_sent_leaves_them_to_be_sent_again() {
    let db = Db::fresh("outbox_crash").await;
    let store = Arc::new(MySqlOutboxStore::new(db.conn.clone()));
    let written = write_events(&db, &store, 3, 1).await;
    // Publishes two, then dies on the third: nothing is marked.
    let dying = Arc::new(Recording { fail_on: Some(3), ..Recording::default() });
    assert!(relay(&db, &store, &dying, 10).relay_once().await.is_err());
    assert_eq!(dying.sent.lock().unwrap().len(), 2, "two went out before it died");
    assert_eq!(store.pending().await.expect("pending"), 3, "none was marked sent");

    let healthy = Arc::new(Recording::default());
    assert_eq!(relay(&db, &store, &healthy, 10).relay_once().await.expect("relay"), 3);

    let resent: Vec<Uuid> = healthy.sent.lock().unwrap().iter().map(|(_, id)| *id).collect();
    assert_eq!(
        resent,
        written.iter().map(|(_, id)| *id).collect::<Vec<_>>(),
        "all three, the first two again"
    );
    assert_eq!(store.pending().await.expect("pending"), 0);
    db.drop_now().await;
}
