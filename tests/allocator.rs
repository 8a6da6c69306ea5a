//! glibc's arena limit as `main` sets it: threads that allocate side by side share two arenas
//! instead of taking one each. This file holds one test so that its process sets the limit
//! before any other thread of it allocates, as `main` does.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Barrier};

use kvm_operator::hypervisor::ffi::{MALLOC_ARENAS, arena_limit_wanted, limit_malloc_arenas};

/// glibc's heaps of the arenas other than the main one: anonymous mappings of 64 MiB
/// (`HEAP_MAX_SIZE` on 64-bit), aligned on it, the part in use read-write and the rest reserved.
fn arena_heaps() -> usize {
    const HEAP: u64 = 64 << 20;
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let regions: Vec<(u64, u64, String, bool)> = maps
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (range, perms) = (f.next()?, f.next()?);
            let anonymous = f.nth(3).is_none_or(|path| path.is_empty());
            let (a, b) = range.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
                perms.to_string(),
                anonymous,
            ))
        })
        .collect();
    regions
        .iter()
        .enumerate()
        .filter(|(i, (start, end, perms, anonymous))| {
            if !anonymous || perms != "rw-p" || start % HEAP != 0 {
                return false;
            }
            let reserved_end = regions
                .get(i + 1)
                .filter(|(s, _, p, anon)| s == end && p == "---p" && *anon)
                .map_or(*end, |r| r.1);
            reserved_end - start == HEAP
        })
        .count()
}

#[test]
fn threads_allocating_side_by_side_share_the_limited_arenas() {
    assert!(
        arena_limit_wanted(|k| std::env::var(k).ok()),
        "run without MALLOC_ARENA_MAX or glibc.malloc.arena_max in GLIBC_TUNABLES: the test \
         checks the limit the operator sets itself"
    );
    assert!(limit_malloc_arenas(), "mallopt refused the arena limit");
    let threads = 12;
    let all_allocated = Arc::new(Barrier::new(threads + 1));
    let counted = Arc::new(Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (all_allocated, counted) = (all_allocated.clone(), counted.clone());
            std::thread::spawn(move || {
                // small blocks, as libvirt's XML parsing allocates: from an arena, not mmap
                let held: Vec<Vec<u8>> = (0..2_000).map(|i| vec![t as u8; 64 + i % 512]).collect();
                all_allocated.wait();
                counted.wait();
                held.len()
            })
        })
        .collect();
    all_allocated.wait();
    let heaps = arena_heaps();
    counted.wait();
    for w in workers {
        assert_eq!(w.join().unwrap(), 2_000);
    }
    // the main arena lives on the program break; the others are these heaps
    assert!(
        heaps < MALLOC_ARENAS as usize,
        "{threads} threads allocating at once made {heaps} arena heaps beside the main arena; \
         the limit allows {}",
        MALLOC_ARENAS - 1
    );
}
