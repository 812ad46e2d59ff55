//! The OpenAPI 3.1 document served at `/openapi.json`, rendered from the route table
//! ([`crate::http::routes::ROUTES`]) that also builds the router, so that no route is served undocumented
//! or documented unserved. Schemas come from the wire types (`schemars`, JSON Schema 2020-12, which
//! OpenAPI 3.1 uses as it is): what the node reads is described as it deserialises, what it answers as it
//! serialises.

use schemars::{Schema, SchemaGenerator};
use serde_json::{Map, Value, json};

use crate::auth::Role;
use crate::http::route::{Content, Operation, SchemaFn};
use crate::http::routes::ROUTES;
use crate::http::views::ErrorBody;

/// What an error status means, in every operation that can answer it.
fn error_description(status: u16) -> &'static str {
    match status {
        400 => "invalid JSON, field, query parameter or `X-Tenant` (`details.field` names it)",
        401 => "missing or unknown token",
        403 => "the token's role is too low, or `X-Tenant` from a caller that is not an admin",
        404 => "unknown, or another tenant's",
        408 => "the body did not arrive within `http.body_timeout_ms` (the connection closes)",
        409 => "conflict: order, stopped run, idempotency mismatch, version race or duplicate",
        413 => "the body is over `limits.body_bytes`",
        415 => "a body whose `Content-Type` is not `application/json`",
        429 => "the run has too many calls in flight: treat the call as a block and retry after `Retry-After`",
        503 => {
            "the node cannot answer now (store, writer, registry, answer budget or readiness): treat the call as a block and retry after `Retry-After`"
        }
        _ => "error",
    }
}

fn error_response(status: u16) -> Value {
    let mut response = json!({
        "description": error_description(status),
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } },
    });
    if matches!(status, 429 | 503) {
        response["headers"] = json!({ "Retry-After": {
            "description": "seconds to wait before retrying",
            "required": true,
            "schema": { "type": "integer", "minimum": 0 },
        } });
    }
    response
}

/// Removes `null` from a schema: a query parameter is absent, never null.
fn not_null(mut schema: Value) -> Value {
    if let Some(types) = schema.get_mut("type").and_then(Value::as_array_mut) {
        types.retain(|t| t != "null");
        if let [only] = types.as_slice() {
            schema["type"] = only.clone();
        }
    }
    let Some(object) = schema.as_object_mut() else { return schema };
    if let Some(Value::Array(mut options)) = object.remove("anyOf") {
        options.retain(|option| option.get("type").is_none_or(|t| t != "null"));
        match options.pop() {
            Some(Value::Object(only)) if options.is_empty() => {
                for (key, value) in only {
                    object.entry(key).or_insert(value);
                }
            }
            Some(last) => {
                options.push(last);
                object.insert("anyOf".into(), Value::Array(options));
            }
            None => {}
        }
    }
    schema
}

/// The query parameters of a query type: one per property.
fn query_parameters(query: SchemaFn, requests: &mut SchemaGenerator) -> Vec<Value> {
    let schema = request_schema(query, requests).to_value();
    let required: Vec<&str> =
        schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else { return Vec::new() };
    properties
        .iter()
        .map(|(name, property)| {
            let mut property = not_null(property.clone());
            let description = property.as_object_mut().and_then(|p| p.remove("description"));
            let mut parameter = json!({
                "name": name,
                "in": "query",
                "required": required.contains(&name.as_str()),
                "schema": property,
            });
            if let Some(description) = description {
                parameter["description"] = description;
            }
            parameter
        })
        .collect()
}

/// A request schema, inlined: the integer bound the generator applies to definitions is applied here.
fn request_schema(schema: SchemaFn, requests: &mut SchemaGenerator) -> Schema {
    let mut schema = schema(requests);
    runguard_contract::schema::bound_integers_within(&mut schema);
    schema
}

