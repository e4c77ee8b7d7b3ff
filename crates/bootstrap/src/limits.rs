//! Per-client rate limits: sign-ups and access tokens per client address, queue tokens and
//! charges and coupon requests per user. A request over its limit is `429 RATE_LIMITED` with `Retry-After` and
//! changes nothing.
//!
//! The limits are kept in each instance's memory (GCRA, by `governor`): behind a load
//! balancer over N instances a client gets up to N times the rate. They stop one client
//! from taking a show or an instance; a deployment puts its global per-address limits in
//! front (docs/threat-model.md).
//!
//! The client address is the socket's peer, or, when that peer is a proxy listed in
//! `TRUSTED_PROXIES`, the right-most address of `X-Forwarded-For` that is not one of those
//! proxies: the left part of that header is whatever the client wrote, so it is never
//! believed.

use std::net::IpAddr;
use std::num::NonZeroU32;

use actix_web::HttpRequest;
use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::problem::ApiError;

/// An address block of trusted proxies: `10.0.0.0/8`, `::1`, `192.168.1.5`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Parses `addr` or `addr/prefix`.
    ///
    /// # Errors
    /// A message naming what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr = canonical(addr.trim().parse().map_err(|_| format!("{text:?} is not an IP address"))?);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?} has a bad prefix length"))?,
        };
        Ok(Self { addr, prefix })
    }

    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// An `X-Forwarded-For` entry: an address, or one with a port (`1.2.3.4:5678`,
/// `[2001:db8::1]:443`), as some proxies write them.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>().ok().or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
}

/// What an address is counted as: an IPv4 address itself, an IPv6 one by its /64 (one
/// subscriber's network: a client that changes addresses within it stays one client).
fn budget_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
    }
}

/// An IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`) counts as the IPv4 one.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Requests per minute for each limited action; 0 turns one off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitSettings {
    /// `RATE_LIMIT_SIGNUPS_PER_MINUTE`, per client address.
    pub signups: u32,
    /// `RATE_LIMIT_AUTH_PER_MINUTE`: access tokens, per client address.
    pub auth: u32,
    /// `RATE_LIMIT_QUEUE_TOKENS_PER_MINUTE`, per user.
    pub queue_tokens: u32,
    /// `RATE_LIMIT_CHARGES_PER_MINUTE`, per user.
    pub charges: u32,
    /// `RATE_LIMIT_COUPONS_PER_MINUTE`: coupon requests, per user.
    pub coupons: u32,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self { signups: 10, auth: 30, queue_tokens: 30, charges: 60, coupons: 30 }
    }
}

struct Limiter<K: std::hash::Hash + Eq + Clone> {
    what: &'static str,
    limiter: DefaultKeyedRateLimiter<K>,
}

impl<K: std::hash::Hash + Eq + Clone> Limiter<K> {
    fn new(what: &'static str, per_minute: u32) -> Option<Self> {
        NonZeroU32::new(per_minute).map(|n| Self { what, limiter: RateLimiter::keyed(Quota::per_minute(n)) })
    }

    fn check(&self, key: &K) -> Result<(), ApiError> {
        self.limiter.check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            metrics::counter!("rate_limited_total", "what" => self.what).increment(1);
            ApiError::RateLimited { what: self.what, retry_after: wait.as_secs() + 1 }
        })
    }

    /// Forgets clients whose state is back to fresh, so memory follows the clients of the
    /// last minute, not every client ever seen.
    fn trim(&self) -> usize {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        self.limiter.len()
    }
}

/// Every per-client limit of one instance, registered as app data.
pub struct RateLimits {
    signups: Option<Limiter<IpAddr>>,
    auth: Option<Limiter<IpAddr>>,
    queue_tokens: Option<Limiter<uuid::Uuid>>,
    charges: Option<Limiter<uuid::Uuid>>,
    coupons: Option<Limiter<uuid::Uuid>>,
    trusted_proxies: Vec<IpNet>,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits").field("trusted_proxies", &self.trusted_proxies).finish_non_exhaustive()
    }
}

