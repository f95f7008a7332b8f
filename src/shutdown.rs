//! Stopping on request: SIGTERM (what the kubelet sends a pod being deleted or rolled) or
//! Ctrl-C. Long-running loops hold a [`Shutdown`] and, once it fires, finish what they have
//! in hand and return, so a rolling upgrade neither cuts requests off nor leaves webhooks
//! half sent.

use std::future::Future;

use tokio::sync::watch;

/// A process-wide "stop now" flag that many tasks can wait on.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

/// The side that sets the flag.
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

impl Shutdown {
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger(tx), Shutdown(rx))
    }

    /// One that never fires (tests, and callers that stop by dropping the task).
    pub fn never() -> Shutdown {
        let (tx, rx) = watch::channel(false);
        // A closed channel with `false` in it: `requested` then waits for ever.
        drop(tx);
        Shutdown(rx)
    }

    /// Fires on SIGTERM or Ctrl-C, whichever comes first; logs which.
    pub fn on_signals() -> Shutdown {
        let (trigger, shutdown) = Shutdown::new();
        tokio::spawn(async move {
            signal().await;
            trigger.fire();
        });
        shutdown
    }

    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Returns once a stop is requested; never when it cannot be any more.
    pub async fn requested(mut self) {
        if self.0.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl ShutdownTrigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

/// SIGTERM or Ctrl-C (where SIGTERM cannot be listened to, Ctrl-C alone).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: stopping"),
            }
            return;
        }
    }
    if tokio::signal::ctrl_c().await.is_ok() {
        tracing::info!("interrupted: stopping");
    }
}

/// Runs `work` until it returns or a stop has been requested and `grace` has passed since:
/// what is still running then is dropped. Returns whether `work` finished on its own.
pub async fn within_grace<F: Future<Output = ()>>(
    work: F,
    shutdown: Shutdown,
    grace: std::time::Duration,
) -> bool {
    tokio::select! {
        () = work => true,
        () = async { shutdown.requested().await; tokio::time::sleep(grace).await } => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn every_holder_sees_the_stop_and_never_fires_by_itself() {
        let (trigger, shutdown) = Shutdown::new();
        let waiting = tokio::spawn(shutdown.clone().requested());
        assert!(!shutdown.is_requested());
        trigger.fire();
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("a holder returns once the stop is requested")
            .expect("no panic");
        assert!(shutdown.is_requested());
        // Dropping the trigger of a never-fired flag does not count as a stop.
        let never = Shutdown::never();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), never.requested())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn work_gets_its_grace_after_the_stop_and_no_more() {
        let (trigger, shutdown) = Shutdown::new();
        trigger.fire();
        let quick = within_grace(
            tokio::time::sleep(Duration::from_millis(10)),
            shutdown.clone(),
            Duration::from_secs(5),
        );
        assert!(quick.await, "work shorter than the grace finishes");
        let slow = within_grace(
            tokio::time::sleep(Duration::from_secs(60)),
            shutdown,
            Duration::from_millis(200),
        );
        assert!(!slow.await, "work longer than the grace is cut off");
    }
}
