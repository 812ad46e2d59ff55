//! The writer actor: the only writer of the store, on its own arbiter (thread), group-committing.
//!
//! Callers send a [`Commit`] and wait on its reply channel; the writer queues it and, once its mailbox is
//! drained (or the batch is full), commits every queued batch together — one transaction, one flush, one
//! fsync — and then answers every caller on its channel. The store checks each caller's batch against what the earlier ones leave and
//! refuses only the callers whose own writes are refused (`docs/store.md`). Blocking sled calls are fine here:
//! nothing else runs on this thread.
//!
//! A caller that gives up (its timeout) abandons its [`Ticket`]; the writer takes every ticket before it
//! commits and drops the abandoned ones, so a call answered 503 is never committed (`docs/reliability.md`).
//!
//! About once a second the writer rewrites the store's acknowledgement watermark and, while the store
//! cannot write, probes it so that readiness returns by itself (`docs/reliability.md`, store faults).

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use runguard_store::{Store, StoreError, StoreErrorKind, WriteBatch};
use tokio::sync::oneshot;

use crate::commit::{Commit, Committed};
use crate::metric_families::with_hot;
use crate::ticket::Ticket;

/// How often the watermark is rewritten (if commits happened) and an unhealthy store is probed: the lag
/// of the acknowledged-state check at start.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// Commits what is queued now, then stops accepting (graceful shutdown).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Drain;

#[derive(Message)]
#[rtype(result = "()")]
struct Flush;

struct Pending {
    batch: WriteBatch,
    ticket: Ticket,
    reply: oneshot::Sender<Committed>,
}

/// The writer.
pub struct Writer {
    store: Arc<Store>,
    pending: Vec<Pending>,
    max_batch: usize,
    mailbox: usize,
    draining: bool,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("pending", &self.pending.len()).finish_non_exhaustive()
    }
}

impl Writer {
    /// A writer over `store`, committing at most `max_batch` calls at once, with a mailbox of `mailbox`.
    pub fn new(store: Arc<Store>, max_batch: usize, mailbox: usize) -> Self {
        Self { store, pending: Vec::new(), max_batch: max_batch.max(1), mailbox: mailbox.max(1), draining: false }
    }

    /// Starts the writer on a dedicated arbiter and returns its address and the arbiter (to stop it).
    pub fn start_dedicated(self) -> (Addr<Writer>, Arbiter) {
        let arbiter = Arbiter::new();
        let addr = Writer::start_in_arbiter(&arbiter.handle(), |_| self);
        (addr, arbiter)
    }

    /// Commits everything queued whose caller still waits, as one group.
    fn flush(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        let mut batches = Vec::with_capacity(pending.len());
        let mut replies = Vec::with_capacity(pending.len());
        let mut abandoned = 0usize;
        for Pending { batch, ticket, reply } in pending {
            if ticket.take() {
                batches.push(batch);
                replies.push(reply);
            } else {
                abandoned += 1;
            }
        }
        if abandoned > 0 {
            tracing::warn!(abandoned, "dropped commits whose callers timed out");
            metrics::counter!("runguard_writer_abandoned_total").increment(abandoned as u64);
        }
        if batches.is_empty() {
            return;
        }
        let started = Instant::now();
        let calls = batches.len();
        let outcomes = self.store.commit_group(batches);
        let elapsed = started.elapsed();
        with_hot(|hot| {
            hot.writer_batch_size().record(calls as f64);
            hot.writer_commit_seconds().record(elapsed.as_secs_f64());
        });
        let mut failed = false;
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            if let Err(err) = &outcome
                && matches!(err.kind(), StoreErrorKind::Io | StoreErrorKind::Injected)
            {
                failed = true;
            }
            let _ = reply.send(outcome);
        }
        if failed {
            tracing::error!(calls, "group commit failed; its calls are answered 503");
            metrics::counter!("runguard_writer_commit_failures_total").increment(1);
        }
    }

    fn housekeeping(&mut self) {
        if !self.store.is_healthy() {
            match self.store.probe() {
                Ok(()) => tracing::info!("the store writes again; ready"),
                Err(err) => tracing::warn!(error = %err, "the store still cannot write; not ready"),
            }
        }
        if let Err(err) = self.store.sync_watermark() {
            tracing::error!(error = %err, "cannot write the acknowledgement watermark");
        }
    }
}

impl Actor for Writer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.mailbox);
        ctx.run_interval(HOUSEKEEPING, |writer, _| writer.housekeeping());
    }
}

impl Handler<Commit> for Writer {
    type Result = ();

    fn handle(&mut self, Commit { batch, ticket, reply }: Commit, ctx: &mut Self::Context) {
        if self.draining {
            let _ = reply.send(Err(StoreError::new(StoreErrorKind::Io, "the writer is shutting down")));
            return;
        }
        if self.pending.is_empty() {
            // Runs after the mailbox is drained: everything queued by then shares one commit.
            ctx.notify(Flush);
        }
        self.pending.push(Pending { batch, ticket, reply });
        if self.pending.len() >= self.max_batch {
            self.flush();
        }
    }
}

impl Handler<Flush> for Writer {
    type Result = ();

    fn handle(&mut self, _: Flush, _: &mut Self::Context) {
        if !self.pending.is_empty() {
            self.flush();
        }
    }
}

impl Handler<Drain> for Writer {
    type Result = ();

