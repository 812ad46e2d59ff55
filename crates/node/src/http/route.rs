//! What a route of the API is: the types of the route table ([`super::routes::ROUTES`]), from which both
//! the router and the OpenAPI document are built. Kept apart from the table and from the renderer so
//! that neither reaches the other.

use schemars::{JsonSchema, Schema, SchemaGenerator};

use crate::auth::Role;

/// Describes one body or query type.
pub type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

/// The schema of `T` in the generator's contract (a reference for answers, inline for requests).
pub fn schema<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<T>()
}

/// An HTTP method of the API. `GET` routes answer `HEAD` too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Method {
    /// `GET` (and `HEAD`).
    Get,
    /// `POST`.
    Post,
    /// `PUT`.
    Put,
}

impl Method {
    /// The name as OpenAPI keys operations.
    pub const fn key(self) -> &'static str {
        match self {
            Method::Get => "get",
            Method::Post => "post",
            Method::Put => "put",
        }
    }

    /// The methods an `Allow` header names for it.
    pub const fn allow(self) -> &'static str {
        match self {
            Method::Get => "GET, HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
        }
    }
}

/// A request body.
#[derive(Clone, Copy, Debug)]
pub struct Body {
    /// Its schema (as the node reads it).
    pub schema: SchemaFn,
    /// False when an absent body reads as `{}`.
    pub required: bool,
}

/// What a success answer carries.
#[derive(Clone, Copy, Debug)]
pub enum Content {
    /// JSON of this schema.
    Json(SchemaFn),
    /// Text of this media type.
    Text(&'static str),
}

/// A success answer.
#[derive(Clone, Copy, Debug)]
pub struct Success {
    /// Its status.
    pub status: u16,
    /// What it means.
    pub description: &'static str,
    /// Its body.
    pub content: Content,
}

/// A link from an answer to an operation whose `id` it gives (OpenAPI links; schemathesis' stateful mode
/// follows them).
#[derive(Clone, Copy, Debug)]
pub struct Link {
    /// The target operation.
    pub operation_id: &'static str,
    /// Where in the answer the target's `id` is, as a JSON pointer into the body.
    pub id_at: &'static str,
}

/// One route: what the router serves and the document describes.
#[derive(Clone, Copy, Debug)]
pub struct Operation {
    /// Its method.
    pub method: Method,
    /// Its path, with `{id}`.
    pub path: &'static str,
    /// A unique name.
    pub operation_id: &'static str,
    /// Its group.
    pub tag: &'static str,
    /// The least role that may call it; `None` for the unauthenticated operations endpoints.
    pub role: Option<Role>,
    /// What it does.
    pub summary: &'static str,
    /// Its query parameters, as one type.
    pub query: Option<SchemaFn>,
    /// Its request body.
    pub body: Option<Body>,
    /// Its success answers.
    pub success: &'static [Success],
    /// Every error status it can answer.
    pub errors: &'static [u16],
    /// Operations its success answers lead to.
    pub links: &'static [Link],
    /// The handler, without a method guard (the router adds it).
    pub handler: fn() -> actix_web::Route,
    /// False for a route served only to tests and drills (`fault_injection`), left out of the document.
    pub documented: bool,
}
