//! Who may use the API socket: an `SO_PEERCRED` check on every accepted connection, on top of
//! the socket file's mode and group.
//!
//! Allowed: root, corald's own user, and members of the socket group (the configured
//! `rpc.group`, or corald's own group when that group does not exist), whether it is the peer's
//! primary group or a supplementary one. The peer's supplementary groups are those of the
//! connecting process (`Groups:` in `/proc/<pid>/status`), falling back to the group database
//! (`getgrouplist`) when the process is gone or in another PID namespace.
//!
//! A refused peer gets an HTTP `403 Forbidden` with a one-line explanation (so `curl` and the
//! WebSocket client both see a clear rejection), the connection is closed, and the refusal is
//! logged at warn level with the peer's uid, gid and pid.

use std::ffi::CString;

use nix::unistd::{Gid, Group, Uid, User};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::config::RpcConfig;

/// The credentials of a connected peer (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// Who may connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessPolicy {
    /// corald's effective uid.
    pub own_uid: u32,
    /// The socket group's gid.
    pub group_gid: u32,
    /// Its name, for messages.
    pub group_name: String,
    /// Why the configured group is not used, when it is not (it does not exist, or corald is
    /// neither root nor a member of it and so cannot give the socket to it); `group_gid` is then
    /// corald's own group.
    pub fallback: Option<String>,
}

/// Why a peer was allowed, or that it was not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Root,
    SameUser,
    PrimaryGroup,
    SupplementaryGroup,
    Refused,
}

impl Decision {
    pub fn allowed(self) -> bool {
        self != Decision::Refused
    }
}

impl AccessPolicy {
    /// Resolve `rpc.group`: the configured group if it exists and corald may use it (root, or
    /// a member), else corald's effective group (`fallback` says why; the caller logs it).
    pub fn from_config(rpc: &RpcConfig) -> AccessPolicy {
        let own_uid = Uid::effective().as_raw();
        let own_gid = Gid::effective().as_raw();
        let own_group_name = || {
            Group::from_gid(Gid::from_raw(own_gid))
                .ok()
                .flatten()
                .map_or_else(|| own_gid.to_string(), |g| g.name)
        };
        let fallback = if rpc.group.is_empty() {
            None
        } else {
            match Group::from_name(&rpc.group) {
                Ok(Some(g)) => {
                    let gid = g.gid.as_raw();
                    let member = own_uid == 0
                        || gid == own_gid
                        || nix::unistd::getgroups()
                            .is_ok_and(|gs| gs.iter().any(|x| x.as_raw() == gid));
                    if member {
                        return AccessPolicy {
                            own_uid,
                            group_gid: gid,
                            group_name: g.name,
                            fallback: None,
                        };
                    }
                    Some(format!(
                        "corald is not a member of the socket group `{}`",
                        rpc.group
                    ))
                }
                _ => Some(format!("the socket group `{}` does not exist", rpc.group)),
            }
        };
        AccessPolicy {
            own_uid,
            group_gid: own_gid,
            group_name: own_group_name(),
            fallback,
        }
    }

    /// The decision for a peer. `supplementary` is asked only when the uid and primary group do
    /// not decide already.
    pub fn decide(&self, peer: Peer, supplementary: impl FnOnce() -> Vec<u32>) -> Decision {
        if peer.uid == 0 {
            Decision::Root
        } else if peer.uid == self.own_uid {
            Decision::SameUser
        } else if peer.gid == self.group_gid {
            Decision::PrimaryGroup
        } else if supplementary().contains(&self.group_gid) {
            Decision::SupplementaryGroup
        } else {
            Decision::Refused
        }
    }

    /// The answer a refused peer reads.
    pub fn refusal_message(&self, peer: Peer) -> String {
        format!(
            "corald: uid {} may not use this socket; only root, uid {} and members of group `{}` \
             (gid {}) may. Ask an administrator to add you to `{}` (then log in again).",
            peer.uid, self.own_uid, self.group_name, self.group_gid, self.group_name
        )
    }
}

/// The supplementary groups of `pid` from `/proc/<pid>/status`, if readable.
pub fn proc_groups(pid: i32) -> Option<Vec<u32>> {
    if pid <= 0 {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_groups_line(&status)
}

/// The `Groups:` line of a `/proc/<pid>/status` text.
pub fn parse_groups_line(status: &str) -> Option<Vec<u32>> {
    let line = status.lines().find_map(|l| l.strip_prefix("Groups:"))?;
    Some(
        line.split_whitespace()
            .filter_map(|g| g.parse::<u32>().ok())
            .collect(),
    )
}

/// The groups of user `uid` (primary `gid` included) from the group database.
pub fn database_groups(uid: u32, gid: u32) -> Vec<u32> {
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return Vec::new();
    };
    let Ok(name) = CString::new(user.name) else {
        return Vec::new();
    };
    nix::unistd::getgrouplist(&name, Gid::from_raw(gid))
        .map(|gs| gs.into_iter().map(Gid::as_raw).collect())
        .unwrap_or_default()
}

