//! A ticket a caller and the actor doing its work race for, so that work the caller gave up on is never
//! done (a call answered with anything but 2xx is never applied; `docs/reliability.md`).
//!
//! The actor takes the ticket before it starts (pending → taken); a caller whose timeout expires abandons
//! it (pending → abandoned) and answers 503. Exactly one of them wins: an actor that finds the ticket
//! abandoned skips the work, and a caller that finds it taken waits for the real outcome instead of
//! answering before it knows.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

const PENDING: u8 = 0;
const TAKEN: u8 = 1;
const ABANDONED: u8 = 2;

/// One call's ticket; clones share it.
#[derive(Clone, Debug, Default)]
pub struct Ticket(Arc<AtomicU8>);

impl Ticket {
    /// A pending ticket.
    pub fn new() -> Self {
        Self::default()
    }

    /// The actor's move: whether it may do the work (false once the caller gave up).
    pub fn take(&self) -> bool {
        self.0.compare_exchange(PENDING, TAKEN, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// The caller's move on timeout: whether it may answer without the outcome (false once the work
    /// started, and then the caller must wait for it).
    pub fn abandon(&self) -> bool {
        self.0.compare_exchange(PENDING, ABANDONED, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::Ticket;

    #[test]
    fn exactly_one_side_wins() {
        let ticket = Ticket::new();
        assert!(ticket.take());
        assert!(!ticket.abandon());
        let ticket = Ticket::new();
        assert!(ticket.abandon());
        assert!(!ticket.clone().take());
    }
}
