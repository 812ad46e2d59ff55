//! Opening a store: the schema and acknowledgement checks at open, and recovery after a write failure.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use runguard_contract::{PreventionRecord, RecordHash};
use sled::Tree;

use super::{
    Acknowledged, ChainHead, Engine, META_COMMITS, META_SCHEMA, SCHEMA_VERSION, Store, StoreOptions, T, TREE_NAMES,
    WriterState,
};
use crate::codec::Stored;
use crate::error::{StoreError, StoreErrorKind};
use crate::group::CommitSignals;
use crate::keys;
use crate::run_cache::RunCache;
use crate::watermark::{self, Watermark};

impl Engine {
    pub(super) fn open(dir: &Path, options: &StoreOptions) -> Result<Self, StoreError> {
        let db = open_db(dir, options)?;
        let trees = TREE_NAMES.iter().map(|name| db.open_tree(name)).collect::<Result<Vec<Tree>, _>>()?;
        let db_file = if options.fsync { Some(File::open(dir.join("db"))?) } else { None };
        Ok(Self { db, trees, db_file })
    }

    pub(super) fn tree(&self, t: T) -> &Tree {
        // `trees` is built from TREE_NAMES, which the enum mirrors one to one.
        &self.trees[t as usize]
    }

    pub(super) fn make_durable(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(|err| StoreError::from(err).context("flush failed"))?;
        if let Some(file) = &self.db_file {
            // fdatasync: the data and the metadata needed to read it back (the file size), not timestamps.
            file.sync_data().map_err(|err| StoreError::io("fsync of the database file failed", err))?;
        }
        Ok(())
    }

    pub(super) fn commits(&self) -> Result<Option<u64>, StoreError> {
        self.tree(T::Meta).get(META_COMMITS)?.map(|bytes| u64::decode(&bytes)).transpose()
    }