/// The peer's supplementary groups: its process's, else the group database's.
fn peer_groups(peer: Peer) -> Vec<u32> {
    peer.pid
        .and_then(proc_groups)
        .unwrap_or_else(|| database_groups(peer.uid, peer.gid))
}

/// Check a freshly accepted connection. Returns the stream when the peer may use the API;
/// otherwise answers `403`, closes it, logs the refusal and returns `None`.
pub async fn admit(policy: &AccessPolicy, mut stream: UnixStream) -> Option<UnixStream> {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the peer credentials of a connection; closing it");
            return None;
        }
    };
    let peer = Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    };
    let decision = if peer.uid == 0 || peer.uid == policy.own_uid || peer.gid == policy.group_gid {
        policy.decide(peer, Vec::new)
    } else {
        // /proc or NSS lookups may block (an LDAP group database): off the async threads.
        let p = policy.clone();
        tokio::task::spawn_blocking(move || p.decide(peer, || peer_groups(peer)))
            .await
            .unwrap_or(Decision::Refused)
    };
    if decision.allowed() {
        tracing::trace!(
            uid = peer.uid,
            pid = peer.pid,
            ?decision,
            "connection admitted"
        );
        return Some(stream);
    }
    tracing::warn!(
        uid = peer.uid,
        gid = peer.gid,
        pid = peer.pid,
        group = %policy.group_name,
        "refused a connection from a user outside the socket group"
    );
    let body = policy.refusal_message(peer);
    let response = format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
        body.len() + 1
    );
    let answer = async {
        // Read what the client already sent (its request head) so that closing does not
        // discard our answer, then answer and close.
        let mut buf = [0u8; 4096];
        let _ = tokio::time::timeout(std::time::Duration::from_millis(200), stream.read(&mut buf))
            .await;
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), answer).await;
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> AccessPolicy {
        AccessPolicy {
            own_uid: 990,
            group_gid: 990,
            group_name: "coral".into(),
            fallback: None,
        }
    }

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer {
            uid,
            gid,
            pid: Some(1234),
        }
    }

    #[test]
    fn root_and_own_user_are_allowed_without_a_group_lookup() {
        let p = policy();
        let never = || -> Vec<u32> { panic!("groups must not be looked up") };
        assert_eq!(p.decide(peer(0, 0), never), Decision::Root);
        assert_eq!(p.decide(peer(990, 12), never), Decision::SameUser);
        assert_eq!(p.decide(peer(1000, 990), never), Decision::PrimaryGroup);
    }

    #[test]
    fn supplementary_members_are_allowed_and_others_refused() {
        let p = policy();
        assert_eq!(
            p.decide(peer(1000, 1000), || vec![24, 990, 1000]),
            Decision::SupplementaryGroup
        );
        assert_eq!(
            p.decide(peer(1000, 1000), || vec![24, 1000]),
            Decision::Refused
        );
        assert_eq!(p.decide(peer(65534, 65534), Vec::new), Decision::Refused);
        assert!(!Decision::Refused.allowed());
        assert!(Decision::SupplementaryGroup.allowed());
    }

    #[test]
    fn refusal_names_the_uid_and_group() {
        let m = policy().refusal_message(peer(1000, 1000));
        assert!(m.contains("uid 1000"), "{m}");
        assert!(m.contains("`coral`"), "{m}");
    }

    #[test]
    fn groups_line_is_parsed() {
        let status =
            "Name:\tbash\nUid:\t1000\t1000\t1000\t1000\nGroups:\t24 27 990 1000 \nNgid:\t0\n";
        assert_eq!(parse_groups_line(status), Some(vec![24, 27, 990, 1000]));
        assert_eq!(parse_groups_line("Groups:\n"), Some(vec![]));
        assert_eq!(parse_groups_line("Name: x\n"), None);
    }

    #[test]
    fn own_process_groups_are_readable() {
        let own = proc_groups(std::process::id() as i32);
        assert!(own.is_some());
        assert_eq!(proc_groups(0), None);
    }

    #[test]
    fn missing_group_falls_back_to_own_group() {
        let p = AccessPolicy::from_config(&RpcConfig {
            group: "no-such-group-coral-test".into(),
            ..RpcConfig::default()
        });
        assert!(
            p.fallback
                .as_deref()
                .is_some_and(|f| f.contains("`no-such-group-coral-test` does not exist")),
            "{p:?}"
        );
        assert_eq!(p.group_gid, Gid::effective().as_raw());
        assert_eq!(p.own_uid, Uid::effective().as_raw());
    }
}
