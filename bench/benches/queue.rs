//! The per-connection queue question goim left as a TODO ("false sharing" between its ring's
//! read and write indices): one producer thread hands items to one consumer thread through
//!  - a single-producer ring with its two indices on the same cache line,
//!  - the same ring with each index on its own 64-byte line,
//!  - a `Mutex<VecDeque>`, which is what comet's channel uses (its producers are many: room,
//!    broadcast and key pushes arrive from different threads, so an SPSC ring does not fit).
//!
//! Run: `cargo bench -p goim-bench --bench queue`. Results are in bench/README.md.

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};

const CAP: usize = 64;
const ITEMS: u64 = 200_000;

#[repr(align(64))]
struct Padded(AtomicUsize);

trait Indices: Send + Sync {
    fn head(&self) -> &AtomicUsize;
    fn tail(&self) -> &AtomicUsize;
}

struct Tight {
    head: AtomicUsize,
    tail: AtomicUsize,
}

struct Apart {
    head: Padded,
    tail: Padded,
}

impl Indices for Tight {
    fn head(&self) -> &AtomicUsize {
        &self.head
    }
    fn tail(&self) -> &AtomicUsize {
        &self.tail
    }
}

impl Indices for Apart {
    fn head(&self) -> &AtomicUsize {
        &self.head.0
    }
    fn tail(&self) -> &AtomicUsize {
        &self.tail.0
    }
}

/// Single-producer single-consumer ring; slots are atomics so no unsafe is needed.
struct Ring<I> {
    idx: I,
    slots: Vec<AtomicU64>,
}

impl<I: Indices> Ring<I> {
    fn push(&self, v: u64) -> bool {
        let t = self.idx.tail().load(Ordering::Relaxed);
        if t - self.idx.head().load(Ordering::Acquire) == CAP {
            return false;
        }
        self.slots[t % CAP].store(v, Ordering::Relaxed);
        self.idx.tail().store(t + 1, Ordering::Release);
        true
    }

    fn pop(&self) -> Option<u64> {
        let h = self.idx.head().load(Ordering::Relaxed);
        if h == self.idx.tail().load(Ordering::Acquire) {
            return None;
        }
        let v = self.slots[h % CAP].load(Ordering::Relaxed);
        self.idx.head().store(h + 1, Ordering::Release);
        Some(v)
    }
}

trait Queue: Send + Sync + 'static {
    fn push(&self, v: u64) -> bool;
    /// Takes everything queued, as comet's writer does; returns the sum and count.
    fn drain(&self) -> (u64, u64);
}

impl<I: Indices + 'static> Queue for Ring<I> {
    fn push(&self, v: u64) -> bool {
        Ring::push(self, v)
    }
    fn drain(&self) -> (u64, u64) {
        let (mut sum, mut n) = (0, 0);
        while let Some(v) = self.pop() {
            sum += v;
            n += 1;
        }
        (sum, n)
    }
}

struct Locked(Mutex<VecDeque<u64>>);

impl Queue for Locked {
    fn push(&self, v: u64) -> bool {
        let mut q = self.0.lock().unwrap();
        if q.len() == CAP {
            return false;
        }
        q.push_back(v);
        true
    }
    fn drain(&self) -> (u64, u64) {
        // One lock for the whole batch, then sum outside it.
        let q = std::mem::take(&mut *self.0.lock().unwrap());
        (q.iter().sum(), q.len() as u64)
    }
}

fn run(q: Arc<dyn Queue>) -> Duration {
    let start = Instant::now();
    let p = {
        let q = q.clone();
        std::thread::spawn(move || {
            for i in 0..ITEMS {
                while !q.push(i) {
                    std::hint::spin_loop();
                }
            }
        })
    };
    let mut sum = 0u64;
    let mut got = 0;
    while got < ITEMS {
        let (s, n) = q.drain();
        if n == 0 {
            std::hint::spin_loop();
        }
        sum += s;
        got += n;
    }
    p.join().unwrap();
    black_box(sum);
    start.elapsed()
}

fn slots() -> Vec<AtomicU64> {
    (0..CAP).map(|_| AtomicU64::new(0)).collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("spsc_200k_items");
    g.sample_size(20);
    g.bench_function("ring_unpadded", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    run(Arc::new(Ring {
                        idx: Tight {
                            head: AtomicUsize::new(0),
                            tail: AtomicUsize::new(0),
                        },
                        slots: slots(),
                    }))
                })
                .sum()
        })
    });
    g.bench_function("ring_padded", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    run(Arc::new(Ring {
                        idx: Apart {
                            head: Padded(AtomicUsize::new(0)),
                            tail: Padded(AtomicUsize::new(0)),
                        },
                        slots: slots(),
                    }))
                })
                .sum()
        })
    });
    g.bench_function("mutex_vecdeque", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| run(Arc::new(Locked(Mutex::new(VecDeque::new())))))
                .sum()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
