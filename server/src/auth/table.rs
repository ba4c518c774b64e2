//! What every RPC needs, in one table. The gRPC auth layer looks each request's path up here
//! before any handler runs: a path that is not in the table is refused, so a new RPC cannot
//! be reached until it is given a line. Where the need depends on the request (the object it
//! names, the session it acts for), the layer checks that the principal has the right
//! somewhere and the handler checks the object or the session; the authorization-matrix test
//! drives every line with every kind of caller.

use super::{Principal, Rights};

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Any authenticated principal.
    Principal,
    /// `right` on the object the request names.
    Object(Rights),
    /// `right` on some of the namespace the request names (a listing shows only what the
    /// principal may read).
    Namespace(Rights),
    /// The session the request names must be the caller's.
    OwnSession,
    /// The caller's own session, and `read` (or, for a read-write lease, `write`) on the
    /// object.
    Lease,
    /// `admin` over everything (the empty prefix).
    Admin,
}

/// Every rdax RPC and its need.
pub const TABLE: &[(&str, Need)] = &[
    ("/rdax.v1.Pool/Info", Need::Principal),
    ("/rdax.v1.Pool/Stats", Need::Principal),
    ("/rdax.v1.Objects/Create", Need::Object(Rights::WRITE)),
    ("/rdax.v1.Objects/Stat", Need::Object(Rights::READ)),
    ("/rdax.v1.Objects/List", Need::Namespace(Rights::READ)),
    // Over every namespace: it lists only what the caller may read.
    ("/rdax.v1.Objects/ListPg", Need::Principal),
    ("/rdax.v1.Objects/Resize", Need::Object(Rights::WRITE)),
    ("/rdax.v1.Objects/PunchHole", Need::Object(Rights::WRITE)),
    ("/rdax.v1.Objects/Delete", Need::Object(Rights::WRITE)),
    ("/rdax.v1.Objects/Read", Need::Object(Rights::READ)),
    ("/rdax.v1.Objects/Write", Need::Object(Rights::WRITE)),
    ("/rdax.v1.Objects/Flush", Need::Object(Rights::WRITE)),
    ("/rdax.v1.Sessions/Open", Need::OwnSession),
    ("/rdax.v1.Leases/Acquire", Need::Lease),
    ("/rdax.v1.Leases/Renew", Need::OwnSession),
    ("/rdax.v1.Leases/Release", Need::OwnSession),
    ("/rdax.v1.Leases/List", Need::OwnSession),
    ("/rdax.v1.Leases/AcquireBatch", Need::Lease),
    ("/rdax.v1.Leases/ReleaseBatch", Need::OwnSession),
    ("/rdax.v1.Admin/ListSessions", Need::Admin),
    ("/rdax.v1.Admin/EvictSession", Need::Admin),
    ("/rdax.v1.Admin/RevokeLease", Need::Admin),
    ("/rdax.testing.v1.Testing/SetFailpoint", Need::Admin),
    ("/rdax.testing.v1.Testing/ListFailpoints", Need::Admin),
    ("/rdax.testing.v1.Testing/Audit", Need::Admin),
];

/// The need of an RPC path; `None` for a path that is not in the table.
pub fn need(path: &str) -> Option<Need> {
    TABLE.iter().find(|(p, _)| *p == path).map(|&(_, n)| n)
}

/// What can be decided before the handler runs: `Err` with the right that is missing
/// everywhere.
pub fn precheck(p: &Principal, need: Need) -> Result<(), &'static str> {
    let ok = match need {
        Need::Principal | Need::OwnSession => true,
        Need::Object(r) | Need::Namespace(r) => p.has_any(r),
        Need::Lease => p.has_any(Rights::READ),
        Need::Admin => p.has_everywhere(Rights::ADMIN),
    };
    if ok {
        return Ok(());
    }
    Err(match need {
        Need::Object(r) | Need::Namespace(r) => r.as_str(),
        Need::Admin => "admin (over every namespace)",
        _ => "read",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_method_in_the_protos_has_a_line() {
        use prost::Message;
        let mut methods = Vec::new();
        for set in [rdax_proto::FILE_DESCRIPTOR_SET] {
            let fds = prost_types::FileDescriptorSet::decode(set).unwrap();
            for f in fds.file {
                for s in &f.service {
                    for m in &s.method {
                        methods.push(format!("/{}.{}/{}", f.package(), s.name(), m.name()));
                    }
                }
            }
        }
        assert!(methods.len() >= 19, "{methods:?}");
        for m in &methods {
            assert!(need(m).is_some(), "{m} has no line in auth::table::TABLE");
        }
        for (p, _) in TABLE {
            assert!(methods.contains(&p.to_string()) || p.starts_with("/rdax.testing."), "{p} is no RPC");
        }
    }
}
