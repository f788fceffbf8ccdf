//! One request on the fast path, from its parsed head to the end of its answer: the decision
//! (fast path or hyper), the token, the upstream exchange on a connection this task holds for
//! the exchange, the replay after a rejected token, and the relay of the answer.
//!
//! Every guarantee of the hyper path holds here, by the same rules and mostly the same code:
//! routing is `Inner::target_of`, the answers are the same `ProxyError`s, the replay rules are
//! those of `forward.rs` (an idempotent request is sent once more on a new connection when an
//! idle one turns out to be closed; a replay status makes the token be invalidated and the
//! request replayed once with a newer one, unless the answer is Flinks' consent error). A
//! request is sent only with a valid token, and only to its route's origin over a connection of
//! its route's pool.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use http::uri::Scheme;
use http::{Method, Uri};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::Connection;
use super::pool::{Connected, H1Conn, PoolKey};
use super::relay::{Body, READ_CHUNK, RelayError, pump};
use super::request::{Ineligible, Outgoing, RequestHead, slots, write_upstream_head};
use super::response::write_client_head;
use super::response::{MAX_RESPONSE_HEAD, ResponseError, ResponseFraming, ResponseHead};
use crate::metrics::{Handoff, ReplayResult, RouteMetrics, UpstreamErrorKind};
use crate::proxy::Inner;
use crate::proxy::error::{ErrorCode, ProxyError};
use crate::proxy::forward::{
    BAD_RESPONSE, BODY_STALLED, BODY_UNREADABLE, CONSENT_PROBE_LIMIT, Holder, NO_TOKEN,
    count_subject_refusal, has_dot_segment, is_consent_revoked, is_idempotent, rebase,
    subject_refusal, upstream_error,
};
use crate::proxy::route::{Route, RouteToken};
use crate::proxy::service::log_access;
use crate::proxy::target::Target;
use crate::proxy::upstream::{ConnectError, ConnectFailure};
use crate::subject::SubjectId;
use crate::subject::tokens::SubjectTokens;
use crate::token::client::TokenClient;
use crate::token::{AccessToken, TokenCell};

/// What the connection does after a request.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// Serve the next request.
    Continue,
    /// Close (our side shuts down cleanly).
    Close,
    /// Drop the socket at once: the client stopped reading.
    Drop,
    /// Reset the connection: an answer was cut short and must not look complete.
    Cut,
    /// Hand the connection to hyper; the head at the read position was not consumed.
    Handoff(Handoff),
}

/// The buffers one connection's exchanges reuse.
#[derive(Default)]
pub(super) struct Scratch {
    /// The upstream request: head, then body.
    request: Vec<u8>,
    /// Bytes read from the upstream.
    response: Vec<u8>,
    /// Bytes for the client.
    client: Vec<u8>,
    /// The upstream path and query.
    path: Vec<u8>,
}

impl Scratch {
    /// Takes spare buffers for the ones given back (see `spare.rs`).
    pub(super) fn take(&mut self) {
        for buf in [
            &mut self.request,
            &mut self.response,
            &mut self.client,
            &mut self.path,
        ] {
            if buf.capacity() == 0 {
                *buf = super::spare::take();
            }
        }
    }

    /// Gives every buffer back, while the connection waits for its next request.
    pub(super) fn give(&mut self) {
        for buf in [
            &mut self.request,
            &mut self.response,
            &mut self.client,
            &mut self.path,
        ] {
            super::spare::give(std::mem::take(buf));
        }
    }
}

/// The request's details kept for the access log (only with `log.access`).
struct Access {
    method: Method,
    host: String,
    path: String,
}

/// A request the fast path serves.
struct Plan<'i> {
    route: &'i Route,
    holder: Holder<'i>,
    /// The token written into the request.
    token: Arc<AccessToken>,
    key: PoolKey,
    /// Head length, then head plus body length, in the client buffer.
    head_len: usize,
    consumed: usize,
    /// The client asked to close after this exchange.
    close: bool,
    head_request: bool,
    /// Idempotent (its body, if any, is in `Scratch::request` anyway).
    replayable: bool,
    /// Where the `Authorization` value sits in `Scratch::request`.
    auth: Range<usize>,
    access: Option<Access>,
}

