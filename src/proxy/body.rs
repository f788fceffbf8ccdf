//! The one body type the proxy sends, in both directions: bytes it already holds (an error
//! answer, a request kept for replay, the start of a response it had to look at), followed by
//! whatever is still streaming from the other side.
//!
//! Streaming frames are passed on as they arrive, so memory stays constant whatever the body's
//! size; an error from the streaming side is passed on too, which makes hyper abort the
//! connection (or the chunked stream) instead of ending the message as if it were complete.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// Held bytes, then a stream.
#[derive(Debug, Default)]
pub(crate) struct ProxyBody {
    /// Sent first; `None` once sent (or if there is none).
    head: Option<Bytes>,
    /// Sent after `head`, frame by frame.
    tail: Option<Incoming>,
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
            tail: None,
        }
    }

    /// A streaming body.
    pub(crate) fn stream(body: Incoming) -> Self {
        Self {
            head: None,
            tail: Some(body),
        }
    }

    /// Bytes already read from `rest`, then the rest of it.
    pub(crate) fn prefixed(head: Bytes, rest: Incoming) -> Self {
        Self {
            head: Some(head),
            tail: Some(rest),
        }
    }

    fn head_len(&self) -> u64 {
        self.head.as_ref().map_or(0, |b| b.len() as u64)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(head) = this.head.take()
            && !head.is_empty()
        {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        match &mut this.tail {
            Some(tail) => Pin::new(tail).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head_len() == 0 && self.tail.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let head = self.head_len();
        let Some(tail) = &self.tail else {
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
