//! Taking connections off a listening socket: the one `accept` every server of the process uses
//! (the proxy and admin ports, the dev issuer, the demo API), so each steps back the same way
//! when the process runs out of file descriptors instead of spinning.

use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// Pause after an accept error that is not about one connection (EMFILE or ENFILE: the
/// descriptor table is full). Retrying at once would spin a core on the same error; 100 ms lets
/// connections close and free descriptors, costs about ten failed calls a second while the
/// table stays full, and delays a new connection by at most that once one is free (hyper's and
/// tokio's examples pause the same way).
pub(crate) const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The next connection on `listener`. An error about one connection (reset before it was taken)
/// is skipped at once; any other is logged with `server` (which listener) and retried after
/// [`ACCEPT_ERROR_PAUSE`]. It never fails: stop it by dropping it (it is cancel-safe, so it can
/// race a shutdown in `select!`).
pub(crate) async fn accept(listener: &TcpListener, server: &'static str) -> TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => return stream,
            Err(e) if is_per_connection(&e) => {}
            Err(e) => {
                tracing::warn!(server, error = %e, "accept failed; pausing");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

/// Accept errors that concern one connection only (it was reset before we took it).
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_about_one_connection_are_retried_at_once() {
        use std::io::{Error, ErrorKind};
        assert!(is_per_connection(&Error::from(ErrorKind::ConnectionReset)));
        assert!(is_per_connection(&Error::from(
            ErrorKind::ConnectionAborted
        )));
        // EMFILE ("Too many open files"): the case that must pause.
        assert!(!is_per_connection(&Error::from_raw_os_error(24)));
    }

    #[tokio::test]
    async fn accept_returns_the_next_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move { TcpStream::connect(addr).await.unwrap() });
        let stream = accept(&listener, "test").await;
        let client = client.await.unwrap();
        assert_eq!(stream.peer_addr().unwrap(), client.local_addr().unwrap());
    }
}
