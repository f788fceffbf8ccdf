//! Shutdown: the signals that ask for it, the phases a stopping process goes through, and the
//! handle every task watches.
//!
//! SIGTERM starts [`Phase::Draining`]: readiness turns false but the proxy keeps accepting, so
//! that Kubernetes has time to take the pod out of its endpoints. After `drain_delay` comes
//! [`Phase::Stopping`]: the listener closes and in-flight requests get `shutdown_grace` to
//! finish. A second SIGTERM or SIGINT skips straight to [`Phase::Terminated`].

use tokio::sync::{mpsc, watch};

/// A stop request delivered to [`crate::Server::run`] (from SIGTERM/SIGINT in the binary, from a
/// channel in tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: drain, then stop gracefully. A second one stops at once.
    Terminate,
    /// SIGINT (Ctrl-C): the same as SIGTERM.
    Interrupt,
    /// SIGHUP: reload the configuration file (not a stop; ignored once shutting down).
    Hangup,
}

impl Signal {
    /// Whether this signal asks the process to stop.
    pub fn stops(self) -> bool {
        self != Self::Hangup
    }
}

/// SIGTERM, SIGINT and SIGHUP, delivered as [`Signal`]s. Must be called inside a tokio runtime; the
/// handlers stay installed for the life of the process.
pub fn os_signals() -> std::io::Result<mpsc::Receiver<Signal>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Installed before anything is served: SIGHUP's default action ends the process.
    let mut hup = signal(SignalKind::hangup())?;
    // A few queued signals are plenty: only the first two stops change anything, and a
    // SIGHUP sent while the queue is full is one reload among several already queued.
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let s = tokio::select! {
                Some(()) = term.recv() => Signal::Terminate,
                Some(()) = int.recv() => Signal::Interrupt,
                Some(()) = hup.recv() => Signal::Hangup,
                else => return,
            };
            if tx.send(s).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// Where the process is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Serving normally.
    Running,
    /// Not ready; still accepting.
    Draining,
    /// No longer accepting; finishing in-flight requests.
    Stopping,
    /// Everything must stop now.
    Terminated,
}

/// Sets the phase. Owned by whoever handles signals.
#[derive(Debug)]
pub struct ShutdownController {
    tx: watch::Sender<Phase>,
}

/// Watches the phase. Cheap to clone; one per task.
#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<Phase>,
}

impl ShutdownController {
    /// A controller in [`Phase::Running`] and its first watcher.
    pub fn new() -> (Self, Shutdown) {
        let (tx, rx) = watch::channel(Phase::Running);
        (Self { tx }, Shutdown { rx })
    }

    /// Moves to `phase`; phases only move forward.
    pub fn advance(&self, phase: Phase) {
        self.tx.send_if_modified(|p| {
            if phase > *p {
                *p = phase;
                true
            } else {
                false
            }
        });
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.tx.borrow()
    }

    /// Another watcher.
    pub fn watcher(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
        }
    }
}

impl Shutdown {
    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.rx.borrow()
    }

    /// Resolves once the phase is at least `phase` (or the controller is gone).
    pub async fn reached(&self, phase: Phase) {
        let mut rx = self.rx.clone();
        // An error means the controller was dropped: treat that as the end of everything.
        let _ = rx.wait_for(|p| *p >= phase).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn phases_only_move_forward_and_wake_watchers() {
        let (ctl, sd) = ShutdownController::new();
        let w = sd.clone();
        let waiter = tokio::spawn(async move { w.reached(Phase::Stopping).await });
        ctl.advance(Phase::Draining);
        assert_eq!(sd.phase(), Phase::Draining);
        ctl.advance(Phase::Stopping);
        ctl.advance(Phase::Running);
        assert_eq!(ctl.phase(), Phase::Stopping);
        waiter.await.unwrap();
    }

    #[tokio::test]
    async fn dropped_controller_releases_waiters() {
        let (ctl, sd) = ShutdownController::new();
        drop(ctl);
        sd.reached(Phase::Terminated).await;
    }
}
