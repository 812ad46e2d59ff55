//! The handle through which everything but the writer makes writes durable: a [`Commit`] sent to the
//! writer (whatever actor takes it), raced for with a [`Ticket`] so that a call answered 503 is never
//! committed (`docs/reliability.md`, "a 503 is never answered for a batch that lands").

use std::time::Duration;

use actix::dev::SendError;
use actix::{Message, Recipient};
use runguard_store::{CommitReceipt, StoreError, WriteBatch};
use tokio::sync::oneshot;

use crate::node_error::NodeError;
use crate::ticket::Ticket;

/// What the writer answers a commit.
pub type Committed = Result<CommitReceipt, StoreError>;

/// Asks the writer to make `batch` durable and answer on `reply`.
///
/// The answer goes straight to the caller's channel: the writer's handler queues the batch and is done,
/// rather than leaving a future per caller in its context that actix polls on the writer's thread (all of
/// them whenever any one is woken) and that answers through a second channel.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Commit {
    /// The writes.
    pub batch: WriteBatch,
    /// Raced for with the caller: the batch is committed only if the writer takes it first.
    pub ticket: Ticket,
    /// Where the outcome goes; dropped unanswered when the batch is never committed.
    pub reply: oneshot::Sender<Committed>,
}

impl Commit {
    /// Wraps a batch with a fresh ticket; answers the message and where its outcome arrives.
    pub fn new(batch: WriteBatch) -> (Self, oneshot::Receiver<Committed>) {
        let (reply, answer) = oneshot::channel();
        (Self { batch, ticket: Ticket::new(), reply }, answer)
    }
}

/// A commit that failed: why, and whether the batch surely did not land (`false`: unknown).
#[derive(Debug)]
pub struct Refused {
    /// What the call answers.
    pub error: NodeError,
    /// Whether the batch is known not to have landed.
    pub settled: bool,
}

/// The writer, as its callers see it.
#[derive(Clone, Debug)]
pub struct CommitHandle {
    writer: Recipient<Commit>,
    timeout: Duration,
}

impl CommitHandle {
    /// Commits through `writer`, giving up on a batch the writer has not taken within `timeout`.
    pub fn new(writer: Recipient<Commit>, timeout: Duration) -> Self {
        Self { writer, timeout }
    }

    /// Whether the writer still runs.
    pub fn connected(&self) -> bool {
        self.writer.connected()
    }

    /// Makes `batch` durable; unavailable if the writer is full, slow or failing.
    ///
    /// A call that times out is refused only if the writer has not taken its batch yet (and then never
    /// will); once taken, the call waits for the commit's real outcome, so that a refusal is never
    /// answered for a batch that lands.
    pub async fn commit(&self, batch: WriteBatch) -> Result<CommitReceipt, NodeError> {
        self.commit_settled(batch).await.map_err(|refused| refused.error)
    }

    /// [`CommitHandle::commit`], telling a failure whose batch surely did not land from one whose
    /// outcome is unknown (the writer stopped after taking it).
    pub async fn commit_settled(&self, batch: WriteBatch) -> Result<CommitReceipt, Refused> {
        let (commit, answer) = Commit::new(batch);
        let ticket = commit.ticket.clone();
        let mut committed = std::pin::pin!(self.queue_and_wait(commit, answer));
        let answer = match actix_web::rt::time::timeout(self.timeout, &mut committed).await {
            Ok(answer) => answer,
            Err(_) if ticket.abandon() => {
                metrics::counter!("runguard_refused_calls_total", "reason" => "commit_timeout").increment(1);
                let error = NodeError::unavailable("the writer is overloaded; treat the call as a block");
                return Err(Refused { error, settled: true });
            }
            Err(_) => committed.await,
        };
        match answer {
            Some(Ok(receipt)) => Ok(receipt),
            // A refusal or an injected failure writes nothing. An I/O error may not say what happened:
            // a database that went away during COMMIT may have committed it, so the caller must read the
            // store again before it answers the run's next call.
            Some(Err(err)) => {
                let settled = err.kind() != runguard_store::StoreErrorKind::Io;
                Err(Refused { error: NodeError::Store(err), settled })
            }
            None => {
                tracing::error!("writer unavailable");
                let error = NodeError::unavailable("the writer is overloaded or stopped; treat the call as a block");
                // A batch the writer never took never will be; one it took may have landed.
                Err(Refused { error, settled: ticket.abandon() })
            }
        }
    }

    /// Queues `commit` (waiting for room while the writer's mailbox is full) and waits for its outcome;
    /// `None` when the writer stopped before answering.
    async fn queue_and_wait(&self, commit: Commit, answer: oneshot::Receiver<Committed>) -> Option<Committed> {
        match self.writer.try_send(commit) {
            Ok(()) => {}
            Err(SendError::Full(commit)) => self.writer.send(commit).await.ok()?,
            Err(SendError::Closed(_)) => return None,
        }
        answer.await.ok()
    }
}