/// What to do with a parsed head.
enum Decision<'i> {
    Fast(Box<Plan<'i>>),
    /// The token is not at hand: wait for it, then decide again (with it, or answer).
    Wait(Pending<'i>, Wait<'i>),
    /// Answered by the proxy (a subject whose token cannot be had); already counted.
    Refuse(Pending<'i>, ProxyError),
    Hyper(Handoff),
}

/// A request the fast path answers without a token, for now.
struct Pending<'i> {
    route: &'i Route,
    consumed: usize,
    close: bool,
    access: Option<Access>,
}

/// What a request waits for.
enum Wait<'i> {
    Named(&'i TokenCell),
    Subject(&'i Arc<SubjectTokens<TokenClient>>, SubjectId),
}

/// The upstream's answer head, kept past the borrow of the read buffer.
struct Meta {
    status: u16,
    /// Head length in `Scratch::response`.
    len: usize,
    framing: ResponseFraming,
    /// The upstream will not take another request on this connection.
    close: bool,
    /// `ob-correlation-id` and `ob-trace-id`, for the access log.
    ids: Option<(Option<String>, Option<String>)>,
}

/// Why an exchange failed before the answer's head.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error(transparent)]
    Connect(ConnectError),
    /// Closed (FIN or reset) before any byte of an answer: a stale idle connection.
    #[error("the upstream closed the connection without answering")]
    Closed,
    #[error("the connection broke while the answer's head was read: {0}")]
    Io(std::io::Error),
    #[error("the upstream's answer head was refused: {0}")]
    Response(ResponseError),
    #[error("the upstream answered 101 to a request that asked for no upgrade")]
    Upgrade,
    #[error("the upstream chose HTTP/2 for a retry")]
    Http2,
    #[error("no answer head within response_timeout")]
    Timeout,
    /// The client's streamed body broke off or stalled.
    #[error("the client's request body could not be read")]
    ClientBody,
}

