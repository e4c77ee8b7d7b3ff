//! sea-orm models of the tables made by `migration`.
#![allow(unreachable_pub, reason = "sea-orm derives generate `pub` items; the module itself is private")]

pub(crate) mod point_account;
pub(crate) mod point_history;
pub(crate) mod user;
