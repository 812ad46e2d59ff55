//! Reading and parsing request bodies with our own limit and errors (413 and 400 with JSON bodies).

use actix_web::HttpRequest;
use actix_web::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use actix_web::web::{Bytes, BytesMut, Payload};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Reads the body, refusing more than `limit` bytes (413) before buffering them.
pub async fn read_body(req: &HttpRequest, mut payload: Payload, limit: usize) -> Result<Bytes, ApiError> {
    if let Some(length) =
        req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok())
        && length > limit
    {
        return Err(ApiError::too_large(limit));
    }
    if let Some(content_type) = req.headers().get(CONTENT_TYPE)
        && !is_json(content_type.to_str().unwrap_or_default())
    {
        return Err(ApiError::unsupported_media_type());
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| ApiError::bad_request("", "the request body could not be read"))?;
        if body.len().saturating_add(chunk.len()) > limit {
            return Err(ApiError::too_large(limit));
        }
        body.extend_from_slice(&chunk);
    }
    // A body must say it is JSON; a call without one (no `Content-Type`, nothing sent) is read as `{}`.
    if !req.headers().contains_key(CONTENT_TYPE) && !body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::unsupported_media_type());
    }
    Ok(body.freeze())
}

/// Whether a `Content-Type` names JSON: exactly `application/json`, parameters allowed (`docs/api.md`).
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default();
    essence.trim().eq_ignore_ascii_case("application/json")
}

/// Parses JSON with the contract's path-reporting errors; an empty body is parsed as `{}`.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { body };
    Ok(runguard_contract::from_json_slice(body)?)
}

#[cfg(test)]
mod tests {
    use super::is_json;

    #[test]
    fn only_json_media_types_are_json() {
        for json in
            ["application/json", "Application/JSON", "application/json; charset=utf-8", " application/json ;x=1"]
        {
            assert!(is_json(json), "{json}");
        }
        for other in ["application/jsonfoo", "application/json-seq", "text/plain", "", "application/x-json"] {
            assert!(!is_json(other), "{other}");
        }
    }
}
