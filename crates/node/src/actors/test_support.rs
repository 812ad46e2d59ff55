//! A node's actors over a temporary store, started in the test's actix system: what the in-process
//! actor tests drive through messages, the way the server wires them (collaborators passed in).

use std::sync::Arc;

use actix::prelude::*;
use runguard_contract::{RunId, TenantId};
use runguard_store::{Store, StoreOptions};

use crate::actors::learning::Learning;
use crate::actors::registry::{Registry, RunTable};
use crate::actors::run::RunKey;
use crate::actors::writer::Writer;
use crate::config::Config;
use crate::shared::Shared;

/// The actors of one node.
pub(crate) struct Node {
    /// Keeps the store's directory while the node lives.
    pub(crate) _dir: tempfile::TempDir,
    pub(crate) store: Arc<Store>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) runs: Arc<RunTable>,
    pub(crate) registry: Addr<Registry>,
    pub(crate) learning: Addr<Learning>,
}

impl Node {
    /// Starts a node whose configuration `configure` adjusts (fsync off: tests need no durability).
    pub(crate) fn start(configure: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(Store::open(dir.path(), &StoreOptions { fsync: false, ..StoreOptions::default() }).unwrap());
        let writer = Writer::new(Arc::clone(&store), 64, 64).start();
        let mut config = Config::default();
        configure(&mut config);
        let shared = Arc::new(Shared::new(Arc::clone(&store), writer.recipient(), config));
        let learning = Learning::new(Arc::clone(&shared)).start();
        let runs = Arc::new(RunTable::default());
        let registry =
            Registry::new(Arc::clone(&shared), Arc::clone(&runs), learning.clone().recipient(), Vec::new()).start();
        Self { _dir: dir, store, shared, runs, registry, learning }
    }
}

impl Node {
    /// The same store behind new actors and a new shared context, as after a restart: every run is
    /// rehydrated from the store on its next call (the old actors stay idle).
    pub(crate) fn restarted(self) -> Self {
        let Node { _dir, store, shared, .. } = self;
        let writer = Writer::new(Arc::clone(&store), 64, 64).start();
        let shared = Arc::new(Shared::new(Arc::clone(&store), writer.recipient(), shared.config.clone()));
        let learning = Learning::new(Arc::clone(&shared)).start();
        let runs = Arc::new(RunTable::default());
        let registry =
            Registry::new(Arc::clone(&shared), Arc::clone(&runs), learning.clone().recipient(), Vec::new()).start();
        Self { _dir, store, shared, runs, registry, learning }
    }
}

/// The key of run `run` of tenant `tenant`.
pub(crate) fn key(tenant: &str, run: &str) -> RunKey {
    RunKey { tenant: TenantId::new(tenant).unwrap(), run_id: RunId::new(run).unwrap() }
}

impl Node {
    /// Stores a policy of `tenant` made from the document `doc` (JSON), as the HTTP handler would.
    pub(crate) fn policy(&self, tenant: &str, doc: serde_json::Value) -> runguard_contract::Policy {
        let doc = runguard_contract::PolicyDocument::from_value(doc, &self.shared.config.limits.policy).unwrap();
        let id = doc.id.clone().unwrap_or_else(|| runguard_contract::PolicyId::from_u128(7));
        let approval = crate::policy_change::Approval::manual("test", Some("created".into()));
        let change = crate::policy_change::PolicyChange::create(
            doc,
            id,
            Some(TenantId::new(tenant).unwrap()),
            approval,
            crate::shared::now(),
        );
        let mut batch = runguard_store::WriteBatch::new();
        let policy = change.write(&mut batch);
        self.store.commit(batch).unwrap();
        policy
    }

    /// The live actor of run `run` of `tenant`, spawned by the registry.
    pub(crate) async fn run(&self, tenant: &str, run: &str) -> Addr<crate::actors::run::RunActor> {
        let resolve = crate::actors::registry::Resolve { key: key(tenant, run), home: None };
        self.registry.send(resolve).await.unwrap().unwrap().addr
    }
}