/// Serves the request whose head starts at the connection's read position, or says it is
/// hyper's.
pub(super) async fn serve_one<C>(
    inner: &Inner,
    io: &mut C,
    conn: &mut Connection,
    stopping: bool,
) -> Next
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    conn.scratch.take();
    let decision = loop {
        match judge(inner, &conn.buf[conn.start..], &mut conn.scratch) {
            Err(why) => return Next::Handoff(handoff(why)),
            Ok(Some(decision)) => break decision,
            Ok(None) => {
                if !conn.fill(io).await {
                    return Next::Close;
                }
            }
        }
    };
    let plan = match decision {
        Decision::Hyper(why) => return Next::Handoff(why),
        Decision::Fast(plan) => plan,
        Decision::Wait(pending, wait) => {
            let refusal = match wait {
                Wait::Named(cell) => match cell.wait_valid(inner.token_wait).await {
                    // The head is decided again, now with the token.
                    Some(_) => return Next::Continue,
                    None => NO_TOKEN,
                },
                Wait::Subject(entry, subject) => match entry.get(&subject).await {
                    Ok(_) => return Next::Continue,
                    Err(e) => count_subject_refusal(entry, Some(&subject), subject_refusal(&e)),
                },
            };
            return pending
                .refuse(inner, io, conn, start, stopping, refusal)
                .await;
        }
        Decision::Refuse(pending, refusal) => {
            return pending
                .refuse(inner, io, conn, start, stopping, refusal)
                .await;
        }
    };
    // An idempotent request's body is read whole first (it may be sent twice, as on the
    // hyper path); another's is streamed: what has arrived goes with the head, the rest as it
    // comes.
    let body_len = plan.consumed - plan.head_len;
    let take = if plan.replayable {
        if !conn.fill_to(io, plan.consumed).await {
            return Next::Close;
        }
        body_len
    } else {
        body_len.min(conn.buf.len() - conn.start - plan.head_len)
    };
    let body = conn.start + plan.head_len..conn.start + plan.head_len + take;
    conn.scratch.request.extend_from_slice(&conn.buf[body]);
    let upload = (body_len - take) as u64;
    let mut answer = Answer {
        route: plan.route,
        start,
        access: plan.access.as_ref(),
        // A body still to come is not read past: the connection closes after the answer.
        close: plan.close || stopping || upload > 0,
    };
    let pool = inner.upstreams.h1();
    let deadline = Instant::now() + inner.response_timeout;
    let mut upstream = match tokio::time::timeout_at(deadline, pool.get(&plan.key)).await {
        Ok(Ok(Connected::Http1(c))) => c,
        // Hyper's clients negotiate HTTP/2 with this origin: the request is theirs.
        Ok(Ok(Connected::Http2)) => return Next::Handoff(Handoff::Http2),
        Ok(Err(e)) => {
            conn.start += plan.head_len + take;
            return answer
                .failed(inner, io, &mut conn.scratch, SendError::Connect(e))
                .await;
        }
        Err(_) => {
            conn.start += plan.head_len + take;
            return answer
                .failed(inner, io, &mut conn.scratch, SendError::Timeout)
                .await;
        }
    };
    // From here on the request is the fast path's.
    conn.start += plan.head_len + take;
    let Connection {
        buf,
        start: read_at,
        scratch,
    } = conn;
    let upload = (upload > 0).then_some(Upload {
        io: &mut *io,
        buf,
        start: read_at,
        remaining: upload,
    });
    let mut sent = send(
        &mut upstream,
        scratch,
        &plan,
        answer.close,
        deadline,
        upload,
    )
    .await;
    // The body was read to its end: the connection can carry the next request.
    if !matches!(sent, Err(SendError::ClientBody)) {
        answer.close = plan.close || stopping;
    }
    // An idle connection the upstream had closed (its keep-alive timeout raced this request):
    // nothing was answered and the request is idempotent, so it goes once more on a new
    // connection, with the current token.
    if matches!(sent, Err(SendError::Closed))
        && upstream.reused()
        && plan.replayable
        && let Some(current) = plan.holder.current(&plan.token)
    {
        tracing::info!(
            route = %plan.route.label,
            "upstream closed the connection without answering; retrying once"
        );
        let mut auth = plan.auth.clone();
        swap_token(&mut scratch.request, &mut auth, &current);
        let deadline = Instant::now() + inner.response_timeout;
        sent = match reconnect(pool, &plan.key, deadline).await {
            Ok(c) => {
                upstream = c;
                send(
                    &mut upstream,
                    scratch,
                    &plan,
                    answer.close,
                    deadline,
                    None::<Upload<'_, C>>,
                )
                .await
            }
            Err(e) => Err(e),
        };
    }
    let meta = match sent {
        Ok(meta) => meta,
        Err(e) => return answer.failed(inner, io, scratch, e).await,
    };
    if plan.route.is_replay_status(meta.status) {
        // Boxed: rare, and large (it sends twice); the connection task stays small.
        return Box::pin(after_rejection(
            inner, io, scratch, &plan, &answer, upstream, meta,
        ))
        .await;
    }
    answer.relay(inner, io, scratch, upstream, &meta).await
}

/// The metric label of a head the parser leaves to hyper.
fn handoff(why: Ineligible) -> Handoff {
    match why {
        Ineligible::Version => Handoff::Version,
        Ineligible::Method => Handoff::Method,
        Ineligible::Expect => Handoff::Expect,
        Ineligible::TransferEncoding => Handoff::TransferEncoding,
        Ineligible::LargeBody => Handoff::LargeBody,
        Ineligible::Underscore => Handoff::Underscore,
        Ineligible::Loop => Handoff::Loop,
        Ineligible::Unusual => Handoff::Unusual,
    }
}

