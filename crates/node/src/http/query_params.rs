//! Query strings read strictly and answered in the project's words: an unknown or repeated parameter, or
//! a value of the wrong kind, is a 400 whose `details.field` names the parameter.

use actix_web::web;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Parses `query` into `T`, whose fields are the parameters the endpoint takes.
pub fn parse<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let pairs = web::Query::<Vec<(String, String)>>::from_query(query)
        .map_err(|_| ApiError::bad_request("", "the query string is not `name=value` pairs joined by `&`"))?
        .into_inner();
    let mut params = Map::new();
    for (name, value) in pairs {
        if params.contains_key(&name) {
            return Err(ApiError::bad_request(&name, "is given more than once"));
        }
        params.insert(name, Value::String(value));
    }
    runguard_contract::error::from_json_value(Value::Object(params)).map_err(|err| {
        let message = match err.message().strip_prefix("is not a known field (known: ") {
            Some(known) => format!("is not a parameter of this endpoint; it takes {}", known.trim_end_matches(')')),
            None if err.message().starts_with("is not a known field") => {
                "is not a parameter of this endpoint, which takes none".to_owned()
            }
            None => err.message().to_owned(),
        };
        ApiError::bad_request(err.field(), message)
    })
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::parse;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[expect(dead_code, reason = "only parsed")]
    struct Params {
        limit: Option<String>,
        cursor: Option<String>,
    }

    #[test]
    fn problems_name_the_parameter_in_our_words() {
        let err = parse::<Params>("limit=5&bogus=1").unwrap_err();
        assert_eq!(err.details["field"], "bogus");
        assert_eq!(err.message, "`bogus` is not a parameter of this endpoint; it takes `limit`, `cursor`");
        let err = parse::<Params>("limit=5&limit=6").unwrap_err();
        assert_eq!(
            (err.details["field"].as_str(), err.message.as_str()),
            (Some("limit"), "`limit` is given more than once")
        );
        assert!(parse::<Params>("limit=5&cursor=ab").is_ok());
        assert!(parse::<Params>("").is_ok());
        for err in [parse::<Params>("x=1").unwrap_err(), parse::<Params>("limit=1&x").unwrap_err()] {
            assert!(!err.message.to_lowercase().contains("deserialize"), "{}", err.message);
        }
    }
}
