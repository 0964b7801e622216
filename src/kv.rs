//! The key-value store interface the pools are written against: bounded ranges and guarded
//! transactions (compare-and-swap). etcd implements it for real; an in-memory store implements
//! it for the unit tests of the allocation logic.

use std::fmt;

/// etcd's default `--max-txn-ops`: no list of a transaction may be longer.
pub const MAX_TXN_OPS: usize = 128;

/// One key and what the store holds for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
    /// Revision of the last change to this key; guards a later compare-and-swap.
    pub mod_revision: i64,
}

/// A read of the keys in `[start, end)`, or of `start` alone when `end` is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub start: String,
    pub end: String,
    /// At most this many keys come back; 0 means all.
    pub limit: u64,
    /// Skip the values (cheaper when only the keys matter).
    pub keys_only: bool,
}

impl Range {
    /// The single key `key`.
    pub fn key(key: impl Into<String>) -> Range {
        Range {
            start: key.into(),
            end: String::new(),
            limit: 0,
            keys_only: false,
        }
    }

    /// Every key that starts with `prefix`.
    pub fn prefix(prefix: impl Into<String>) -> Range {
        let start = prefix.into();
        let end = prefix_end(&start);
        Range {
            start,
            end,
            limit: 0,
            keys_only: false,
        }
    }

    /// Keys in `[start, end)`.
    pub fn between(start: impl Into<String>, end: impl Into<String>) -> Range {
        Range {
            start: start.into(),
            end: end.into(),
            limit: 0,
            keys_only: false,
        }
    }

    pub fn limit(mut self, limit: u64) -> Range {
        self.limit = limit;
        self
    }

    pub fn keys_only(mut self) -> Range {
        self.keys_only = true;
        self
    }
}

/// The smallest key greater than every key that starts with `prefix` (its last byte plus one),
/// as etcd's `range_end` wants it. Prefixes here are ASCII paths, so the last byte is never 0xff.
pub fn prefix_end(prefix: &str) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    match bytes.last_mut() {
        Some(last) if *last < 0x7f => {
            *last += 1;
            String::from_utf8_lossy(&bytes).into_owned()
        }
        // Only reachable with a non-ASCII or empty prefix: "\0" asks etcd for every key.
        _ => "\0".to_string(),
    }
}

/// A condition a transaction checks before choosing its branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key exists.
    Exists(String),
    /// The key does not exist.
    Absent(String),
    /// The key was last changed at this revision (it is unchanged since it was read).
    ModRevision(String, i64),
    /// The key holds exactly this value.
    Value(String, String),
    /// No key exists in `[start, end)`, `end` read as etcd reads a `range_end` (empty: `start`
    /// alone; NUL: every key from `start` on). etcd compares a range since 3.3; 3.2 would
    /// compare `start` alone, so a store that cannot compare ranges refuses this
    /// (`Kv::compares_ranges` tells beforehand).
    NoKeyIn { start: String, end: String },
}

/// One operation of a transaction branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: String },
    Delete { key: String },
    Range(Range),
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<String>) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
        }
    }

    pub fn delete(key: impl Into<String>) -> Op {
        Op::Delete { key: key.into() }
    }
}

/// If every compare holds, run `success`, otherwise run `failure`; atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

/// What a transaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxnOutcome {
    /// Whether every compare held (and so `success` ran).
    pub succeeded: bool,
    /// The results of the `Range` ops of the branch that ran, in their order.
    pub ranges: Vec<Vec<KeyValue>>,
}