/// Parses the head at the start of `buf` and decides how it is served; `Ok(None)` while it
/// is incomplete. Not `async`: the head's slots live on this stack frame only, never in the
/// connection's future.
fn judge<'i>(
    inner: &'i Inner,
    buf: &[u8],
    scratch: &mut Scratch,
) -> Result<Option<Decision<'i>>, Ineligible> {
    let mut slots = slots();
    let parsed = RequestHead::parse(
        buf,
        &mut slots,
        inner.pseudonym.as_bytes(),
        inner.replay_body_limit as u64,
    )?;
    Ok(parsed.map(|head| decide(inner, &head, scratch)))
}

/// Decides how `head` is served and, for the fast path, writes the upstream request head.
fn decide<'i>(inner: &'i Inner, head: &RequestHead<'_>, scratch: &mut Scratch) -> Decision<'i> {
    let Ok(uri) = Uri::try_from(head.target) else {
        return Decision::Hyper(Handoff::Route);
    };
    let Ok(Target::Routed {
        route,
        origin,
        strip,
    }) = inner.target_of(&uri, head.host)
    else {
        return Decision::Hyper(Handoff::Route);
    };
    if origin.base_path.is_some() && has_dot_segment(uri.path().get(strip..).unwrap_or("")) {
        return Decision::Hyper(Handoff::Route);
    }
    // The head's parser refuses bodies longer than `replay_body_limit`.
    #[allow(clippy::cast_possible_truncation)]
    let consumed = head.len + head.content_length as usize;
    let access = inner.access_log.then(|| Access {
        method: head.method.clone(),
        host: uri.host().or(head.host).unwrap_or("").to_owned(),
        path: uri.path().to_owned(),
    });
    let pending = |access| Pending {
        route,
        consumed,
        close: head.close,
        access,
    };
    let (holder, token) = match &route.token {
        RouteToken::Named(cell) => match cell.current() {
            Some(t) => (Holder::Named(cell), t),
            None => return Decision::Wait(pending(access), Wait::Named(cell)),
        },
        RouteToken::PerSubject(entry) => {
            // Anything but one valid subject header is hyper's to refuse.
            let Some(subject) = one_subject(inner, head) else {
                return Decision::Hyper(Handoff::Route);
            };
            // A cached token is there at the first poll; a refresh is waited for outside.
            match entry.get(&subject).now_or_never() {
                Some(Ok(t)) => (Holder::Subject(entry, subject), t),
                Some(Err(e)) => {
                    let e = count_subject_refusal(entry, Some(&subject), subject_refusal(&e));
                    return Decision::Refuse(pending(access), e);
                }
                None => return Decision::Wait(pending(access), Wait::Subject(entry, subject)),
            }
        }
    };
    scratch.path.clear();
    let pq = uri.path_and_query();
    rebase(
        &mut scratch.path,
        origin.base_path.as_deref(),
        pq.map_or("/", |pq| pq.path()),
        pq.and_then(|pq| pq.query()),
        strip,
    );
    scratch.request.clear();
    let auth = write_upstream_head(
        &mut scratch.request,
        head,
        &Outgoing {
            path_and_query: &scratch.path,
            host: origin.host.as_bytes(),
            via: inner.via.as_bytes(),
            statics: &route.headers,
            remove: inner.subject_header.as_ref(),
            authorization: token.header().as_bytes(),
        },
    );
    Decision::Fast(Box::new(Plan {
        route,
        holder,
        key: PoolKey {
            pool: route.pool,
            tls: origin.scheme == Scheme::HTTPS,
            authority: origin.authority,
        },
        token,
        head_len: head.len,
        consumed,
        close: head.close,
        head_request: head.method == Method::HEAD,
        replayable: is_idempotent(&head.method),
        auth,
        access,
    }))
}

