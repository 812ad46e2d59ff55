//! The writer actor: the only writer of the store, on its own arbiter (thread), group-committing.
//!
//! Callers `send` a [`Commit`] and wait; the writer queues it and, once its mailbox is drained (or the
//! batch is full), merges every queued batch into one store commit — one transaction, one flush, one
//! fsync — and then answers every caller. Blocking sled calls are fine here: nothing else runs on this
//! thread. Batches that change policies commit alone, so that an optimistic-concurrency conflict fails
//! only its own caller.

use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use runguard_store::{CommitReceipt, Store, StoreError, StoreErrorKind, WriteBatch, WriteOp};
use tokio::sync::oneshot;

/// Asks the writer to make `batch` durable.
#[derive(Debug, Message)]
#[rtype(result = "Result<CommitReceipt, StoreError>")]
pub struct Commit {
    /// The writes.
    pub batch: WriteBatch,
}

impl Commit {
    /// Wraps a batch.
    pub fn new(batch: WriteBatch) -> Self {
        Self { batch }
    }
}

/// Commits what is queued now, then stops accepting (graceful shutdown).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Drain;

#[derive(Message)]
#[rtype(result = "()")]
struct Flush;

struct Pending {
    batch: WriteBatch,
    reply: oneshot::Sender<Result<CommitReceipt, StoreError>>,
}

/// The writer.
pub struct Writer {
    store: Arc<Store>,
    pending: Vec<Pending>,
    queued_ops: usize,
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
        Self {
            store,
            pending: Vec::new(),
            queued_ops: 0,
            max_batch: max_batch.max(1),
            mailbox: mailbox.max(1),
            draining: false,
        }
    }

    /// Starts the writer on a dedicated arbiter and returns its address and the arbiter (to stop it).
    pub fn start_dedicated(self) -> (Addr<Writer>, Arbiter) {
        let arbiter = Arbiter::new();
        let addr = Writer::start_in_arbiter(&arbiter.handle(), |_| self);
        (addr, arbiter)
    }

    fn changes_policies(batch: &WriteBatch) -> bool {
        batch.ops().iter().any(|op| matches!(op, WriteOp::PutPolicyVersion(_) | WriteOp::PutRegret { .. }))
    }

    /// Commits everything queued, in groups: consecutive ordinary batches merge into one commit; batches
    /// that change policies commit alone.
    fn flush(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        self.queued_ops = 0;
        let mut group: Vec<Pending> = Vec::new();
        for item in pending {
            if Self::changes_policies(&item.batch) {
                self.commit_group(std::mem::take(&mut group));
                self.commit_group(vec![item]);
            } else {
                group.push(item);
            }
        }
        self.commit_group(group);
    }

    fn commit_group(&mut self, group: Vec<Pending>) {
        if group.is_empty() {
            return;
        }
        let started = Instant::now();
        let mut merged = WriteBatch::new();
        let mut shares = Vec::with_capacity(group.len());
        let mut replies = Vec::with_capacity(group.len());
        for Pending { batch, reply } in group {
            let records = batch.ops().iter().filter(|op| matches!(op, WriteOp::AppendRecord(_))).count();
            let ledger = batch.ops().iter().filter(|op| matches!(op, WriteOp::AppendLedger { .. })).count();
            shares.push((records, ledger, batch.len()));
            replies.push(reply);
            // Moved, not copied: a ledger entry carries the call, its texts and the decision.
            merged.append(batch);
        }
        let calls = replies.len();
        let result = self.store.commit(merged);
        let elapsed = started.elapsed();
        metrics::histogram!("runguard_writer_batch_size").record(calls as f64);
        metrics::histogram!("runguard_writer_commit_seconds").record(elapsed.as_secs_f64());
        match result {
            Ok(receipt) => {
                let mut records = receipt.records.into_iter();
                let mut positions = receipt.ledger_positions.into_iter();
                for (reply, (n_records, n_ledger, ops)) in replies.into_iter().zip(shares) {
                    let share = CommitReceipt {
                        records: records.by_ref().take(n_records).collect(),
                        ledger_positions: positions.by_ref().take(n_ledger).collect(),
                        ops,
                    };
                    let _ = reply.send(Ok(share));
                }
            }
            Err(err) => {
                tracing::error!(error = %err, calls, "group commit failed; every call in it is answered 503");
                metrics::counter!("runguard_writer_commit_failures_total").increment(1);
                for reply in replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }
}

impl Actor for Writer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.mailbox);
    }
}

impl Handler<Commit> for Writer {
    type Result = ResponseFuture<Result<CommitReceipt, StoreError>>;

    fn handle(&mut self, msg: Commit, ctx: &mut Self::Context) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        if self.draining {
            let _ = tx.send(Err(StoreError::new(StoreErrorKind::Io, "the writer is shutting down")));
        } else {
            if self.pending.is_empty() {
                // Runs after the mailbox is drained: everything queued by then shares one commit.
                ctx.notify(Flush);
            }
            self.queued_ops = self.queued_ops.saturating_add(msg.batch.len());
            self.pending.push(Pending { batch: msg.batch, reply: tx });
            if self.pending.len() >= self.max_batch {
                self.flush();
            }
        }
        Box::pin(
            async move { rx.await.unwrap_or_else(|_| Err(StoreError::new(StoreErrorKind::Io, "the writer stopped"))) },
        )
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
        ctx.stop();
    }
}
