//! Mount tests: each mounts a real dedupfs through FUSE in its own temp
//! dirs, checks behaviour against expectations or a reference directory,
//! and always unmounts (see `harness::TestFs`). They skip when /dev/fuse or
//! fusermount3 is missing.

mod acl;
mod big;
mod corrupt;
mod crash;
mod diskfull;
mod harness;
mod many;
mod model;
mod passthrough;
mod posix;
mod snap;
mod snapfault;
mod snapmodel;
mod sparse;
mod workloads;