impl TxnOutcome {
    /// The result of the `n`th range op of the branch that ran; empty if there was none.
    pub fn range(&self, n: usize) -> &[KeyValue] {
        self.ranges.get(n).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// Why the store could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// No endpoint of the store answered in time; nothing was changed.
    Unreachable(String),
    /// A write was sent but no answer came back (a timeout after sending, etcd stopping or
    /// losing its leader): it may or may not have been applied, now or later.
    OutcomeUnknown(String),
    /// The store answered, with an error.
    Failed(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Unreachable(why) => write!(f, "etcd unreachable: {why}"),
            StoreError::OutcomeUnknown(why) => {
                write!(f, "etcd did not answer whether it applied a change: {why}")
            }
            StoreError::Failed(why) => write!(f, "etcd error: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// A store with bounded ranges and compare-and-swap transactions.
pub trait Kv {
    fn range(&self, range: &Range) -> Result<Vec<KeyValue>, StoreError>;
    fn txn(&self, txn: &Txn) -> Result<TxnOutcome, StoreError>;

    /// Whether transactions may use `Compare::NoKeyIn`.
    fn compares_ranges(&self) -> Result<bool, StoreError> {
        Ok(true)
    }

    /// The keys the original tool's keyspace (etcd v2) holds under `prefix` (`mod_revision`
    /// being v2's modifiedIndex), so that a pool it defined is not defined again blindly;
    /// `None` when that keyspace cannot be read. A store without one holds nothing there.
    fn original_keys(&self, _prefix: &str) -> Result<Option<Vec<KeyValue>>, StoreError> {
        Ok(Some(Vec::new()))
    }
}

impl<K: Kv + ?Sized> Kv for &K {
    fn range(&self, range: &Range) -> Result<Vec<KeyValue>, StoreError> {
        (**self).range(range)
    }
    fn txn(&self, txn: &Txn) -> Result<TxnOutcome, StoreError> {
        (**self).txn(txn)
    }
    fn compares_ranges(&self) -> Result<bool, StoreError> {
        (**self).compares_ranges()
    }
    fn original_keys(&self, prefix: &str) -> Result<Option<Vec<KeyValue>>, StoreError> {
        (**self).original_keys(prefix)
    }
}

#[cfg(test)]
pub mod memory {
    //! An in-memory `Kv` with etcd's semantics, for unit tests of the logic above the store.

    use super::*;
    use std::cell::{Cell, RefCell};
    use std::collections::{BTreeMap, VecDeque};
    use std::ops::Bound;

    /// A failure the next call meets instead of its normal answer.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Fault {
        /// None: the call is answered as usual.
        Pass,
        /// Nothing reaches the store: `Unreachable`, nothing changed.
        Down,
        /// A transaction is applied but its answer is lost: `OutcomeUnknown`.
        AppliedUnanswered,
        /// A transaction is lost before it is applied, and so is its answer: `OutcomeUnknown`.
        LostUnanswered,
    }

    pub struct MemKv {
        data: RefCell<BTreeMap<String, (String, i64)>>,
        revision: Cell<i64>,
        /// How many calls were made: the unit tests count round trips.
        pub calls: Cell<u64>,
        /// Keys and values of the original tool's v2 keyspace; `None`: not served.
        pub original: RefCell<Option<Vec<(String, String)>>>,
        /// Failures met by the next calls, one each, in order.
        pub faults: RefCell<VecDeque<Fault>>,
    }

    impl Default for MemKv {
        fn default() -> MemKv {
            MemKv {
                data: RefCell::default(),
                revision: Cell::default(),
                calls: Cell::default(),
                original: RefCell::new(Some(Vec::new())),
                faults: RefCell::default(),
            }
        }
    }

    impl MemKv {
        pub fn new() -> MemKv {
            MemKv::default()
        }

        /// Writes `key` into the original's v2 keyspace.
        pub fn original_put(&self, key: &str, value: &str) {
            if let Some(keys) = self.original.borrow_mut().as_mut() {
                keys.push((key.into(), value.into()));
            }
        }

        /// The next `n` calls meet `fault`, after those already queued.
        pub fn fail_next(&self, n: usize, fault: Fault) {
            self.faults
                .borrow_mut()
                .extend(std::iter::repeat(fault).take(n));
        }

        fn next_fault(&self) -> Option<Fault> {
            self.faults.borrow_mut().pop_front()
        }

        /// Every key and value, for before/after comparisons.
        pub fn dump(&self) -> Vec<(String, String)> {
            self.data
                .borrow()
                .iter()
                .map(|(k, (v, _))| (k.clone(), v.clone()))
                .collect()
        }

        fn read(&self, r: &Range) -> Vec<KeyValue> {
            let data = self.data.borrow();
            let rows = data.iter().filter(|(k, _)| {
                if r.end.is_empty() {
                    **k == r.start
                } else {
                    k.as_str() >= r.start.as_str() && k.as_str() < r.end.as_str()
                }
            });
            let limit = if r.limit == 0 {
                usize::MAX
            } else {
                r.limit as usize
            };
            rows.take(limit)
                .map(|(k, (v, rev))| KeyValue {
                    key: k.clone(),
                    value: if r.keys_only {
                        String::new()
                    } else {
                        v.clone()
                    },
                    mod_revision: *rev,
                })
                .collect()
        }

        fn holds(&self, c: &Compare) -> bool {
            let data = self.data.borrow();
            match c {
                Compare::Exists(k) => data.contains_key(k),
                Compare::Absent(k) => !data.contains_key(k),
                Compare::ModRevision(k, rev) => data.get(k).map(|e| e.1) == Some(*rev),
                Compare::Value(k, value) => data.get(k).is_some_and(|e| e.0 == *value),
                Compare::NoKeyIn { start, end } => {
                    // As etcd reads `range_end`: empty is `start` alone, NUL every key from
                    // `start` on, and a reversed range nothing (BTreeMap::range would panic).
                    let upper = match end.as_str() {
                        "" => return !data.contains_key(start),
                        "\0" => Bound::Unbounded,
                        end if end <= start.as_str() => return true,
                        end => Bound::Excluded(end),
                    };
                    data.range::<str, _>((Bound::Included(start.as_str()), upper))
                        .next()
                        .is_none()
                }
            }
        }
    }

    impl Kv for MemKv {
        fn range(&self, range: &Range) -> Result<Vec<KeyValue>, StoreError> {
            self.calls.set(self.calls.get() + 1);
            if self.next_fault().is_some_and(|f| f != Fault::Pass) {
                return Err(StoreError::Unreachable("injected fault".into()));
            }
            Ok(self.read(range))
        }

        fn original_keys(&self, prefix: &str) -> Result<Option<Vec<KeyValue>>, StoreError> {
            Ok(self.original.borrow().as_ref().map(|keys| {
                keys.iter()
                    .filter(|(k, _)| k.starts_with(prefix))
                    .map(|(k, v)| KeyValue {
                        key: k.clone(),
                        value: v.clone(),
                        mod_revision: 1,
                    })
                    .collect()
            }))
        }

        fn txn(&self, txn: &Txn) -> Result<TxnOutcome, StoreError> {
            self.calls.set(self.calls.get() + 1);
            match self.next_fault() {
                None | Some(Fault::Pass) => self.apply(txn),
                Some(Fault::Down) => Err(StoreError::Unreachable("injected fault".into())),
                Some(Fault::LostUnanswered) => {
                    Err(StoreError::OutcomeUnknown("injected fault".into()))
                }
                Some(Fault::AppliedUnanswered) => {
                    self.apply(txn)?;
                    Err(StoreError::OutcomeUnknown("injected fault".into()))
                }
            }
        }
    }

    impl MemKv {
        fn apply(&self, txn: &Txn) -> Result<TxnOutcome, StoreError> {
            // etcd refuses the whole request, as here, when any list is over its limit.
            let longest = [txn.compares.len(), txn.success.len(), txn.failure.len()];
            if longest.iter().any(|n| *n > MAX_TXN_OPS) {
                return Err(StoreError::Failed(
                    "etcdserver: too many operations in txn request".into(),
                ));
            }
            let succeeded = txn.compares.iter().all(|c| self.holds(c));
            let ops = if succeeded {
                &txn.success
            } else {
                &txn.failure
            };
            let revision = self.revision.get() + 1;
            let mut outcome = TxnOutcome {
                succeeded,
                ranges: Vec::new(),
            };
            for op in ops {
                match op {
                    Op::Put { key, value } => {
                        self.data
                            .borrow_mut()
                            .insert(key.clone(), (value.clone(), revision));
                        self.revision.set(revision);
                    }
                    Op::Delete { key } => {
                        self.data.borrow_mut().remove(key);
                        self.revision.set(revision);
                    }
                    Op::Range(r) => outcome.ranges.push(self.read(r)),
                }
            }
            Ok(outcome)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::memory::MemKv;
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(
            prefix_end("/talkingdata/hosts/pool/"),
            "/talkingdata/hosts/pool0"
        );
        assert_eq!(prefix_end("/a/198.18.5."), "/a/198.18.5/");
    }

    #[test]
    fn memory_txn_takes_one_branch() {
        let kv = MemKv::new();
        let put = Txn {
            compares: vec![Compare::Absent("k".into())],
            success: vec![Op::put("k", "v")],
            failure: vec![Op::Range(Range::key("k"))],
        };
        assert!(kv.txn(&put).unwrap().succeeded);
        let again = kv.txn(&put).unwrap();
        assert!(!again.succeeded);
        assert_eq!(again.range(0)[0].value, "v");
    }

    /// A store holding the key `a/5` alone.
    fn holding_a5() -> MemKv {
        let kv = MemKv::new();
        kv.txn(&Txn {
            success: vec![Op::put("a/5", "")],
            ..Txn::default()
        })
        .unwrap();
        kv
    }

    /// Whether a transaction comparing `NoKeyIn { start, end }` succeeds on `kv`.
    fn no_key_in(kv: &MemKv, start: &str, end: &str) -> bool {
        kv.txn(&Txn {
            compares: vec![Compare::NoKeyIn {
                start: start.into(),
                end: end.into(),
            }],
            ..Txn::default()
        })
        .unwrap()
        .succeeded
    }

    #[test]
    fn memory_no_key_in_reads_start_to_end_exclusive() {
        let kv = holding_a5();
        let empty = |start: &str, end: &str| no_key_in(&kv, start, end);
        assert!(!empty("a/1", "a/9"));
        assert!(!empty("a/5", "a/5\0"));
        assert!(empty("a/1", "a/5"));
        assert!(empty("a/6", "a/9"));
        assert!(empty("a/9", "a/1"));
        assert!(!empty("a/1", "\0"));
        assert!(empty("a/6", "\0"));
    }

    /// etcd reads an empty `range_end` as "this key alone" (tests/etcd_client.rs
    /// `an_empty_range_end_compares_the_start_key_alone`, etcd 3.4.23), and the client sends
    /// `NoKeyIn`'s `end` as it is: the in-memory store must answer the same, not "empty span".
    #[test]
    fn memory_no_key_in_with_an_empty_end_compares_the_start_key_as_etcd_does() {
        let kv = holding_a5();
        let empty = |start: &str| no_key_in(&kv, start, "");
        assert!(empty("a/1"));
        assert!(!empty("a/5"), "etcd finds a/5 there");
    }

    #[test]
    fn memory_txn_enforces_etcds_operation_limit() {
        let kv = MemKv::new();
        let puts = |n: usize| Txn {
            success: (0..n).map(|i| Op::put(format!("k{i}"), "")).collect(),
            ..Txn::default()
        };
        assert!(kv.txn(&puts(MAX_TXN_OPS)).is_ok());
        assert_eq!(
            kv.txn(&puts(MAX_TXN_OPS + 1)),
            Err(StoreError::Failed(
                "etcdserver: too many operations in txn request".into()
            ))
        );
    }
}