    pub(super) fn head(&self) -> Result<ChainHead, StoreError> {
        match self.tree(T::Records).last()? {
            None => Ok(ChainHead { seq: 0, hash: RecordHash::genesis() }),
            Some((key, value)) => {
                let record = PreventionRecord::decode(&value)?;
                let key_seq = keys::trailing_u64(&key).unwrap_or(0);
                if record.seq != key_seq {
                    return Err(StoreError::corrupt(format!(
                        "the last record `{}` carries seq {} but is stored at seq {key_seq}",
                        record.id, record.seq
                    )));
                }
                Ok(ChainHead { seq: record.seq, hash: record.hash })
            }
        }
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir`, checks the schema version, checks that the store
    /// holds everything its acknowledgement watermark says was acknowledged, and recovers the chain head.
    ///
    /// A store that recovered to an earlier state than it acknowledged is refused (`Corrupt`, naming
    /// what is missing) and never re-initialised.
    pub fn open(dir: impl AsRef<Path>, options: &StoreOptions) -> Result<Self, StoreError> {
        Self::open_with(dir.as_ref(), dir.as_ref(), options, Acknowledged::Enforce)
    }

    /// Opens the store in `dir`, naming it `shown` in messages (the original of a copy).
    pub(super) fn open_with(
        dir: &Path,
        shown: &Path,
        options: &StoreOptions,
        check: Acknowledged,
    ) -> Result<Self, StoreError> {
        let dir = dir.to_path_buf();
        let mark = watermark::read(&dir);
        let engine = Engine::open(&dir, options)?;
        let mut lost = None;
        let mark = match mark {
            Ok(mark) => mark,
            Err(err) if check == Acknowledged::Report => {
                lost = Some(err.message().to_owned());
                None
            }
            Err(err) => return Err(err),
        };
        let fresh = check_schema(&engine, shown)?;
        let commits = engine.commits()?;
        let head = engine.head();
        if let Some(problem) = acknowledged_problem(&engine, fresh, commits, head.as_ref().ok(), mark.as_ref())? {
            let problem = format!("the store in `{}` {problem}", shown.display());
            match check {
                Acknowledged::Enforce => return Err(StoreError::corrupt(problem)),
                Acknowledged::Report => lost = lost.or(Some(problem)),
            }
        }
        let commits = commits.unwrap_or(0);
        if fresh && lost.is_none() {
            engine.tree(T::Meta).insert(META_SCHEMA, SCHEMA_VERSION.encode()?)?;
            engine.make_durable()?;
        }
        let store = Self {
            dir,
            options: options.clone(),
            engine: RwLock::new(Some(Arc::new(engine))),
            writer: Mutex::new(WriterState {
                head,
                commits,
                watermarked: u64::MAX,
                failure: None,
                runs: RunCache::default(),
            }),
            signals: CommitSignals::default(),
            lost,
        };
        if check == Acknowledged::Enforce {
            // The store holds at least what was acknowledged: from now on it is the new baseline.
            store.sync_watermark()?;
        }
        Ok(store)
    }

    /// Rewrites the acknowledgement watermark if commits were made durable since it was last written. The
    /// node calls it about once a second and at a graceful stop; the check at open lags by that much.
    pub fn sync_watermark(&self) -> Result<(), StoreError> {
        let mut writer = self.writer();
        if writer.failure.is_some() || writer.commits == writer.watermarked {
            return Ok(());
        }
        let Ok(head) = writer.head.clone() else { return Ok(()) };
        let mark = Watermark { commits: writer.commits, record_seq: head.seq, record_hash: head.hash };
        watermark::write(&self.dir, &mark)?;
        writer.watermarked = mark.commits;
        Ok(())
    }

    /// Checks that the store can write (recovering it from an earlier write failure first): the
    /// readiness probe, run while the store is unhealthy. Sets readiness either way.
    pub fn probe(&self) -> Result<(), StoreError> {
        let mut writer = self.writer();
        let result = self.recover_locked(&mut writer).and_then(|engine| {
            if self.signals.commit_failure_injected() {
                return Err(CommitSignals::injected());
            }
            self.durable(&engine)
        });
        self.signals.set_healthy(result.is_ok());
        result
    }

    pub(super) fn durable(&self, engine: &Engine) -> Result<(), StoreError> {
        if self.signals.durability_failure_injected() {
            return Err(StoreError::new(StoreErrorKind::Injected, "flush failure injected by a test"));
        }
        engine.make_durable()
    }

    /// After a write failure: reopens sled from disk, writes back what the failed commit replaced, makes
    /// that durable and checks the store still holds every acknowledged commit. Until it succeeds, reads
    /// and commits fail.
    pub(super) fn recover_locked(&self, writer: &mut WriterState) -> Result<Arc<Engine>, StoreError> {
        let Some(failure) = &writer.failure else { return self.engine() };
        // Every handle to the old database must go before sled lets the directory be opened again.
        *self.engine.write().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        let engine = Arc::new(Engine::open(&self.dir, &self.options)?);
        engine.undo(&failure.undo)?;
        let commits = engine.commits()?.unwrap_or(0);
        if commits != writer.commits {
            return Err(StoreError::corrupt(format!(
                "after reopening, the store holds {commits} commits; {} were acknowledged",
                writer.commits
            )));
        }
        let head = engine.head();
        // The store now shows exactly what was acknowledged: reads may go on even if it cannot write yet.
        *self.engine.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::clone(&engine));
        self.durable(&engine)?;
        writer.failure = None;
        writer.head = head;
        Ok(engine)
    }
}

/// Checks the schema version; answers whether the store is fresh (no schema version and no data), which
/// the caller initialises only once it knows nothing acknowledged is missing.
pub(super) fn check_schema(engine: &Engine, dir: &Path) -> Result<bool, StoreError> {
    match engine.tree(T::Meta).get(META_SCHEMA)? {
        Some(bytes) => {
            let version = u32::decode(&bytes)?;
            if version != SCHEMA_VERSION {
                return Err(StoreError::new(
                    StoreErrorKind::Schema,
                    format!(
                        "the store in `{}` has schema version {version}; this build reads version {SCHEMA_VERSION}",
                        dir.display()
                    ),
                ));
            }
            Ok(false)
        }
        None => {
            let populated = engine.trees.iter().skip(1).any(|t| !t.is_empty());
            if populated {
                return Err(StoreError::new(
                    StoreErrorKind::Schema,
                    format!("the store in `{}` holds data but no schema version", dir.display()),
                ));
            }
            Ok(true)
        }
    }
}

/// Compares the store with its acknowledgement watermark (`docs/store.md`, acknowledged state); describes
/// what is missing.
///
/// A store without a commit counter and without a watermark was written before either existed and is
/// accepted as it is (the counting starts now).
pub(super) fn acknowledged_problem(
    engine: &Engine,
    fresh: bool,
    commits: Option<u64>,
    head: Option<&ChainHead>,
    mark: Option<&Watermark>,
) -> Result<Option<String>, StoreError> {
    let file = watermark::WATERMARK_FILE;
    let Some(mark) = mark else {
        return Ok(match commits {
            Some(n) if n > 0 => Some(format!(
                "holds {n} commits but its acknowledgement file `{file}` is missing; what was acknowledged is unknown"
            )),
            _ => None,
        });
    };
    if fresh {
        return Ok((mark.commits > 0).then(|| {
            format!(
                "is empty, but {} commits (prevention records up to seq {}) had been acknowledged: the database \
                 recovered to an earlier state, everything is missing",
                mark.commits, mark.record_seq
            )
        }));
    }
    let held = commits.unwrap_or(0);
    if held < mark.commits {
        let records = match head {
            Some(head) if head.seq < mark.record_seq => {
                format!("; {} missing", span("prevention record", head.seq.saturating_add(1), mark.record_seq))
            }
            _ => String::new(),
        };
        return Ok(Some(format!(
            "holds {held} commits, but {} had been acknowledged: the database recovered to an earlier state, \
             {} missing{records}",
            mark.commits,
            span("commit", held.saturating_add(1), mark.commits)
        )));
    }
    let Some(head) = head else { return Ok(None) };
    if head.seq < mark.record_seq {
        return Ok(Some(format!(
            "ends its record chain at seq {}, but records up to seq {} had been acknowledged: {} missing",
            head.seq,
            mark.record_seq,
            span("prevention record", head.seq.saturating_add(1), mark.record_seq)
        )));
    }
    if mark.record_seq > 0 {
        let at = engine.tree(T::Records).get(keys::record(mark.record_seq))?;
        let same = at.and_then(|v| PreventionRecord::decode(&v).ok()).is_some_and(|r| r.hash == mark.record_hash);
        if !same {
            return Ok(Some(format!(
                "holds another record at seq {} than the one acknowledged (hash `{}`)",
                mark.record_seq, mark.record_hash
            )));
        }
    }
    Ok(None)
}

/// `commit 5 is` or `commits 5..=9 are`.
pub(super) fn span(what: &str, first: u64, last: u64) -> String {
    if first == last { format!("{what} {first} is") } else { format!("{what}s {first}..={last} are") }
}

/// How long `open` waits for the directory lock: sled's background threads release it shortly after the
/// previous `Db` of this process is dropped.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

pub(super) fn open_db(dir: &Path, options: &StoreOptions) -> Result<sled::Db, StoreError> {
    let started = std::time::Instant::now();
    loop {
        match sled::Config::new().path(dir).cache_capacity(options.cache_capacity_bytes).open() {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(err)) if err.to_string().contains("could not acquire lock") => {
                if started.elapsed() >= LOCK_WAIT {
                    return Err(StoreError::io(
                        format!("the store in `{}` is locked by another process", dir.display()),
                        err,
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(err) => {
                return Err(StoreError::from(err).context(format!("cannot open the store in `{}`", dir.display())));
            }
        }
    }
}
