//! meta.redb behind a hold that lets a mounted filesystem compact it.
//!
//! Every transaction on meta.redb holds a shared hold on the database for
//! its whole life; a compaction takes the hold exclusively, writes a fresh
//! copy and swaps it in. So no transaction can straddle the swap: one begun
//! before it finishes first, one begun after it runs on the copy. Shared
//! holds are recursive (a thread may take one while it holds one) and never
//! wait for a compaction that is only waiting: compaction is what waits,
//! for a moment when nothing holds the database.
//!
//! Calls nothing of the crate.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use parking_lot::{
    RecursiveRwLock as RwLock, RecursiveRwLockReadGuard as RwLockReadGuard,
    RecursiveRwLockWriteGuard as RwLockWriteGuard,
};
use redb::{
    CommitError, Database, ReadTransaction, ReadableDatabase, TransactionError, WriteTransaction,
};

pub struct MetaDb {
    db: RwLock<Database>,
}

impl MetaDb {
    pub fn new(db: Database) -> MetaDb {
        MetaDb {
            db: RwLock::new(db),
        }
    }

    /// A shared hold: the database, and transactions that keep a hold.
    pub fn hold(&self) -> MetaRef<'_> {
        MetaRef {
            lock: &self.db,
            guard: self.db.read(),
        }
    }

    /// The database to itself, when it can have it within `wait`.
    pub fn exclusive(&self, wait: Duration) -> Option<RwLockWriteGuard<'_, Database>> {
        self.db.try_write_for(wait)
    }

    pub fn get_mut(&mut self) -> &mut Database {
        self.db.get_mut()
    }
}

/// A shared hold on meta.redb. Derefs to the database for functions that
/// take one; its `begin_read`/`begin_write` return transactions that keep
/// a hold of their own, so `repo.meta().begin_write()` is safe although
/// the `MetaRef` itself is gone at the end of the statement.
pub struct MetaRef<'a> {
    lock: &'a RwLock<Database>,
    guard: RwLockReadGuard<'a, Database>,
}

impl<'a> MetaRef<'a> {
    pub fn begin_read(&self) -> Result<Held<'a, ReadTransaction>, TransactionError> {
        let hold = self.lock.read();
        let tx = hold.begin_read()?;
        Ok(Held { tx, _hold: hold })
    }

    pub fn begin_write(&self) -> Result<Held<'a, WriteTransaction>, TransactionError> {
        let hold = self.lock.read();
        let tx = hold.begin_write()?;
        Ok(Held { tx, _hold: hold })
    }
}

impl Deref for MetaRef<'_> {
    type Target = Database;
    fn deref(&self) -> &Database {
        &self.guard
    }
}

/// A transaction with the hold it needs. Fields drop in order: the
/// transaction ends before the hold is given up.
pub struct Held<'a, T> {
    tx: T,
    _hold: RwLockReadGuard<'a, Database>,
}

impl Held<'_, WriteTransaction> {
    pub fn commit(self) -> Result<(), CommitError> {
        let Held { tx, _hold } = self;
        tx.commit()
    }

    pub fn abort(self) -> Result<(), redb::StorageError> {
        let Held { tx, _hold } = self;
        tx.abort()
    }
}

impl<T> Deref for Held<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.tx
    }
}

impl<T> DerefMut for Held<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.tx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_keeps_its_hold_after_the_ref_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let db = MetaDb::new(Database::create(dir.path().join("m.redb")).unwrap());
        let tx = db.hold().begin_write().unwrap();
        assert!(db.exclusive(Duration::from_millis(10)).is_none());
        tx.commit().unwrap();
        let rt = db.hold().begin_read().unwrap();
        assert!(db.exclusive(Duration::from_millis(10)).is_none());
        drop(rt);
        assert!(db.exclusive(Duration::from_millis(10)).is_some());
    }

    #[test]
    fn a_shared_hold_does_not_wait_for_a_waiting_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let db = MetaDb::new(Database::create(dir.path().join("m.redb")).unwrap());
        let outer = db.hold();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| db.exclusive(Duration::from_millis(300)).is_some());
            std::thread::sleep(Duration::from_millis(50));
            // The compaction is waiting now; a nested hold must not block.
            let inner = db.hold().begin_read().unwrap();
            drop(inner);
            drop(outer);
            assert!(waiter.join().unwrap());
        });
    }
}
