//! The OpenAPI 3.1 document served at `/openapi.json`, generated from the route table below. A test
//! checks that every route in the table is served by the app, so the two cannot drift apart.

use serde_json::{Map, Value, json};

/// One documented route.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    /// HTTP method, lower-case.
    pub method: &'static str,
    /// Path with `{id}` parameters.
    pub path: &'static str,
    /// The least role that may call it (`none` for operations endpoints).
    pub role: &'static str,
    /// What it does.
    pub summary: &'static str,
    /// The success status.
    pub status: u16,
}

/// Every route of the API.
pub const ROUTES: &[Route] = &[
    Route { method: "post", path: "/v1/policies", role: "operator", summary: "Create a policy", status: 201 },
    Route {
        method: "get",
        path: "/v1/policies",
        role: "operator",
        summary: "List policies (filter `mode`)",
        status: 200,
    },
    Route {
        method: "get",
        path: "/v1/policies/{id}",
        role: "operator",
        summary: "A policy; `?version=n` for an older version",
        status: 200,
    },
    Route {
        method: "put",
        path: "/v1/policies/{id}",
        role: "operator",
        summary: "Update a policy (body carries `expected_version`)",
        status: 200,
    },
    Route {
        method: "post",
        path: "/v1/policies/{id}/mode",
        role: "operator",
        summary: "Change a policy's mode (audited)",
        status: 200,
    },
    Route {
        method: "post",
        path: "/v1/policies/{id}/confirm",
        role: "operator",
        summary: "Confirm a policy",
        status: 200,
    },
    Route {
        method: "get",
        path: "/v1/policies/{id}/audit",
        role: "operator",
        summary: "Activation audit, oldest first",
        status: 200,
    },
    Route {
        method: "get",
        path: "/v1/policies/{id}/versions",
        role: "operator",
        summary: "Every version of a policy, oldest first",
        status: 200,
    },
    Route {
        method: "get",
        path: "/v1/policies/{id}/shadow-stats",
        role: "operator",
        summary: "Shadow statistics",
        status: 200,
    },
    Route {
        method: "get",
        path: "/v1/policies/{id}/graduation",
        role: "operator",
        summary: "Policy graduation gate",
        status: 200,
    },
    Route {
        method: "post",
        path: "/v1/runs",
        role: "worker",
        summary: "Create a run (idempotent on `run_id`)",
        status: 201,
    },
    Route {
        method: "get",
        path: "/v1/runs",
        role: "worker",
        summary: "List runs (filter `status`, `label`, `since`, `until`)",
        status: 200,
    },
    Route {
        method: "get",
        path: "/v1/runs/{id}",
        role: "worker",
        summary: "A run: status, totals, snapshot, termination",
        status: 200,
    },
    Route {
        method: "post",
        path: "/v1/runs/{id}/steps",
        role: "worker",
        summary: "A step call: answers a decision",
        status: 200,
    },
    Route { method: "post", path: "/v1/runs/{id}/end", role: "worker", summary: "End a run", status: 200 },
    Route {
        method: "get",
        path: "/v1/runs/{id}/decisions",
        role: "operator",
        summary: "A run's decisions in order",
        status: 200,
    },
    Route {
        method: "get",
        path: "/v1/snapshots/{id}",
        role: "operator",
        summary: "A snapshot with its policies and `verified`",
        status: 200,
    },
    Route {
        method: "get",
        path: "/v1/prevention-records",
        role: "operator",
        summary: "Prevention records (filters, cursor)",
        status: 200,
    },
    Route {
        method: "get",
        path: "/v1/prevention-records/{id}",
        role: "operator",
        summary: "One prevention record",
        status: 200,
    },
    Route {
        method: "post",
        path: "/v1/prevention-records/{id}/regret",
        role: "operator",
        summary: "Mark a record a false positive",
        status: 201,
    },
    Route { method: "get", path: "/v1/incidents", role: "operator", summary: "Incidents", status: 200 },
    Route { method: "get", path: "/v1/incidents/{id}", role: "operator", summary: "One incident", status: 200 },
    Route { method: "get", path: "/v1/patterns", role: "operator", summary: "Patterns", status: 200 },
    Route { method: "get", path: "/v1/patterns/{id}", role: "operator", summary: "One pattern", status: 200 },
    Route {
        method: "post",
        path: "/v1/patterns/{id}/propose",
        role: "operator",
        summary: "Propose a shadow pattern policy",
        status: 201,
    },
    Route { method: "get", path: "/v1/graduation", role: "operator", summary: "Tenant graduation level", status: 200 },
    Route {
        method: "post",
        path: "/v1/simulate",
        role: "operator",
        summary: "Replay runs against candidate policies",
        status: 200,
    },
    Route { method: "get", path: "/healthz", role: "none", summary: "Liveness", status: 200 },
    Route { method: "get", path: "/readyz", role: "none", summary: "Readiness", status: 200 },
    Route { method: "get", path: "/metrics", role: "none", summary: "Prometheus metrics", status: 200 },
    Route { method: "get", path: "/openapi.json", role: "none", summary: "This document", status: 200 },
];

fn error_response(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

/// The document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for route in ROUTES {
        let entry = paths.entry(route.path.to_owned()).or_insert_with(|| json!({}));
        let mut responses = Map::new();
        responses.insert(
            route.status.to_string(),
            json!({ "description": "success", "content": { "application/json": {} } }),
        );
        for (status, text) in [
            ("400", "invalid JSON or field (`details.field` names it)"),
            ("401", "missing or unknown token"),
            ("403", "role too low"),
            ("404", "unknown, or another tenant's"),
            ("409", "order, stopped run, idempotency mismatch or version race"),
            ("413", "body over the limit"),
            ("503", "store or writer unavailable: treat as block"),
        ] {
            responses.insert(status.to_owned(), error_response(text));
        }
        if matches!(route.method, "post" | "put") {
            responses.insert("408".to_owned(), error_response("the body did not arrive within `http.body_timeout_ms`"));
            responses.insert("415".to_owned(), error_response("the body's `Content-Type` is not `application/json`"));
        }
        let mut operation = json!({
            "summary": route.summary,
            "x-runguard-role": route.role,
            "responses": responses,
        });
        if route.path.contains("{id}") {
            operation["parameters"] =
                json!([{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }]);
        }
        if route.role != "none" {
            operation["security"] = json!([{ "bearer": [] }]);
        }
        if let Some(object) = entry.as_object_mut() {
            object.insert(route.method.to_owned(), operation);
        }
    }
    json!({
        "openapi": "3.1.0",
        "info": { "title": "runguard", "version": env!("CARGO_PKG_VERSION"),
                  "description": "Policy prevention node for LLM agent runs." },
        "paths": paths,
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": { "error": { "type": "object", "required": ["code", "message", "details"],
                        "properties": { "code": { "type": "string" }, "message": { "type": "string" }, "details": { "type": "object" } } } }
                }
            }
        }
    })
}
