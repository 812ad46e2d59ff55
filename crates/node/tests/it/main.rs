//! In-process tests of the node's HTTP layer (the black-box suite in `tests/` drives the real binary).

mod learning_isolation;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use actix::Actor;
use actix_web::{App, test as web_test, web};
use runguard_node::actors::learning::Learning;
use runguard_node::actors::registry::{Registry, RunTable};
use runguard_node::actors::writer::Writer;
use runguard_node::auth::Authenticator;
use runguard_node::config::Config;
use runguard_node::http::routes::ROUTES;
use runguard_node::http::{self, AppState};
use runguard_node::shared::Shared;
use runguard_store::{Store, StoreOptions};

/// Every route of the OpenAPI document is served by the router: none answers the router's own
/// "no endpoint" 404 or a 405.
#[actix_rt::test]
async fn every_documented_route_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), &StoreOptions { fsync: false, ..StoreOptions::default() }).unwrap());
    let writer = Writer::new(Arc::clone(&store), 64, 64).start();
    let shared = Arc::new(Shared::new(store, writer.recipient(), Config::default()));
    let learning = Learning::new(Arc::clone(&shared)).start();
    let runs = Arc::new(RunTable::default());
    let registry =
        Registry::new(Arc::clone(&shared), Arc::clone(&runs), learning.clone().recipient(), Vec::new()).start();
    let state = web::Data::new(AppState {
        shared,
        registry,
        runs,
        learning,
        auth: Authenticator::new(&[]),
        metrics: None,
        ready: AtomicBool::new(true),
        openapi: runguard_node::openapi::rendered(),
    });
    let app = web_test::init_service(App::new().app_data(state).configure(http::configure)).await;
    for route in ROUTES.iter().filter(|route| route.documented) {
        let path = route.path.replace("{id}", "x1");
        let method = actix_web::http::Method::from_bytes(route.method.key().to_uppercase().as_bytes()).unwrap();
        let req = web_test::TestRequest::default()
            .method(method)
            .uri(&path)
            .insert_header(("content-type", "application/json"))
            .set_payload("{}")
            .to_request();
        let resp = web_test::call_service(&app, req).await;
        let status = resp.status().as_u16();
        let body: serde_json::Value = serde_json::from_slice(&web_test::read_body(resp).await).unwrap_or_default();
        let unrouted = status == 405
            || (status == 404 && body["error"]["message"].as_str().is_some_and(|m| m.starts_with("no endpoint")));
        assert!(!unrouted, "{} {} is documented but not served ({status} {body})", route.method.key(), route.path);
    }
    let resp = web_test::call_service(&app, web_test::TestRequest::get().uri("/v1/nothing-here").to_request()).await;
    assert_eq!(resp.status(), 404);
}

/// The OpenAPI document lists every documented route of the table with its role, and nothing else.
#[test]
fn the_openapi_document_lists_every_route() {
    let doc = runguard_node::openapi::document();
    let mut documented = 0;
    for route in ROUTES.iter().filter(|route| route.documented) {
        let op = &doc["paths"][route.path][route.method.key()];
        let role = route.role.map_or("none", |role| role.as_str());
        assert_eq!(op["x-runguard-role"], role, "{} {}", route.method.key(), route.path);
        assert_eq!(op["operationId"], route.operation_id);
        documented += 1;
    }
    let operations: usize =
        doc["paths"].as_object().unwrap().values().map(|item| item.as_object().unwrap().len()).sum();
    assert_eq!(operations, documented);
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
}
