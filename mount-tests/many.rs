//! Test 8: 100,000 empty files in one directory. readdir lists every one
//! exactly once, a random sample stats, and the same holds after a
//! remount. Prints how long each phase took (a report, not an assertion).

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::time::Instant;

use crate::harness::*;

const FILES: usize = 100_000;

fn listing(dir: &std::path::Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

fn check_listing(names: Vec<String>, when: &str) {
    assert_eq!(names.len(), FILES, "{when}: readdir count");
    let set: HashSet<&String> = names.iter().collect();
    assert_eq!(set.len(), FILES, "{when}: readdir listed a name twice");
    for i in (0..FILES).step_by(997) {
        assert!(set.contains(&name(i)), "{when}: {} missing", name(i));
    }
}

fn name(i: usize) -> String {
    format!("file-{i:06}")
}

#[test]
fn hundred_thousand_files_in_one_dir() {
    with_fs(|t| {
        t.mount();
        let dir = t.p("many");
        fs::create_dir(&dir).unwrap();
        let start = Instant::now();
        for i in 0..FILES {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dir.join(name(i)))
                .unwrap_or_else(|e| panic!("creating {}: {e}", name(i)));
        }
        let created = start.elapsed();

        let start = Instant::now();
        check_listing(listing(&dir), "mounted");
        let listed = start.elapsed();

        let mut rng = Rng::new(seed(8));
        let mut inos = Vec::new();
        for _ in 0..500 {
            let i = rng.below(FILES as u64) as usize;
            let m = fs::metadata(dir.join(name(i))).unwrap();
            assert!(m.is_file() && m.len() == 0 && m.nlink() == 1);
            inos.push((i, m.ino()));
        }
        assert_eq!(fs::metadata(&dir).unwrap().nlink(), 2);

        let start = Instant::now();
        t.remount();
        let remounted = start.elapsed();
        let start = Instant::now();
        check_listing(listing(&dir), "after remount");
        let relisted = start.elapsed();
        for (i, ino) in inos {
            assert_eq!(fs::metadata(dir.join(name(i))).unwrap().ino(), ino);
        }
        eprintln!(
            "{FILES} files: create {created:.1?}, readdir {listed:.1?}, \
             umount+mount {remounted:.1?}, readdir after remount {relisted:.1?}"
        );
        t.umount();
        t.assert_fsck_clean();
    });
}
