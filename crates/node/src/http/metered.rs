//! A node-wide budget for the bytes of answers waiting to be sent, so that clients that do not read
//! (`docs/reliability.md`, overload) pin at most that much memory together, however many connections they hold.
//!
//! An answer of at least [`CHUNK`] bytes takes its size from the budget, or is refused with 503 when the
//! budget is spent, and hands its bytes to actix-web a chunk at a time: actix asks for the next chunk only
//! once its write buffer has drained, so the answer stays counted exactly as long as it is held in memory,
//! and the write buffer of a stalled connection never grows past a chunk or two.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use actix_web::ResponseError;
use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::dev::ServiceResponse;
use actix_web::web::Bytes;

use crate::error::ApiError;

/// Answers this large or larger are counted and sent in chunks of this size.
pub const CHUNK: usize = 64 * 1024;

/// The bytes of large answers not yet handed to the kernel, against a limit.
#[derive(Debug)]
pub struct AnswerBudget {
    used: AtomicUsize,
    limit: usize,
}

impl AnswerBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { used: AtomicUsize::new(0), limit })
    }

    /// Bytes counted now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Takes `bytes` from the budget, unless that would exceed it. One answer larger than the whole budget
    /// is still served when nothing else is counted, so that a small budget never makes a page unreadable.
    fn take(self: &Arc<Self>, bytes: usize) -> Option<Permit> {
        let mut used = self.used.load(Ordering::Acquire);
        loop {
            let next = used.saturating_add(bytes);
            if next > self.limit && used > 0 {
                return None;
            }
            match self.used.compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(Permit { budget: Arc::clone(self), bytes }),
                Err(actual) => used = actual,
            }
        }
    }

    /// Counts a large answer against the budget and sends it in chunks, or replaces it with a 503 when the
    /// budget is spent (the answer's memory is freed at once).
    pub fn meter(self: &Arc<Self>, response: ServiceResponse<BoxBody>) -> ServiceResponse<BoxBody> {
        let size = match response.response().body().size() {
            BodySize::Sized(size) => usize::try_from(size).unwrap_or(usize::MAX),
            _ => return response,
        };
        if size < CHUNK {
            return response;
        }
        let Some(permit) = self.take(size) else {
            metrics::counter!("runguard_refused_calls_total", "reason" => "answer_budget").increment(1);
            tracing::debug!(bytes = size, used = self.used(), "answer refused: the answer budget is spent");
            let (request, _) = response.into_parts();
            let refusal = ApiError::unavailable(
                "the node holds too many unsent answers for clients that are not reading them; retry later",
                1,
            );
            return ServiceResponse::new(request, refusal.error_response());
        };
        response.map_body(|_, body| match body.try_into_bytes() {
            Ok(bytes) => BoxBody::new(Chunked { bytes, size: size as u64, _permit: permit }),
            Err(body) => body,
        })
    }
}

/// A share of the budget, given back when the answer holding it is dropped.
#[derive(Debug)]
struct Permit {
    budget: Arc<AnswerBudget>,
    bytes: usize,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// An answer handed out [`CHUNK`] bytes at a time, holding its permit until the last chunk is taken.
struct Chunked {
    bytes: Bytes,
    size: u64,
    _permit: Permit,
}

impl MessageBody for Chunked {
    type Error = Infallible;

    fn size(&self) -> BodySize {
        BodySize::Sized(self.size)
    }

    fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        if this.bytes.is_empty() {
            return Poll::Ready(None);
        }
        let n = this.bytes.len().min(CHUNK);
        Poll::Ready(Some(Ok(this.bytes.split_to(n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_shared_and_given_back() {
        let budget = AnswerBudget::new(100);
        let first = budget.take(60).expect("room");
        assert!(budget.take(60).is_none(), "over the limit");
        let second = budget.take(40).expect("exactly the limit");
        assert_eq!(budget.used(), 100);
        drop((first, second));
        assert_eq!(budget.used(), 0);
        let alone = budget.take(500).expect("one answer larger than the budget when nothing else is counted");
        assert!(budget.take(1).is_none());
        drop(alone);
        assert_eq!(budget.used(), 0);
    }
}
