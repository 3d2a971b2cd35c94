//! Mount tests: each mounts a real dedupfs through FUSE in its own temp
//! dirs, checks behaviour against expectations or a reference directory,
//! and always unmounts (see `harness::TestFs`). They skip when /dev/fuse or
//! fusermount3 is missing.

mod acl;
mod big;
mod cli;
mod corrupt;
mod crash;
mod crashways;
mod dbdamage;
mod diskfull;
mod formats;
mod harness;
mod many;
mod mirror;
mod model;
mod observe;
mod passthrough;
mod posix;
mod races;
mod reclaim;
mod snap;
mod snapfault;
mod snapmodel;
mod sparse;
mod workloads;
