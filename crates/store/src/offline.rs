//! Reading a store without changing it: `runguard verify` works on a copy.
//!
//! Opening a sled database writes to it (a snapshot file, recovery bookkeeping), and opening a runguard
//! store may initialise it. So verification copies the whole data directory into a temporary directory,
//! holding sled's own lock on the original meanwhile so that no node writes it during the copy, and opens
//! the copy. The cost is one read of the store and the disk space of a second copy while it runs.

use std::fs::{self, File, TryLockError};
use std::path::Path;

use crate::error::{StoreError, StoreErrorKind};

const LOCKED: &str = "is locked by another process";

/// A copy of the store in `dir`, made while holding its lock; removed when dropped.
pub(crate) fn locked_copy(dir: &Path) -> Result<tempfile::TempDir, StoreError> {
    let lock = match File::open(dir.join("db")) {
        Ok(file) => Some(file),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => return Err(StoreError::io(format!("cannot read the store in `{}`", dir.display()), err)),
    };
    if let Some(file) = &lock {
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::new(StoreErrorKind::Io, format!("the store in `{}` {LOCKED}", dir.display())));
            }
            Err(TryLockError::Error(err)) => {
                return Err(StoreError::io(format!("cannot lock the store in `{}`", dir.display()), err));
            }
        }
    }
    let copy = tempfile::Builder::new()
        .prefix("runguard-verify-")
        .tempdir()
        .map_err(|err| StoreError::io("cannot create a temporary directory for the copy", err))?;
    copy_tree(dir, copy.path())
        .map_err(|err| StoreError::io(format!("cannot copy the store in `{}`", dir.display()), err))?;
    drop(lock);
    Ok(copy)
}

/// Whether opening failed only because another process holds the store.
pub(crate) fn is_lock_error(err: &StoreError) -> bool {
    err.message().contains(LOCKED)
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            fs::create_dir_all(&target)?;
            copy_tree(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
