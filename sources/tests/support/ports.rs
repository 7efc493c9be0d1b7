//! Loopback ports for servers a test starts in another process (`#[path]`-included by the
//! sources' and the orchestrator's tests and benches).
//!
//! Binding port 0 and handing the number on leaves a window in which the kernel may give the
//! same port to anyone asking for an ephemeral one: an outgoing connection, another test's
//! listener on port 0, or a `spate run`'s own `--metrics-listen 127.0.0.1:0`. A test that
//! SIGKILLs a server and starts it again on its port holds that window open for seconds, and
//! a chaos run lost a webhook call to a `404` from a metrics server that had taken the
//! webhook's port. The ports here come from below the ephemeral range, where the kernel hands
//! out nothing on its own.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Mutex;

const LOWEST: u32 = 10_000;

/// A port on 127.0.0.1 that nothing holds now, below the ephemeral range, and not returned
/// before by this process.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let span = u64::from(ephemeral_range_start().saturating_sub(LOWEST).max(1_000));
    let random = RandomState::new();
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        let port = (u64::from(LOWEST) + random.hash_one(attempt) % span) as u16;
        let mut handed_out = HANDED_OUT
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let handed_out = handed_out.get_or_insert_with(HashSet::new);
        if !handed_out.contains(&port) && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
}

/// The first port the kernel hands out for port 0 (Linux's default is 32768).
fn ephemeral_range_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}
