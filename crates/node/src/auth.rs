//! Bearer-token authentication and roles (`docs/api.md`, authentication and tenants).
//!
//! Tokens are configured by their SHA-256 only. A presented token is hashed and compared with every
//! configured hash in constant time, so neither timing nor early exit reveals which hash was close.

use runguard_contract::TenantId;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::TokenConfig;
use crate::error::ApiError;

// Roles are configuration vocabulary (each token names one); re-exported where callers are checked.
pub use crate::config::Role;

/// An authenticated caller acting for one tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's configured name (never the token).
    pub name: String,
    /// The tenant it acts for (an admin's own, or the one named by `X-Tenant`).
    pub tenant: TenantId,
    /// Its role.
    pub role: Role,
}

impl Caller {
    /// 403 unless the caller has at least `role`.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this needs the {} role; the token has {}",
                role.as_str(),
                self.role.as_str()
            )))
        }
    }
}

/// The configured tokens, or development mode.
#[derive(Clone)]
pub struct Authenticator {
    tokens: Vec<([u8; 32], TokenConfig)>,
    dev_tenant: TenantId,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").field("tokens", &self.tokens.len()).finish_non_exhaustive()
    }
}

/// The SHA-256 of a bearer token, as configured in `sha256`.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Authenticator {
    /// From configured tokens (hashes already validated as 64 hex digits).
    pub fn new(tokens: &[TokenConfig]) -> Self {
        let tokens = tokens
            .iter()
            .filter_map(|t| {
                let bytes = hex::decode(t.sha256.to_ascii_lowercase()).ok()?;
                let hash: [u8; 32] = bytes.try_into().ok()?;
                Some((hash, t.clone()))
            })
            .collect();
        let dev_tenant = TenantId::new("default").unwrap_or_else(|_| TenantId::from_u128(0));
        Self { tokens, dev_tenant }
    }

    /// Whether no tokens are configured.
    pub fn dev_mode(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Authenticates an `Authorization` header and applies `X-Tenant`.
    pub fn authenticate(&self, authorization: Option<&str>, x_tenant: Option<&str>) -> Result<Caller, ApiError> {
        let caller = if self.dev_mode() {
            Caller { name: "development".to_owned(), tenant: self.dev_tenant.clone(), role: Role::Admin }
        } else {
            let header =
                authorization.ok_or_else(|| ApiError::unauthorized("missing `Authorization: Bearer` header"))?;
            let token = header
                .strip_prefix("Bearer ")
                .or_else(|| header.strip_prefix("bearer "))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| ApiError::unauthorized("the `Authorization` header must be `Bearer <token>`"))?;
            let presented = token_hash(token);
            let mut found: Option<&TokenConfig> = None;
            for (hash, config) in &self.tokens {
                // Compare with every token: no early exit.
                if bool::from(hash.ct_eq(&presented)) {
                    found = Some(config);
                }
            }
            let config = found.ok_or_else(|| ApiError::unauthorized("unknown token"))?;
            Caller { name: config.name.clone(), tenant: config.tenant.clone(), role: config.role }
        };
        match x_tenant {
            None => Ok(caller),
            Some(_) if caller.role != Role::Admin => {
                Err(ApiError::forbidden("only admins may name a tenant with `X-Tenant`"))
            }
            Some(name) => {
                let tenant = TenantId::new(name.trim()).map_err(|e| ApiError::bad_request("X-Tenant", e.message()))?;
                Ok(Caller { tenant, ..caller })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authenticator() -> Authenticator {
        let token = |name: &str, tenant: &str, role: Role, secret: &str| TokenConfig {
            name: name.into(),
            tenant: TenantId::new(tenant).unwrap(),
            role,
            sha256: hex::encode(token_hash(secret)),
        };
        Authenticator::new(&[
            token("acme-worker", "acme", Role::Worker, "w-secret"),
            token("root", "ops", Role::Admin, "a-secret"),
        ])
    }

    #[test]
    fn tokens_resolve_to_their_caller() {
        let auth = authenticator();
        let caller = auth.authenticate(Some("Bearer w-secret"), None).unwrap();
        assert_eq!((caller.name.as_str(), caller.tenant.as_str(), caller.role), ("acme-worker", "acme", Role::Worker));
        assert_eq!(auth.authenticate(None, None).unwrap_err().status, 401);
        assert_eq!(auth.authenticate(Some("Bearer nope"), None).unwrap_err().status, 401);
        assert_eq!(auth.authenticate(Some("Basic w-secret"), None).unwrap_err().status, 401);
    }

    #[test]
    fn roles_nest_and_x_tenant_is_for_admins() {
        let auth = authenticator();
        let worker = auth.authenticate(Some("Bearer w-secret"), None).unwrap();
        assert!(worker.require(Role::Worker).is_ok());
        assert_eq!(worker.require(Role::Operator).unwrap_err().status, 403);
        assert_eq!(auth.authenticate(Some("Bearer w-secret"), Some("other")).unwrap_err().status, 403);
        let admin = auth.authenticate(Some("Bearer a-secret"), Some("acme")).unwrap();
        assert_eq!((admin.tenant.as_str(), admin.role), ("acme", Role::Admin));
        assert_eq!(auth.authenticate(Some("Bearer a-secret"), Some("bad tenant")).unwrap_err().status, 400);
    }

    #[test]
    fn development_mode_is_an_admin_of_default() {
        let auth = Authenticator::new(&[]);
        let caller = auth.authenticate(None, None).unwrap();
        assert_eq!((caller.tenant.as_str(), caller.role), ("default", Role::Admin));
    }
}