fn operation(route: &Operation, requests: &mut SchemaGenerator, answers: &mut SchemaGenerator) -> Value {
    let mut responses = Map::new();
    for success in route.success {
        let content = match success.content {
            Content::Json(schema) => json!({ "application/json": { "schema": schema(answers) } }),
            Content::Text(media_type) => json!({ media_type: { "schema": { "type": "string" } } }),
        };
        let mut response = json!({ "description": success.description, "content": content });
        if !route.links.is_empty() {
            let links: Map<String, Value> = route
                .links
                .iter()
                .map(|link| {
                    (
                        link.operation_id.to_owned(),
                        json!({ "operationId": link.operation_id,
                                "parameters": { "id": format!("$response.body#{}", link.id_at) } }),
                    )
                })
                .collect();
            response["links"] = Value::Object(links);
        }
        responses.insert(success.status.to_string(), response);
    }
    for status in route.errors {
        responses.insert(status.to_string(), error_response(*status));
    }
    let mut parameters = Vec::new();
    if route.path.contains("{id}") {
        parameters.push(json!({ "name": "id", "in": "path", "required": true,
            "schema": { "type": "string", "pattern": runguard_contract::ids::ID_PATTERN } }));
    }
    if route.role.is_some() {
        parameters.push(json!({ "name": "X-Tenant", "in": "header", "required": false,
            "description": "admins only: act for this tenant",
            "schema": { "type": "string", "pattern": runguard_contract::ids::ID_PATTERN } }));
    }
    if let Some(query) = route.query {
        parameters.extend(query_parameters(query, requests));
    }
    let mut operation = json!({
        "operationId": route.operation_id,
        "tags": [route.tag],
        "summary": route.summary,
        "x-runguard-role": route.role.map_or("none", Role::as_str),
        "responses": responses,
    });
    if !parameters.is_empty() {
        operation["parameters"] = Value::Array(parameters);
    }
    if let Some(body) = route.body {
        operation["requestBody"] = json!({
            "required": body.required,
            "content": { "application/json": { "schema": request_schema(body.schema, requests) } },
        });
    }
    operation["security"] = if route.role.is_some() { json!([{ "bearer": [] }]) } else { json!([]) };
    operation
}

/// The document as served, rendered once.
pub fn rendered() -> &'static str {
    static RENDERED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RENDERED.get_or_init(|| document().to_string())
}

/// The document.
pub fn document() -> Value {
    let mut requests = {
        let mut settings = runguard_contract::schema::settings(false);
        settings.inline_subschemas = true;
        settings.meta_schema = None;
        settings.into_generator()
    };
    let mut answers = {
        let mut settings = runguard_contract::schema::settings(true);
        settings.definitions_path = "/components/schemas".into();
        settings.meta_schema = None;
        settings.into_generator()
    };
    answers.subschema_for::<ErrorBody>();
    let mut paths = Map::new();
    for route in ROUTES.iter().filter(|route| route.documented) {
        let item = paths.entry(route.path.to_owned()).or_insert_with(|| json!({}));
        item[route.method.key()] = operation(route, &mut requests, &mut answers);
    }
    json!({
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "runguard",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Policy prevention node for LLM agent runs. Clients treat every non-2xx answer to a step call as a block.",
        },
        "tags": [
            { "name": "policies", "description": "Policies, their modes, versions, audit and graduation" },
            { "name": "runs", "description": "Runs, step calls and decisions" },
            { "name": "records", "description": "Prevention records and snapshots" },
            { "name": "learning", "description": "Incidents, patterns, tenant graduation and simulation" },
            { "name": "operations", "description": "Health, readiness, metrics and this document" },
        ],
        "paths": paths,
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": answers.take_definitions(true),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reference_resolves_and_every_operation_is_unique() {
        let doc = document();
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().cloned().unwrap_or_default();
        for reference in text.split("\"$ref\":\"").skip(1) {
            let target = reference.split('"').next().unwrap_or_default();
            let name = target.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("ref {target}"));
            assert!(schemas.contains_key(name), "{target} does not resolve");
        }
        let mut ids: Vec<&str> = ROUTES.iter().map(|route| route.operation_id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), ROUTES.len(), "operationIds repeat");
    }
}