impl RateLimits {
    #[must_use]
    pub fn new(settings: RateLimitSettings, trusted_proxies: Vec<IpNet>) -> Self {
        Self {
            signups: Limiter::new("sign-ups", settings.signups),
            auth: Limiter::new("access-token requests", settings.auth),
            queue_tokens: Limiter::new("queue-token requests", settings.queue_tokens),
            charges: Limiter::new("charges", settings.charges),
            coupons: Limiter::new("coupon requests", settings.coupons),
            trusted_proxies,
        }
    }

    /// The client's address (see the module's doc), `None` when the server cannot tell
    /// (no peer address: a test request).
    #[must_use]
    pub fn client_ip(&self, req: &HttpRequest) -> Option<IpAddr> {
        let peer = canonical(req.peer_addr()?.ip());
        if !self.trusted(peer) {
            return Some(peer);
        }
        let mut client = peer;
        // Right to left: each hop a trusted proxy appended; the first untrusted one is the
        // client as the nearest trusted proxy saw it.
        let hops =
            req.headers().get_all("x-forwarded-for").filter_map(|v| v.to_str().ok()).collect::<Vec<_>>();
        for hop in hops.iter().rev().flat_map(|value| value.rsplit(',')) {
            let Some(ip) = parse_hop(hop.trim()) else { break };
            client = canonical(ip);
            if !self.trusted(client) {
                break;
            }
        }
        Some(client)
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(ip))
    }

    /// # Errors
    /// [`ApiError::RateLimited`] past `RATE_LIMIT_SIGNUPS_PER_MINUTE` for this address.
    pub fn signup(&self, req: &HttpRequest) -> Result<(), ApiError> {
        self.by_address(self.signups.as_ref(), req)
    }

    /// # Errors
    /// [`ApiError::RateLimited`] past `RATE_LIMIT_AUTH_PER_MINUTE` for this address.
    pub fn access_token(&self, req: &HttpRequest) -> Result<(), ApiError> {
        self.by_address(self.auth.as_ref(), req)
    }

    /// `limiter` (when on) for the request's client address, counted by its budget key.
    fn by_address(&self, limiter: Option<&Limiter<IpAddr>>, req: &HttpRequest) -> Result<(), ApiError> {
        match (limiter, self.client_ip(req)) {
            (Some(limiter), Some(ip)) => limiter.check(&budget_key(ip)),
            _ => Ok(()),
        }
    }

    /// # Errors
    /// [`ApiError::RateLimited`] past `RATE_LIMIT_QUEUE_TOKENS_PER_MINUTE` for this user.
    pub fn queue_token(&self, user: domain::user::UserId) -> Result<(), ApiError> {
        self.queue_tokens.as_ref().map_or(Ok(()), |limiter| limiter.check(user.as_uuid()))
    }

    /// # Errors
    /// [`ApiError::RateLimited`] past `RATE_LIMIT_CHARGES_PER_MINUTE` for this user.
    pub fn charge(&self, user: domain::user::UserId) -> Result<(), ApiError> {
        self.charges.as_ref().map_or(Ok(()), |limiter| limiter.check(user.as_uuid()))
    }

    /// # Errors
    /// [`ApiError::RateLimited`] past `RATE_LIMIT_COUPONS_PER_MINUTE` for this user.
    pub fn coupon(&self, user: domain::user::UserId) -> Result<(), ApiError> {
        self.coupons.as_ref().map_or(Ok(()), |limiter| limiter.check(user.as_uuid()))
    }

    /// Forgets the clients back to a fresh state (run every minute by a job); returns how
    /// many clients are still tracked.
    pub fn trim(&self) -> usize {
        self.signups.as_ref().map_or(0, Limiter::trim)
            + self.auth.as_ref().map_or(0, Limiter::trim)
            + self.queue_tokens.as_ref().map_or(0, Limiter::trim)
            + self.charges.as_ref().map_or(0, Limiter::trim)
            + self.coupons.as_ref().map_or(0, Limiter::trim)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use actix_web::test::TestRequest;

    use super::*;

    fn request(peer: &str, forwarded: &[&str]) -> HttpRequest {
        let mut req = TestRequest::default().peer_addr(peer.parse::<SocketAddr>().expect("addr"));
        for value in forwarded {
            req = req.append_header(("X-Forwarded-For", *value));
        }
        req.to_http_request()
    }

    fn limits(trusted: &[&str]) -> RateLimits {
        RateLimits::new(
            RateLimitSettings { signups: 2, auth: 0, queue_tokens: 1, charges: 0, coupons: 1 },
            trusted.iter().map(|t| IpNet::parse(t).expect("net")).collect(),
        )
    }

    #[test]
    fn networks_match_by_prefix_and_mapped_v4_counts_as_v4() {
        let net = IpNet::parse("10.1.0.0/16").expect("net");
        assert!(net.contains("10.1.200.3".parse().expect("ip")));
        assert!(!net.contains("10.2.0.1".parse().expect("ip")));
        assert!(net.contains("::ffff:10.1.0.9".parse().expect("ip")));
        assert!(IpNet::parse("::1").expect("net").contains("::1".parse().expect("ip")));
        assert!(IpNet::parse("0.0.0.0/0").expect("net").contains("8.8.8.8".parse().expect("ip")));
        for bad in ["", "10.0.0.0/33", "host", "::1/129", "1.2.3.4/x"] {
            assert!(IpNet::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_is_believed_only_from_a_trusted_proxy_and_only_its_right_part() {
        let direct = limits(&[]);
        // Not behind a trusted proxy: the header is the client's own words.
        assert_eq!(direct.client_ip(&request("203.0.113.7:5000", &["1.1.1.1"])), "203.0.113.7".parse().ok());
        let proxied = limits(&["10.0.0.0/8"]);
        assert_eq!(
            proxied.client_ip(&request("10.0.0.2:5000", &["6.6.6.6, 198.51.100.4, 10.0.0.9"])),
            "198.51.100.4".parse().ok(),
            "the spoofed left part is ignored"
        );
        assert_eq!(
            proxied.client_ip(&request("10.0.0.2:5000", &["6.6.6.6", "198.51.100.4"])),
            "198.51.100.4".parse().ok()
        );
        assert_eq!(proxied.client_ip(&request("10.0.0.2:5000", &[])), "10.0.0.2".parse().ok());
        assert_eq!(proxied.client_ip(&request("10.0.0.2:5000", &["garbage"])), "10.0.0.2".parse().ok());
        assert_eq!(
            proxied.client_ip(&request("10.0.0.2:5000", &["198.51.100.4:61000"])),
            "198.51.100.4".parse().ok()
        );
        assert_eq!(
            proxied.client_ip(&request("10.0.0.2:5000", &["[2001:db8::7]:443"])),
            "2001:db8::7".parse().ok()
        );
        // A mapped-IPv4 trusted entry is the IPv4 one.
        assert!(limits(&["::ffff:10.0.0.2"]).trusted("10.0.0.2".parse().expect("ip")));
    }

    #[test]
    fn a_client_over_its_limit_is_refused_with_a_retry_after_and_others_are_not() {
        let limits = limits(&[]);
        let one = request("203.0.113.7:5000", &[]);
        let other = request("203.0.113.8:5000", &[]);
        assert!(limits.signup(&one).is_ok() && limits.signup(&one).is_ok());
        match limits.signup(&one) {
            Err(ApiError::RateLimited { retry_after, .. }) => {
                assert!((1..=31).contains(&retry_after), "{retry_after}")
            }
            other => panic!("expected 429, got {other:?}"),
        }
        assert!(limits.signup(&other).is_ok(), "another address has its own budget");
        // IPv6 addresses of one /64 share a budget; another /64 has its own.
        let v6 = |addr: &str| request(addr, &[]);
        assert!(limits.signup(&v6("[2001:db8:1:1::1]:5000")).is_ok());
        assert!(limits.signup(&v6("[2001:db8:1:1::2]:5000")).is_ok());
        assert!(limits.signup(&v6("[2001:db8:1:1:ffff::3]:5000")).is_err(), "the same /64");
        assert!(limits.signup(&v6("[2001:db8:1:2::1]:5000")).is_ok());
        assert!(limits.access_token(&one).is_ok(), "0 is off");
        let (a, b) = (domain::user::UserId::generate(), domain::user::UserId::generate());
        assert!(limits.queue_token(a).is_ok());
        assert!(limits.queue_token(a).is_err());
        assert!(limits.queue_token(b).is_ok());
        assert!(limits.coupon(a).is_ok());
        assert!(limits.coupon(a).is_err(), "coupon requests have their own budget, spent now");
        assert!(limits.coupon(b).is_ok());
        assert!(limits.trim() >= 1);
    }
}