/// The subject a request names in its one subject header, if it is a valid id.
fn one_subject(inner: &Inner, head: &RequestHead<'_>) -> Option<SubjectId> {
    let name = inner.subject_header.as_ref()?;
    let mut values = head.values(name.as_str());
    let (Some(value), None) = (values.next(), values.next()) else {
        return None;
    };
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| SubjectId::parse(v).ok())
}

impl Pending<'_> {
    /// Reads past the request's body and sends `refusal`.
    async fn refuse<C>(
        self,
        inner: &Inner,
        io: &mut C,
        conn: &mut Connection,
        start: Instant,
        stopping: bool,
        refusal: ProxyError,
    ) -> Next
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        if !conn.fill_to(io, self.consumed).await {
            return Next::Close;
        }
        conn.start += self.consumed;
        let answer = Answer {
            route: self.route,
            start,
            access: self.access.as_ref(),
            close: self.close || stopping,
        };
        answer.refuse(inner, io, &mut conn.scratch, refusal).await
    }
}

/// A new connection for a second send (never an idle one).
async fn reconnect(
    pool: &super::H1Pool,
    key: &PoolKey,
    deadline: Instant,
) -> Result<H1Conn, SendError> {
    match tokio::time::timeout_at(deadline, pool.connect(key)).await {
        Ok(Ok(Connected::Http1(c))) => Ok(c),
        Ok(Ok(Connected::Http2)) => Err(SendError::Http2),
        Ok(Err(e)) => Err(SendError::Connect(e)),
        Err(_) => Err(SendError::Timeout),
    }
}

/// Replaces the `Authorization` value at `auth` in `request` with `token`'s.
fn swap_token(request: &mut Vec<u8>, auth: &mut Range<usize>, token: &AccessToken) {
    let value = token.header().as_bytes();
    request.splice(auth.clone(), value.iter().copied());
    auth.end = auth.start + value.len();
}

/// The rest of a streamed request body, read from the client as it is sent.
struct Upload<'a, C> {
    io: &'a mut C,
    /// The connection's read buffer and position.
    buf: &'a mut Vec<u8>,
    start: &'a mut usize,
    remaining: u64,
}

impl<C: AsyncRead + Unpin> Upload<'_, C> {
    /// Copies the rest of the body from the client to `upstream`.
    async fn copy(self, upstream: &mut H1Conn) -> Result<(), SendError> {
        let mut remaining = self.remaining;
        while remaining > 0 {
            if *self.start == self.buf.len() {
                self.buf.clear();
                *self.start = 0;
                self.buf.reserve(super::READ_BUFFER);
                // The wire guard times the wait (idle_timeout) and ends a broken body.
                match self.io.read_buf(self.buf).await {
                    Ok(n) if n > 0 => {}
                    _ => return Err(SendError::ClientBody),
                }
            }
            let available = self.buf.len() - *self.start;
            let n = usize::try_from(remaining).map_or(available, |r| r.min(available));
            let chunk = &self.buf[*self.start..*self.start + n];
            upstream.write_all(chunk).await.map_err(closed_or)?;
            *self.start += n;
            remaining -= n as u64;
        }
        Ok(())
    }
}

