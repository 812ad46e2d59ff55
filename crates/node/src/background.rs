//! Background threads for CPU-heavy work (evaluations over large texts, simulations, graduation, list
//! pages): a fixed set, one per core, so that however many tenants send heavy calls at once, heavy work
//! never runs on more threads than there are cores and never on an HTTP worker or actor thread. Which
//! tenant may run how much at once is decided before a job gets here (`TenantLanes`).
//!
//! The threads keep normal priority: at the lowest priority, heavy work starved to a few percent of a core
//! whenever the machine was busy (measured in the black-box suite), and other tenants' p99 under a flood
//! did not improve measurably.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of threads; they stop when the pool is dropped.
#[derive(Debug)]
pub struct BackgroundPool {
    jobs: Sender<Job>,
}

/// The pool's threads are gone (they only stop when the pool is dropped).
#[derive(Debug, thiserror::Error)]
#[error("the background threads have stopped")]
pub struct PoolStopped;

impl BackgroundPool {
    /// Starts `threads` threads (at least one).
    pub fn start(threads: usize) -> Self {
        let (jobs, queue) = channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads.max(1) {
            let queue = Arc::clone(&queue);
            let spawned = std::thread::Builder::new().name(format!("runguard-heavy-{i}")).spawn(move || work(&queue));
            if let Err(err) = spawned {
                tracing::error!(error = %err, "cannot start a background thread");
            }
        }
        Self { jobs }
    }

    /// Runs `job` on a background thread and waits for its result without blocking the caller's thread.
    pub async fn run<T, F>(&self, job: F) -> Result<T, PoolStopped>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            // A panicking job must not take a pool thread with it; its caller sees `PoolStopped`.
            if let Ok(value) = std::panic::catch_unwind(AssertUnwindSafe(job)) {
                let _ = done.send(value);
            }
        });
        self.jobs.send(job).map_err(|_| PoolStopped)?;
        result.await.map_err(|_| PoolStopped)
    }
}

fn work(queue: &Mutex<Receiver<Job>>) {
    loop {
        let job = queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).recv();
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_rt::test]
    async fn jobs_run_and_a_panicking_one_leaves_the_pool_working() {
        let pool = BackgroundPool::start(1);
        assert_eq!(pool.run(|| 6 * 7).await.ok(), Some(42));
        assert!(pool.run(|| -> u8 { panic!("a job failed") }).await.is_err());
        assert_eq!(pool.run(|| "still here").await.ok(), Some("still here"));
    }
}
