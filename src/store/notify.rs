//! Wake-ups from the database (LISTEN/NOTIFY): a stored batch of results names its group
//! on [`RESULTS_CHANNEL`], a settled delivery on [`GROUPS_CHANNEL`], and the controller
//! reconciles that group instead of waiting for a periodic look; newly due deliveries wake the
//! dispatchers on [`DISPATCH_CHANNEL`], and an order handed to a waiting worker wakes its
//! request at the API on [`CARRIERS_CHANNEL`]. The listening connection is its own (a pooled one would be handed to
//! others) and is made again whenever it breaks; each new connection is announced, since
//! notifications sent while it was down are lost and listeners must look again.

use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

/// A group's deliveries changed (one failed, or an endpoint has nothing left to send); the
/// payload is `namespace/name` of the group.
pub const GROUPS_CHANNEL: &str = "kinsight_groups";
/// Results of a group were stored (with their image events); the payload is
/// `namespace/name` of the group, followed by [`ALL_STORED`] when that write stored the
/// last of its images' first results.
pub const RESULTS_CHANNEL: &str = "kinsight_results";
/// The mark after a [`RESULTS_CHANNEL`] payload whose write completed the group's results:
/// the controller looks at it at once (completion, its group event, its Job's slot) instead
/// of with the next coalesced wake-up. A space: names of Kubernetes objects have none.
pub const ALL_STORED: &str = " all-stored";
/// Deliveries became due (planned or replayed); no payload.
pub const DISPATCH_CHANNEL: &str = "kinsight_dispatch";
/// An order was handed to a waiting carrier; the payload is `namespace/job` of the
/// carrier's Job, whose long poll at the API answers at once.
pub const CARRIERS_CHANNEL: &str = "kinsight_carriers";

/// The [`CARRIERS_CHANNEL`] payload naming the carrier Job `job` of `namespace`.
pub fn carrier_key(namespace: &str, job: &str) -> String {
    format!("{namespace}/{job}")
}

/// What a listener is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreNotice {
    /// (Re)connected: anything may have happened while not listening.
    Connected,
    /// A notification on one of the channels.
    Notification { channel: String, payload: String },
}

/// Listens on `channels` for as long as the stream is polled, reconnecting with a growing
/// pause (up to 5 s) while the database is unreachable.
pub fn listen(url: String, channels: &[&str]) -> impl Stream<Item = StoreNotice> + Send + 'static {
    let statement: String = channels
        .iter()
        .map(|c| format!("LISTEN \"{}\";", c.replace('"', "")))
        .collect();
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        let mut pause = Duration::from_millis(100);
        while !tx.is_closed() {
            match listen_once(&url, &statement, &tx).await {
                Ok(()) => pause = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, "database notifications interrupted; reconnecting")
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    });
    tokio_stream_from(rx)
}

async fn listen_once(
    url: &str,
    statement: &str,
    tx: &mpsc::Sender<StoreNotice>,
) -> Result<(), super::StoreError> {
    let super::connection::Connection { config, tls } = super::connection::parse(url)?;
    let (client, mut connection) = config.connect(tls).await?;
    let (messages_tx, mut messages) = mpsc::unbounded_channel();
    // The connection yields notifications only while it is polled.
    let driver = tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = stream.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    let notice = StoreNotice::Notification {
                        channel: n.channel().to_owned(),
                        payload: n.payload().to_owned(),
                    };
                    if messages_tx.send(Ok(notice)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = messages_tx.send(Err(e));
                    return;
                }
            }
        }
    });
    let result = async {
        client.batch_execute(statement).await?;
        if tx.send(StoreNotice::Connected).await.is_err() {
            return Ok(());
        }
        // Until the connection ends, or the stream is dropped (its owner stopped): then
        // the connection is closed at once rather than left to be cut by the server.
        loop {
            tokio::select! {
                message = messages.recv() => match message {
                    Some(message) => {
                        if tx.send(message?).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                },
                () = tx.closed() => break,
            }
        }
        Ok(())
    }
    .await;
    driver.abort();
    result
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