    fn handle(&mut self, _: Drain, ctx: &mut Self::Context) {
        self.flush();
        self.draining = true;
        // A graceful stop leaves a watermark that covers every acknowledged commit.
        if let Err(err) = self.store.sync_watermark() {
            tracing::error!(error = %err, "cannot write the acknowledgement watermark at shutdown");
        }
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use std::time::Duration;

    use actix::{Actor, Addr};
    use runguard_contract::{ApprovalPath, AuditEntry, Mode, PolicyId, Snapshot, TenantId, Timestamp};
    use runguard_store::{CommitReceipt, Store, StoreError, StoreErrorKind, StoreOptions, WriteBatch};

    use tokio::sync::oneshot;

    use super::{Drain, Writer};
    use crate::commit::{Commit, CommitHandle, Committed};
    use crate::ticket::Ticket;

    /// Queues `commit` at once, as `send` does, and answers a future of its outcome (an I/O error when the
    /// writer is closed or dropped the commit unanswered).
    fn send(
        writer: &Addr<Writer>,
        (commit, answer): (Commit, oneshot::Receiver<Committed>),
    ) -> impl Future<Output = Result<CommitReceipt, StoreError>> {
        let queued = writer.try_send(commit);
        async move {
            let gone = || StoreError::new(StoreErrorKind::Io, "no answer");
            queued.map_err(|_| gone())?;
            answer.await.unwrap_or_else(|_| Err(gone()))
        }
    }

    fn store() -> (tempfile::TempDir, Arc<Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions { fsync: false, ..StoreOptions::default() }).unwrap();
        (dir, Arc::new(store))
    }

    /// A write the store refuses: an audit entry of a policy that does not exist.
    fn refused(tenant: &str) -> WriteBatch {
        let mut batch = WriteBatch::new();
        batch.append_audit(
            Some(TenantId::new(tenant).unwrap()),
            AuditEntry {
                policy_id: PolicyId::new("pol_missing").unwrap(),
                from: None,
                to: Mode::Active,
                at: Timestamp::from_unix_millis(1),
                caller: "test".to_owned(),
                reason: None,
                approval_path: ApprovalPath::Manual,
            },
        );
        batch
    }

    fn accepted(tenant: &str) -> WriteBatch {
        let mut batch = WriteBatch::new();
        batch.put_snapshot(Snapshot::capture(&TenantId::new(tenant).unwrap(), []));
        batch
    }

    #[actix_rt::test]
    async fn a_refused_caller_fails_alone_in_its_group() {
        let (_dir, store) = store();
        let writer = Writer::new(Arc::clone(&store), 64, 64).start();
        // Sent together, so that the writer commits them as one group.
        let (ok, bad, ok_too) = tokio::join!(
            send(&writer, Commit::new(accepted("globex"))),
            send(&writer, Commit::new(refused("acme"))),
            send(&writer, Commit::new(accepted("initech"))),
        );
        assert!(ok.is_ok());
        assert!(ok_too.is_ok());
        let err = bad.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::NotFound);
        assert!(!err.message().contains("globex") && !err.message().contains("initech"), "{err}");
        assert_eq!(store.commit_count(), 1, "the two accepted callers shared one commit");
    }

    #[actix_rt::test]
    async fn a_full_group_commits_at_once_and_the_rest_in_the_next() {
        let (_dir, store) = store();
        let writer = Writer::new(Arc::clone(&store), 2, 64).start();
        let (a, b, c) = tokio::join!(
            send(&writer, Commit::new(accepted("acme"))),
            send(&writer, Commit::new(accepted("globex"))),
            send(&writer, Commit::new(accepted("initech"))),
        );
        for answer in [a, b, c] {
            assert!(answer.is_ok());
        }
        assert_eq!(store.commit_count(), 2, "a group of at most two, then one for the third caller");
    }

    #[actix_rt::test]
    async fn drain_commits_what_is_queued_then_stops() {
        let (_dir, store) = store();
        let writer = Writer::new(Arc::clone(&store), 64, 64).start();
        let (a, b, drained) = tokio::join!(
            send(&writer, Commit::new(accepted("acme"))),
            send(&writer, Commit::new(accepted("globex"))),
            writer.send(Drain),
        );
        assert!(a.is_ok() && b.is_ok(), "queued callers are answered, committed");
        drained.unwrap();
        assert_eq!(store.commit_count(), 1);
        // Stopped: a later caller is refused, never silently dropped, and nothing more is written.
        let late = send(&writer, Commit::new(accepted("initech"))).await;
        assert!(late.is_err());
        assert_eq!(store.commit_count(), 1);
    }

    #[actix_rt::test]
    async fn an_abandoned_commit_is_never_made() {
        let (_dir, store) = store();
        let writer = Writer::new(Arc::clone(&store), 64, 64).start();
        let ticket = Ticket::new();
        assert!(ticket.abandon());
        let (mut commit, answer) = Commit::new(accepted("acme"));
        commit.ticket = ticket;
        // The writer dropped it: the caller (long gone in real life) sees the reply channel closed.
        let answer = send(&writer, (commit, answer)).await;
        assert_eq!(answer.unwrap_err().kind(), StoreErrorKind::Io);
        assert_eq!(store.commit_count(), 0);
    }

    #[actix_rt::test]
    async fn callers_beyond_a_full_mailbox_wait_for_room_and_are_committed() {
        let (_dir, store) = store();
        let writer = Writer::new(Arc::clone(&store), 64, 1).start();
        let handle = CommitHandle::new(writer.recipient(), Duration::from_secs(10));
        let (a, b, c) = tokio::join!(
            handle.commit(accepted("acme")),
            handle.commit(accepted("globex")),
            handle.commit(accepted("initech")),
        );
        assert!(a.is_ok() && b.is_ok() && c.is_ok(), "{a:?} {b:?} {c:?}");
    }
}