/// Writes the request (and `upload`, the rest of its body) and reads the answer's head
/// (skipping interim 1xx answers) by `deadline`; the client's head is left in
/// `Scratch::client`.
async fn send<C: AsyncRead + Unpin>(
    upstream: &mut H1Conn,
    scratch: &mut Scratch,
    plan: &Plan<'_>,
    close_client: bool,
    deadline: Instant,
    upload: Option<Upload<'_, C>>,
) -> Result<Meta, SendError> {
    let exchange = async {
        if let Err(e) = upstream.write_all(&scratch.request).await {
            return Err(closed_or(e));
        }
        if let Some(upload) = upload {
            upload.copy(upstream).await?;
        }
        scratch.response.clear();
        loop {
            if let Some(meta) = answer_head(scratch, plan, close_client)? {
                return Ok(meta);
            }
            if scratch.response.len() >= MAX_RESPONSE_HEAD {
                return Err(SendError::Response(ResponseError::TooLarge));
            }
            scratch.response.reserve(READ_CHUNK);
            match upstream.read_buf(&mut scratch.response).await {
                Ok(0) if scratch.response.is_empty() => return Err(SendError::Closed),
                Ok(0) => {
                    return Err(SendError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(_) => {}
                Err(e) if scratch.response.is_empty() => return Err(closed_or(e)),
                Err(e) => return Err(SendError::Io(e)),
            }
        }
    };
    tokio::time::timeout_at(deadline, exchange)
        .await
        .unwrap_or(Err(SendError::Timeout))
}

/// Parses the answer head at the start of `Scratch::response`, dropping the interim (1xx)
/// answers before it, and writes the client's head into `Scratch::client`; `Ok(None)` while
/// it is incomplete. Not `async`: the head's slots live on this stack frame only.
fn answer_head(
    scratch: &mut Scratch,
    plan: &Plan<'_>,
    close_client: bool,
) -> Result<Option<Meta>, SendError> {
    loop {
        let mut slots = slots();
        let head = match ResponseHead::parse(&scratch.response, &mut slots, plan.head_request) {
            Err(e) => return Err(SendError::Response(e)),
            Ok(None) => return Ok(None),
            Ok(Some(head)) => head,
        };
        if head.status == 101 {
            return Err(SendError::Upgrade);
        }
        if head.status < 200 {
            let n = head.len;
            scratch.response.drain(..n);
            continue;
        }
        scratch.client.clear();
        write_client_head(&mut scratch.client, &head, close_client);
        let ids = plan.access.is_some().then(|| {
            let find = |name: &str| {
                head.headers()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
                    .and_then(|(_, v)| std::str::from_utf8(v).ok())
                    .map(str::to_owned)
            };
            (find("ob-correlation-id"), find("ob-trace-id"))
        });
        return Ok(Some(Meta {
            status: head.status,
            len: head.len,
            framing: head.framing,
            close: head.close,
            ids,
        }));
    }
}

/// A write or read error before any answer: a connection the upstream closed, or another
/// failure.
fn closed_or(e: std::io::Error) -> SendError {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    if matches!(e.kind(), ConnectionReset | BrokenPipe | ConnectionAborted) {
        SendError::Closed
    } else {
        SendError::Io(e)
    }
}

/// The upstream answered a replay status to a request sent with `plan.token`: the start of
/// its body is read (for Flinks' consent error), the token invalidated, and the request sent
/// once more with a newer token when it can be.
async fn after_rejection<C>(
    inner: &Inner,
    io: &mut C,
    scratch: &mut Scratch,
    plan: &Plan<'_>,
    answer: &Answer<'_>,
    mut upstream: H1Conn,
    meta: Meta,
) -> Next
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let route = plan.route;
    let idle = inner.wire.idle_timeout;
    let mut body = Body::new(meta.framing);
    // The decoded start of the body, for the consent check (a rare path: it may allocate).
    let mut prefix = Vec::new();
    let mut keep = |d: &[u8]| {
        let room = CONSENT_PROBE_LIMIT.saturating_sub(prefix.len());
        prefix.extend_from_slice(&d[..d.len().min(room)]);
    };
    let mut fed = body.feed(
        &scratch.response[meta.len..],
        &mut scratch.client,
        &mut keep,
    );
    let mut read = Vec::new();
    while fed.is_ok() && !body.is_done() && scratch.client.len() < CONSENT_PROBE_LIMIT {
        read.clear();
        read.reserve(READ_CHUNK);
        fed = match tokio::time::timeout(idle, upstream.read_buf(&mut read)).await {
            Err(_) => Err(RelayError::Stalled),
            Ok(Err(_)) => Err(RelayError::Upstream),
            Ok(Ok(0)) => body.eof(&mut scratch.client),
            Ok(Ok(_)) => body.feed(&read, &mut scratch.client, &mut keep),
        };
    }
    match fed {
        Ok(()) => {}
        Err(RelayError::Stalled) => {
            tracing::warn!(route = %route.label, "upstream body stalled during the probe");
            route.metrics.upstream_error(UpstreamErrorKind::BodyTimeout);
            return answer.refuse(inner, io, scratch, BODY_STALLED).await;
        }
        Err(_) => {
            tracing::warn!(route = %route.label, "upstream body failed during the probe");
            route.metrics.upstream_error(UpstreamErrorKind::Reset);
            let e = upstream_error(ErrorCode::UpstreamReset);
            return answer.refuse(inner, io, scratch, e).await;
        }
    }
    let complete = body.is_done();
    if complete && is_consent_revoked(&prefix) {
        route.metrics.replay(ReplayResult::ConsentRevoked);
        // Later requests for this subject are answered `reauth_required` without a token
        // request.
        if let Holder::Subject(entry, subject) = &plan.holder {
            entry.consent_revoked(subject, &plan.token).await;
        }
        return answer
            .deliver(inner, io, scratch, upstream, &meta, (body, 0..0))
            .await;
    }
    if !plan.replayable {
        // Ask for a new token for the next request without making this one wait.
        let _ = plan.holder.invalidate(&plan.token, Duration::ZERO).await;
        route.metrics.replay(ReplayResult::NotReplayable);
        return answer
            .deliver(inner, io, scratch, upstream, &meta, (body, 0..0))
            .await;
    }
    let Some(fresh) = plan.holder.invalidate(&plan.token, inner.token_wait).await else {
        route.metrics.replay(ReplayResult::NoNewToken);
        return answer
            .deliver(inner, io, scratch, upstream, &meta, (body, 0..0))
            .await;
    };
    let mut auth = plan.auth.clone();
    swap_token(&mut scratch.request, &mut auth, &fresh);
    let deadline = Instant::now() + inner.response_timeout;
    // The rejected exchange's connection is reused only if its answer ended cleanly.
    let none = None::<Upload<'_, C>>;
    let sent = if body.reusable() && !meta.close {
        send(&mut upstream, scratch, plan, answer.close, deadline, none).await
    } else {
        match reconnect(inner.upstreams.h1(), &plan.key, deadline).await {
            Ok(c) => {
                upstream = c;
                send(&mut upstream, scratch, plan, answer.close, deadline, none).await
            }
            Err(e) => Err(e),
        }
    };
    let meta = match sent {
        Ok(meta) => meta,
        Err(e) => return answer.failed(inner, io, scratch, e).await,
    };
    route
        .metrics
        .replay(if route.is_replay_status(meta.status) {
            ReplayResult::RejectedAgain
        } else {
            ReplayResult::Ok
        });
    answer.relay(inner, io, scratch, upstream, &meta).await
}

/// How a request is answered and accounted for.
struct Answer<'a> {
    route: &'a Route,
    start: Instant,
    access: Option<&'a Access>,
    /// The connection closes after the answer.
    close: bool,
}

