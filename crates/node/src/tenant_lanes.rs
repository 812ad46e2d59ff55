//! Per-tenant lanes for CPU-heavy work (simulations, graduation, large reads): each tenant may have at
//! most a few such jobs on the blocking pool at once, so one tenant flooding an expensive endpoint queues
//! behind its own work instead of taking every core from the others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runguard_contract::TenantId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How many tenants' idle lanes are kept before the map is pruned.
const PRUNE_ABOVE: usize = 1024;

/// The lanes of every tenant that has heavy work in flight.
#[derive(Debug)]
pub struct TenantLanes {
    per_tenant: usize,
    lanes: Mutex<HashMap<TenantId, Arc<Semaphore>>>,
}

/// Why a lane could not be taken.
#[derive(Debug, thiserror::Error)]
#[error("the tenant's heavy work did not get a lane within {waited_ms} ms")]
pub struct LaneTimeout {
    /// How long the caller waited.
    pub waited_ms: u128,
}

impl TenantLanes {
    /// Lanes allowing `per_tenant` concurrent heavy jobs for each tenant (at least one).
    pub fn new(per_tenant: usize) -> Self {
        Self { per_tenant: per_tenant.max(1), lanes: Mutex::new(HashMap::new()) }
    }

    /// Waits at most `wait` for one of `tenant`'s lanes; the lane is free again when the permit drops.
    pub async fn acquire(&self, tenant: &TenantId, wait: Duration) -> Result<OwnedSemaphorePermit, LaneTimeout> {
        let lane = {
            let mut lanes = self.lanes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if lanes.len() > PRUNE_ABOVE {
                // A lane nobody holds or waits on is only its map entry.
                lanes.retain(|_, lane| Arc::strong_count(lane) > 1);
            }
            Arc::clone(lanes.entry(tenant.clone()).or_insert_with(|| Arc::new(Semaphore::new(self.per_tenant))))
        };
        match tokio::time::timeout(wait, lane.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; treat it like a timeout all the same.
            Ok(Err(_)) | Err(_) => Err(LaneTimeout { waited_ms: wait.as_millis() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str) -> TenantId {
        TenantId::new(name).unwrap_or_else(|_| unreachable!("valid test tenant"))
    }

    #[actix_rt::test]
    async fn a_busy_tenant_waits_for_itself_and_not_for_others() {
        let lanes = TenantLanes::new(1);
        let short = Duration::from_millis(20);
        let held = lanes.acquire(&tenant("beta"), short).await;
        assert!(held.is_ok());
        assert!(lanes.acquire(&tenant("beta"), short).await.is_err(), "beta's only lane is taken");
        assert!(lanes.acquire(&tenant("acme"), short).await.is_ok(), "acme has a lane of its own");
        drop(held);
        assert!(lanes.acquire(&tenant("beta"), short).await.is_ok(), "the lane is free once dropped");
    }
}
