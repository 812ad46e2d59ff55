//! `GET /v1/runs`: a tenant's runs, by run id, narrowed by status, label and creation time.

use actix_web::{HttpRequest, HttpResponse};
use runguard_contract::{RunStatus, Timestamp};
use runguard_engine::RunLimits;
use runguard_store::StoredRun;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

use crate::auth::Role;
use crate::error::ApiError;
use crate::http::errors::store_error;
use crate::http::views::{RunView, shown_status};
use crate::http::{PageQuery, State, list_page, query};
use crate::shared::now;

/// The query of `GET /v1/runs`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunsQuery {
    /// Only runs with this status (a running run past its TTL counts as `expired`).
    #[schemars(with = "Option<RunStatus>")]
    status: Option<String>,
    /// Only runs carrying this label: `key` (any value) or `key=value`.
    #[schemars(length(min = 1))]
    label: Option<String>,
    /// Created at or after (RFC 3339).
    #[schemars(with = "Option<Timestamp>")]
    since: Option<String>,
    /// Created before (RFC 3339).
    #[schemars(with = "Option<Timestamp>")]
    until: Option<String>,
    /// At most this many (1–1000, default 100).
    #[schemars(with = "Option<u32>", range(min = 1, max = 1000))]
    limit: Option<String>,
    /// From a previous page's `next_cursor`; opaque: a cursor the list did not give is refused (400).
    #[schemars(length(min = 1))]
    cursor: Option<String>,
}

/// What a page keeps: every given filter must hold.
#[derive(Clone, Debug)]
struct RunFilter {
    status: Option<RunStatus>,
    /// A label key, and the value it must have (any value when `None`).
    label: Option<(String, Option<String>)>,
    /// Created at or after (inclusive).
    since: Option<Timestamp>,
    /// Created before (exclusive).
    until: Option<Timestamp>,
    /// A running run past its TTL at `now` is shown `expired`, as `GET /v1/runs/{id}` shows it.
    expires: RunLimits,
    now: Timestamp,
}

impl RunFilter {
    fn status(&self, run: &StoredRun) -> RunStatus {
        shown_status(run, &self.expires, self.now)
    }

    fn keeps(&self, run: &StoredRun) -> bool {
        self.status.is_none_or(|status| self.status(run) == status)
            && self.since.is_none_or(|since| run.created_at >= since)
            && self.until.is_none_or(|until| run.created_at < until)
            && self.label.as_ref().is_none_or(|(key, value)| match (run.labels.get(key), value) {
                (Some(have), Some(want)) => have == want,
                (Some(_), None) => true,
                (None, _) => false,
            })
    }

    /// The run as `GET /v1/runs/{id}` answers it.
    fn view(&self, mut run: StoredRun) -> RunView {
        run.status = self.status(&run);
        let steps_seen = run.next.index;
        RunView::new(run, Some(steps_seen))
    }
}

fn status(text: &str) -> Result<RunStatus, ApiError> {
    runguard_contract::error::from_json_value(Value::String(text.to_owned())).map_err(|_| {
        ApiError::bad_request(
            "status",
            format!("`{text}` is not a run status (`running`, `stopped`, `succeeded`, `failed` or `expired`)"),
        )
    })
}

fn label(text: &str) -> Result<(String, Option<String>), ApiError> {
    let (key, value) = match text.split_once('=') {
        Some((key, value)) => (key, Some(value.to_owned())),
        None => (text, None),
    };
    if key.is_empty() {
        return Err(ApiError::bad_request("label", "names no key: give `key` or `key=value`"));
    }
    Ok((key.to_owned(), value))
}

fn time(field: &str, text: Option<&str>) -> Result<Option<Timestamp>, ApiError> {
    text.map(|t| Timestamp::parse(t).map_err(|e| ApiError::bad_request(field, e.message()))).transpose()
}

/// `GET /v1/runs?status=&label=&since=&until=&limit=&cursor=`.
pub async fn list(state: State, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let caller = state.caller(&req, Role::Worker)?;
    let q: RunsQuery = query(&req)?;
    let page = PageQuery { limit: q.limit, cursor: q.cursor }.page()?;
    let filter = RunFilter {
        status: q.status.as_deref().map(status).transpose()?,
        label: q.label.as_deref().map(label).transpose()?,
        since: time("since", q.since.as_deref())?,
        until: time("until", q.until.as_deref())?,
        expires: state.shared.config.run_limits(),
        now: now(),
    };
    let tenant = caller.tenant.clone();
    list_page(&state, &caller.tenant, move |store| {
        let page = store.list_runs_where(&tenant, &page, &|run| filter.keeps(run)).map_err(store_error)?;
        let items = page.items.into_iter().map(|run| filter.view(run)).collect();
        Ok(runguard_store::Page { items, next_cursor: page.next_cursor })
    })
    .await
}
