//! Least privilege between tenants: which namespaces are tenants (the controller works only
//! there) and which Secrets kinsight may read to sign.

mod signing;
mod tenants;

pub use signing::{SIGNING_LABEL, SigningSecretError, is_marked, secret_headers, signing_keys};
pub use tenants::{
    TENANT_BINDING, TENANT_LABEL, TenancyConfig, TenantBindings, Tenants, WORKER_NETWORK_POLICY,
    may_be_tenant, not_a_tenant, parse_network_policy, remove_all, run, tenant_binding, tenant_set,
};
