//! API errors: every error answer is `{"error": {"code", "message", "details"}}` with its status.

use actix_web::http::StatusCode;
use actix_web::http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use actix_web::{HttpResponse, ResponseError};
use runguard_contract::ValidationError;
use serde_json::{Value, json};

/// An error answered to a client. Messages never carry stack traces or internal detail.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// Stable machine-readable code, e.g. `step_out_of_order`.
    pub code: &'static str,
    /// A sentence for humans.
    pub message: String,
    /// Structured details (`field` for 400s, `expected` for order errors, …).
    pub details: Value,
    /// Seconds to wait, for 429 and 503.
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), details: json!({}), retry_after_s: None }
    }

    /// Adds structured details.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }

    /// 400 for a field (its JSON path).
    pub fn bad_request(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        let text = if field.is_empty() { message } else { format!("`{field}` {message}") };
        Self::new(400, "invalid_request", text).with_details(json!({ "field": field }))
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(401, "unauthorized", message)
    }

    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "forbidden", message)
    }

    /// 404 for an unknown (or another tenant's) object.
    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(404, "not_found", format!("{what} `{id}` not found"))
    }

    /// 404 for an unknown path.
    pub fn no_route(path: &str) -> Self {
        Self::new(404, "not_found", format!("no endpoint at `{path}`"))
    }

    /// 405.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(405, "method_not_allowed", format!("`{method}` is not allowed on `{path}`"))
    }

    /// 408: the request body did not arrive in time.
    pub fn request_timeout(limit_ms: u64) -> Self {
        Self::new(408, "request_timeout", format!("the request body did not arrive within {limit_ms} ms"))
            .with_details(json!({ "limit_ms": limit_ms }))
    }

    /// 409.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(409, code, message)
    }

    /// 413.
    pub fn too_large(limit: usize) -> Self {
        Self::new(413, "body_too_large", format!("the request body exceeds the limit of {limit} bytes"))
            .with_details(json!({ "limit_bytes": limit }))
    }

    /// 415.
    pub fn unsupported_media_type() -> Self {
        Self::new(415, "unsupported_media_type", "send JSON (`Content-Type: application/json`)")
    }

    /// 429 with `Retry-After`.
    pub fn overloaded(message: impl Into<String>, retry_after_s: u64) -> Self {
        Self { retry_after_s: Some(retry_after_s), ..Self::new(429, "overloaded", message) }
    }

    /// 503 with `Retry-After`: the call was not acknowledged and must be treated as a block.
    pub fn unavailable(message: impl Into<String>, retry_after_s: u64) -> Self {
        Self { retry_after_s: Some(retry_after_s), ..Self::new(503, "unavailable", message) }
    }

    /// 500 without detail; the cause goes to the log only.
    pub fn internal() -> Self {
        Self::new(500, "internal", "internal error; the call was not acknowledged and must be treated as a block")
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({ "error": { "code": self.code, "message": self.message, "details": self.details } })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl From<ValidationError> for ApiError {
    fn from(err: ValidationError) -> Self {
        ApiError::bad_request(err.field(), err.message())
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        response.insert_header((CONTENT_TYPE, HeaderValue::from_static("application/json")));
        if let Some(seconds) = self.retry_after_s {
            response.insert_header((RETRY_AFTER, seconds.to_string()));
        }
        if self.status == 408 {
            // The rest of the body may still be on its way: the connection cannot carry another request.
            response.force_close();
        }
        response.body(self.body().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_code_message_and_details() {
        let err = ApiError::bad_request("usage.tokens", "must be an unsigned integer");
        assert_eq!(err.body()["error"]["details"]["field"], "usage.tokens");
        assert_eq!(err.body()["error"]["code"], "invalid_request");
        let resp = ApiError::unavailable("store down", 1).error_response();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers().get(RETRY_AFTER).unwrap(), "1");
    }
}
