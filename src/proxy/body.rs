//! The one body type the proxy sends, in both directions: bytes it already holds (an error
//! answer, a request kept for replay, the start of a response it had to look at), followed by
//! whatever is still streaming from the other side.
//!
//! Streaming frames are passed on as they arrive, so memory stays constant whatever the body's
//! size; an error from the streaming side is passed on too, which makes hyper abort the
//! connection (or the chunked stream) instead of ending the message as if it were complete.
//!
//! An upstream's response body is timed per read: when no frame arrives for `idle_timeout`
//! the body fails with [`BodyError::Stalled`] (counted as `body_timeout`), so a stalled upstream
//! cannot hold the client's slot and the upstream connection forever. A download that keeps
//! moving is never cut. Errors say which side failed, so the request path can tell a client's
//! malformed request body (400) from an upstream failure (502).

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::metrics::{RouteMetrics, UpstreamErrorKind};

/// Why a streaming body failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    /// The client's request body could not be read (malformed chunked framing, cut short).
    #[error("the client's request body failed: {0}")]
    Client(#[source] hyper::Error),
    /// The upstream's response body broke off.
    #[error("the upstream's response body failed: {0}")]
    Upstream(#[source] hyper::Error),
    /// The upstream's response body did not move for `idle_timeout`.
    #[error("the upstream's response body stalled for longer than idle_timeout")]
    Stalled,
}

/// The per-read timer of an upstream's response body.
struct Stall {
    /// How long a read may wait.
    timeout: Duration,
    /// Created at the first read that has to wait, and reused.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether `timer` runs for the current wait (cleared by every frame).
    armed: bool,
    /// Where a stall is counted.
    metrics: RouteMetrics,
}

impl std::fmt::Debug for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stall")
            .field("timeout", &self.timeout)
            .field("armed", &self.armed)
            .finish_non_exhaustive()
    }
}

/// Which side the streaming part comes from.
#[derive(Debug, Default)]
enum Tail {
    /// Nothing streams.
    #[default]
    None,
    /// The client's request body.
    Request(Incoming),
    /// An upstream's response body, timed.
    Response(Incoming, Box<Stall>),
}

/// Held bytes, then a stream.
#[derive(Debug, Default)]
pub(crate) struct ProxyBody {
    /// Sent first; `None` once sent (or if there is none).
    head: Option<Bytes>,
    /// Sent after `head`, frame by frame.
    tail: Tail,
}

impl ProxyBody {
    /// No body.
    pub(crate) fn empty() -> Self {
        Self::default()
    }

    /// A body held entirely in memory.
    pub(crate) fn full(bytes: Bytes) -> Self {
        Self {
            head: Some(bytes),
            tail: Tail::None,
        }
    }

    /// The client's request body, streaming to the upstream.
    pub(crate) fn request(body: Incoming) -> Self {
        Self {
            head: None,
            tail: Tail::Request(body),
        }
    }

    /// An upstream's response body, streaming to the client; each read may wait at most
    /// `timeout`, a stall is counted in `metrics`.
    pub(crate) fn response(body: Incoming, timeout: Duration, metrics: &RouteMetrics) -> Self {
        Self::prefixed(Bytes::new(), body, timeout, metrics)
    }

    /// Bytes already read from an upstream's response body `rest`, then the rest of it (timed
    /// as [`ProxyBody::response`]).
    pub(crate) fn prefixed(
        head: Bytes,
        rest: Incoming,
        timeout: Duration,
        metrics: &RouteMetrics,
    ) -> Self {
        Self {
            head: Some(head),
            tail: Tail::Response(
                rest,
                Box::new(Stall {
                    timeout,
                    timer: None,
                    armed: false,
                    metrics: metrics.clone(),
                }),
            ),
        }
    }

    fn head_len(&self) -> u64 {
        self.head.as_ref().map_or(0, |b| b.len() as u64)
    }

    fn incoming(&self) -> Option<&Incoming> {
        match &self.tail {
            Tail::None => None,
            Tail::Request(b) | Tail::Response(b, _) => Some(b),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Some(head) = this.head.take()
            && !head.is_empty()
        {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        match &mut this.tail {
            Tail::None => Poll::Ready(None),
            Tail::Request(body) => Pin::new(body).poll_frame(cx).map_err(BodyError::Client),
            Tail::Response(body, stall) => match Pin::new(body).poll_frame(cx) {
                Poll::Ready(frame) => {
                    stall.armed = false;
                    Poll::Ready(frame.map(|f| f.map_err(BodyError::Upstream)))
                }
                Poll::Pending => {
                    let deadline = Instant::now() + stall.timeout;
                    let timer = match &mut stall.timer {
                        Some(t) => {
                            if !stall.armed {
                                t.as_mut().reset(deadline);
                            }
                            t
                        }
                        None => stall
                            .timer
                            .insert(Box::pin(tokio::time::sleep_until(deadline))),
                    };
                    stall.armed = true;
                    ready!(timer.as_mut().poll(cx));
                    stall.armed = false;
                    stall.metrics.upstream_error(UpstreamErrorKind::BodyTimeout);
                    tracing::warn!(
                        route = stall.metrics.name(),
                        "upstream response body stalled for idle_timeout; cutting the answer"
                    );
                    Poll::Ready(Some(Err(BodyError::Stalled)))
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head_len() == 0 && self.incoming().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let head = self.head_len();
        let Some(tail) = self.incoming() else {
            return SizeHint::with_exact(head);
        };
        let inner = tail.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(head));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(head));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn full_and_empty_bodies_are_exact() {
        let b = ProxyBody::full(Bytes::from_static(b"hello"));
        assert_eq!(b.size_hint().exact(), Some(5));
        assert!(!b.is_end_stream());
        assert_eq!(b.collect().await.unwrap().to_bytes(), "hello");

        let e = ProxyBody::empty();
        assert_eq!(e.size_hint().exact(), Some(0));
        assert!(e.is_end_stream());
        assert!(ProxyBody::full(Bytes::new()).is_end_stream());
    }
}
