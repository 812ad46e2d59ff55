//! Pagination and the record query.

use runguard_contract::{PolicyId, RunId, TenantId, Timestamp};

use crate::error::StoreError;

/// The largest page a query returns.
pub const MAX_PAGE_LIMIT: usize = 1000;
/// The page size when none is asked for.
pub const DEFAULT_PAGE_LIMIT: usize = 100;

/// Which page of a list to read: at most `limit` items after `cursor`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// 1 to [`MAX_PAGE_LIMIT`].
    pub limit: usize,
    /// The `next_cursor` of the previous page; `None` for the first page.
    pub cursor: Option<String>,
}

impl Default for PageRequest {
    fn default() -> Self {
        Self { limit: DEFAULT_PAGE_LIMIT, cursor: None }
    }
}

impl PageRequest {
    /// The first page with `limit` items.
    pub fn first(limit: usize) -> Self {
        Self { limit, cursor: None }
    }

    /// The page after `cursor`.
    pub fn after(limit: usize, cursor: impl Into<String>) -> Self {
        Self { limit, cursor: Some(cursor.into()) }
    }

    pub(crate) fn checked_limit(&self) -> Result<usize, StoreError> {
        if self.limit == 0 || self.limit > MAX_PAGE_LIMIT {
            return Err(StoreError::invalid(format!(
                "limit {} is out of range, it must be between 1 and {MAX_PAGE_LIMIT}",
                self.limit
            )));
        }
        Ok(self.limit)
    }

    /// The decoded cursor key, which must lie under `prefix`.
    pub(crate) fn cursor_key(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(cursor) = &self.cursor else { return Ok(None) };
        let bad = || StoreError::invalid(format!("`{cursor}` is not a cursor this list gave"));
        let key = hex::decode(cursor).map_err(|_| bad())?;
        if !key.starts_with(prefix) || key.len() == prefix.len() {
            return Err(bad());
        }
        Ok(Some(key))
    }
}

/// One page of a list: `{"items": […], "next_cursor": …}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T> {
    /// The items, in list order.
    pub items: Vec<T>,
    /// Where the next page starts; `None` when this is the last page.
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// An empty last page.
    pub fn empty() -> Self {
        Self { items: Vec::new(), next_cursor: None }
    }
}

/// Every item of a paginated list: calls `fetch` with the largest pages, following `next_cursor` to the
/// end. For internal readers (snapshot capture, graduation) that need the whole list.
pub fn all_pages<T>(
    mut fetch: impl FnMut(&PageRequest) -> Result<Page<T>, crate::StoreError>,
) -> Result<Vec<T>, crate::StoreError> {
    let mut out = Vec::new();
    let mut page = PageRequest::first(MAX_PAGE_LIMIT);
    loop {
        let got = fetch(&page)?;
        out.extend(got.items);
        match got.next_cursor {
            Some(cursor) => page = PageRequest::after(MAX_PAGE_LIMIT, cursor),
            None => return Ok(out),
        }
    }
}

/// `GET /v1/prevention-records`: a tenant's records, optionally narrowed.
///
/// Live and simulated records are listed separately: `simulated: false` (the default) lists live records
/// only, `simulated: true` only the records persisted by simulations. Without `run_id` the list is
/// ordered by `prevented_at`, then `seq`; with `run_id` by `seq`. `since` is inclusive, `until` exclusive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordQuery {
    /// The caller's tenant.
    pub tenant: TenantId,
    /// Only records of this policy.
    pub policy_id: Option<PolicyId>,
    /// Only records of this run.
    pub run_id: Option<RunId>,
    /// Only records prevented at or after this time.
    pub since: Option<Timestamp>,
    /// Only records prevented before this time.
    pub until: Option<Timestamp>,
    /// List simulated records instead of live ones.
    pub simulated: bool,
    /// Which page.
    pub page: PageRequest,
}

impl RecordQuery {
    /// All live records of `tenant`, first page of the default size.
    pub fn tenant(tenant: TenantId) -> Self {
        Self {
            tenant,
            policy_id: None,
            run_id: None,
            since: None,
            until: None,
            simulated: false,
            page: PageRequest::default(),
        }
    }
}

/// The smallest key greater than every key starting with `prefix` (`None`: no upper bound).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last.saturating_add(1));
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_bounds_the_prefix() {
        assert_eq!(prefix_end(b"ab\0"), Some(b"ab\x01".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff]), None);
    }

    #[test]
    fn limits_and_cursors_are_checked() {
        assert!(PageRequest::first(0).checked_limit().is_err());
        assert!(PageRequest::first(1001).checked_limit().is_err());
        assert_eq!(PageRequest::first(1000).checked_limit().unwrap(), 1000);
        let err = PageRequest::after(5, "zz").cursor_key(b"a").unwrap_err();
        assert_eq!(err.message(), "`zz` is not a cursor this list gave", "{err}");
        assert!(PageRequest::after(5, hex::encode(b"b1")).cursor_key(b"a").is_err());
        assert_eq!(PageRequest::after(5, hex::encode(b"a1")).cursor_key(b"a").unwrap(), Some(b"a1".to_vec()));
    }
}