impl Answer<'_> {
    fn record(&self, status: u16, ids: Option<&(Option<String>, Option<String>)>) {
        let metrics: &RouteMetrics = &self.route.metrics;
        metrics.request(status, self.start.elapsed().as_secs_f64());
        if let Some(a) = self.access {
            let (correlation, trace) =
                ids.map_or((None, None), |(c, t)| (c.as_deref(), t.as_deref()));
            log_access(
                &a.method,
                metrics.name(),
                &a.host,
                &a.path,
                status,
                self.start,
                correlation,
                trace,
            );
        }
    }

    /// Relays an answer whose head is in `Scratch::client` and whose first bytes are in
    /// `Scratch::response` after the head.
    async fn relay<C>(
        &self,
        inner: &Inner,
        io: &mut C,
        scratch: &mut Scratch,
        upstream: H1Conn,
        meta: &Meta,
    ) -> Next
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let mut body = Body::new(meta.framing);
        let first = &scratch.response[meta.len..];
        let Ok(pass) = body.take(first, &mut scratch.client, &mut |_| {}) else {
            return self.failed(inner, io, scratch, SendError::Closed).await;
        };
        let pass = meta.len..meta.len + pass;
        self.deliver(inner, io, scratch, upstream, meta, (body, pass))
            .await
    }

    /// Sends the head in `Scratch::client` (and any body bytes after it), then
    /// `Scratch::response[pass]` (body bytes passed on unchanged), then the rest of `body`
    /// from `upstream`; the connection goes back to the pool if it ended cleanly.
    async fn deliver<C>(
        &self,
        inner: &Inner,
        io: &mut C,
        scratch: &mut Scratch,
        mut upstream: H1Conn,
        meta: &Meta,
        (mut body, pass): (Body, Range<usize>),
    ) -> Next
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        self.record(meta.status, meta.ids.as_ref());
        let relayed = pump(
            &mut upstream,
            io,
            &mut body,
            &mut scratch.client,
            &mut scratch.response,
            pass,
            inner.wire.idle_timeout,
        )
        .await;
        match relayed {
            Ok(()) => {
                if body.reusable() && !meta.close {
                    inner.upstreams.h1().put(upstream);
                }
                if self.close {
                    Next::Close
                } else {
                    Next::Continue
                }
            }
            Err(RelayError::Client) => Next::Drop,
            Err(RelayError::Stalled) => {
                self.route
                    .metrics
                    .upstream_error(UpstreamErrorKind::BodyTimeout);
                Next::Cut
            }
            Err(RelayError::Upstream) => {
                self.route.metrics.upstream_error(UpstreamErrorKind::Reset);
                Next::Cut
            }
        }
    }

    /// Counts, logs and answers a failed exchange.
    async fn failed<C>(
        &self,
        inner: &Inner,
        io: &mut C,
        scratch: &mut Scratch,
        e: SendError,
    ) -> Next
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let (code, kind) = match &e {
            SendError::Connect(c) => match c.kind {
                ConnectFailure::Tcp => (ErrorCode::UpstreamUnreachable, UpstreamErrorKind::Connect),
                ConnectFailure::Timeout => {
                    (ErrorCode::UpstreamUnreachable, UpstreamErrorKind::Timeout)
                }
                ConnectFailure::Tls => (ErrorCode::UpstreamTls, UpstreamErrorKind::Tls),
            },
            SendError::Timeout => (ErrorCode::UpstreamTimeout, UpstreamErrorKind::Timeout),
            SendError::ClientBody => {
                // The app's own request body was cut short or stalled: its fault, not the
                // upstream's.
                return self.refuse(inner, io, scratch, BODY_UNREADABLE).await;
            }
            SendError::Response(ResponseError::Framing) => {
                self.route
                    .metrics
                    .upstream_error(UpstreamErrorKind::BadResponse);
                return self.refuse(inner, io, scratch, BAD_RESPONSE).await;
            }
            SendError::Closed
            | SendError::Io(_)
            | SendError::Response(_)
            | SendError::Upgrade
            | SendError::Http2 => (ErrorCode::UpstreamReset, UpstreamErrorKind::Reset),
        };
        if !matches!(e, SendError::Timeout) {
            // Errors carry no request bytes, so no token can appear here.
            tracing::warn!(route = %self.route.label, error = %e, "upstream request failed");
        }
        self.route.metrics.upstream_error(kind);
        self.refuse(inner, io, scratch, upstream_error(code)).await
    }

    /// Counts, logs and writes an answer of the proxy's own.
    async fn refuse<C>(
        &self,
        inner: &Inner,
        io: &mut C,
        scratch: &mut Scratch,
        e: ProxyError,
    ) -> Next
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        inner.count_refusal(e);
        self.record(e.code.status().as_u16(), None);
        scratch.client.clear();
        e.write_http1(&mut scratch.client, self.close);
        if io.write_all(&scratch.client).await.is_err() {
            return Next::Drop;
        }
        if self.close || e.close {
            Next::Close
        } else {
            Next::Continue
        }
    }
}
