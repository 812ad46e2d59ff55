//! The handle through which everything but the writer makes writes durable: a [`Commit`] sent to the
//! writer (whatever actor takes it), raced for with a [`Ticket`] so that a call answered 503 is never
//! committed (`docs/reliability.md`, "a 503 is never answered for a batch that lands").

use std::time::Duration;

use actix::{Message, Recipient};
use runguard_store::{CommitReceipt, StoreError, WriteBatch};

use crate::node_error::NodeError;
use crate::ticket::Ticket;

/// Asks the writer to make `batch` durable.
#[derive(Debug, Message)]
#[rtype(result = "Result<CommitReceipt, StoreError>")]
pub struct Commit {
    /// The writes.
    pub batch: WriteBatch,
    /// Raced for with the caller: the batch is committed only if the writer takes it first.
    pub ticket: Ticket,
}

impl Commit {
    /// Wraps a batch with a fresh ticket.
    pub fn new(batch: WriteBatch) -> Self {
        Self { batch, ticket: Ticket::new() }
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
        let commit = Commit::new(batch);
        let ticket = commit.ticket.clone();
        let mut sent = std::pin::pin!(self.writer.send(commit));
        let answer = match actix_web::rt::time::timeout(self.timeout, &mut sent).await {
            Ok(answer) => answer,
            Err(_) if ticket.abandon() => {
                metrics::counter!("runguard_refused_calls_total", "reason" => "commit_timeout").increment(1);
                let error = NodeError::unavailable("the writer is overloaded; treat the call as a block");
                return Err(Refused { error, settled: true });
            }
            Err(_) => sent.await,
        };
        match answer {
            Ok(Ok(receipt)) => Ok(receipt),
            // The store writes nothing of a batch it answers with an error.
            Ok(Err(err)) => Err(Refused { error: NodeError::Store(err), settled: true }),
            Err(err) => {
                tracing::error!(error = %err, "writer unavailable");
                let error = NodeError::unavailable("the writer is overloaded or stopped; treat the call as a block");
                // A batch the writer never took never will be; one it took may have landed.
                Err(Refused { error, settled: ticket.abandon() })
            }
        }
    }
}
