//! What every fuzz target shares: a global allocator that turns a huge allocation into a
//! crash libFuzzer reports (and saves the input of).
//!
//! libFuzzer's `-malloc_limit_mb` only works through a sanitizer's malloc hooks, and the
//! targets are built with `--sanitizer none` (they must build on the stable toolchain), so
//! the limit is enforced here instead: one allocation above [`MAX_ALLOCATION`], or more than
//! [`MAX_LIVE`] bytes allocated at once, aborts the process. An untouched `Vec::with_capacity`
//! of terabytes never shows in the RSS that `-rss_limit_mb` watches; this catches it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One allocation this large or larger aborts (as `-malloc_limit_mb=1024` of `fuzz/run.sh`).
pub const MAX_ALLOCATION: usize = 1 << 30;
/// The most all live allocations together may take (the `-rss_limit_mb=2048`).
pub const MAX_LIVE: usize = 2 << 30;

/// [`System`], aborting on an allocation above the limits above.
pub struct LimitedAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);

#[cold]
fn too_large(what: &str, size: usize) -> ! {
    // Formats without allocating: the allocator must not call itself here.
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = size;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(b"==hrnet-ocr-fuzz== ");
    let _ = err.write_all(what.as_bytes());
    let _ = err.write_all(b" of ");
    let _ = err.write_all(&digits[at..]);
    let _ = err.write_all(b" bytes: over the fuzzing memory limit (1 GiB per allocation, 2 GiB live)\n");
    let _ = err.flush();
    std::process::abort()
}

/// Counts `size` new bytes, aborting when a limit is passed.
fn charge(size: usize, what: &str) {
    if size >= MAX_ALLOCATION {
        too_large(what, size);
    }
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    if live > MAX_LIVE {
        too_large("live memory reaching", live);
    }
}

unsafe impl GlobalAlloc for LimitedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        charge(layout.size(), "an allocation");
        let p = System.alloc(layout);
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        charge(layout.size(), "an allocation");
        let p = System.alloc_zeroed(layout);
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            charge(new_size - layout.size(), "a reallocation");
            if new_size >= MAX_ALLOCATION {
                too_large("a reallocation", new_size);
            }
        }
        let p = System.realloc(ptr, layout, new_size);
        if p.is_null() {
            if new_size > layout.size() {
                LIVE.fetch_sub(new_size - layout.size(), Ordering::Relaxed);
            }
        } else if new_size < layout.size() {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        p
    }
}

/// Declares [`LimitedAlloc`] the global allocator of a fuzz target.
#[macro_export]
macro_rules! limit_memory {
    () => {
        #[global_allocator]
        static ALLOC: $crate::LimitedAlloc = $crate::LimitedAlloc;
    };
}

/// Lets the library catch a panic of a dependency itself (`images` turns a panic of the JPEG
/// decoder into an error). libfuzzer-sys installs a panic hook that aborts on every panic,
/// caught or not; this replaces it with one that prints the panic in one line, without a
/// backtrace (thousands are caught in a run). A panic that reaches the fuzz target is still
/// a crash: libfuzzer-sys catches it there and aborts.
pub fn allow_caught_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(|info| eprintln!("{info}"))));
}
