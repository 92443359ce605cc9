//! Collectives for data-parallel training: one interface ([`Collective`]), ranks as threads
//! of one process, one per adapter ([`LocalGroup`]), or as MPI processes across machines
//! (`mpi` feature, [`mpi::MpiGroup`]). Every operation is an all-gather of equal-length byte
//! strings in rank order; the reductions on top of it ([`Comm`]) add in rank order, so every
//! rank gets the same bits and a run reproduces exactly.

#[cfg(feature = "mpi")]
pub mod mpi;

use crate::error::{Error, Result};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// What one rank of a data-parallel group needs of the others.
pub trait Collective {
    /// This rank's place, 0-based.
    fn rank(&self) -> usize;
    /// How many ranks the group has.
    fn ranks(&self) -> usize;
    /// Every rank's `local` bytes, concatenated in rank order, on every rank. All ranks call
    /// it in the same order with strings of the same length.
    fn all_gather(&mut self, local: &[u8]) -> Result<Vec<u8>>;
}

/// Which rank of how many, whether batch norm's statistics are those of the whole global
/// batch (synchronized) or of each rank's slice, and how many bytes of gradients make a
/// bucket of the all-reduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataParallel {
    pub rank: usize,
    pub ranks: usize,
    pub sync_batch_norm: bool,
    pub bucket_bytes: u64,
}

/// A gradient bucket's size before it is reduced: PyTorch DDP's default, 25 MiB.
pub const BUCKET_BYTES: u64 = 25 << 20;

impl Default for DataParallel {
    fn default() -> Self {
        DataParallel { rank: 0, ranks: 1, sync_batch_norm: true, bucket_bytes: BUCKET_BYTES }
    }
}

impl DataParallel {
    /// Rank `rank` of `ranks`, with the default bucket size.
    pub fn rank(rank: usize, ranks: usize, sync_batch_norm: bool) -> Self {
        DataParallel { rank, ranks, sync_batch_norm, ..Default::default() }
    }
}

impl DataParallel {
    /// The images `[start, end)` of a global batch of `global` this rank trains on.
    pub fn slice(&self, global: usize) -> std::ops::Range<usize> {
        let each = global / self.ranks;
        self.rank * each..(self.rank + 1) * each
    }

    /// Whether batch norm exchanges statistics with other ranks.
    pub fn synchronizes_batch_norm(&self) -> bool {
        self.sync_batch_norm && self.ranks > 1
    }
}

/// Communication figures since the last [`Comm::take_stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CommStats {
    /// Collective calls.
    pub calls: u64,
    /// Bytes this rank contributed.
    pub bytes: u64,
    /// Seconds spent inside collective calls (waiting for the other ranks included).
    pub seconds: f64,
}

/// A rank's collective with the typed reductions training uses, and what they cost.
pub struct Comm {
    inner: Box<dyn Collective>,
    stats: CommStats,
}

impl Comm {
    pub fn new(inner: Box<dyn Collective>) -> Self {
        Comm { inner, stats: CommStats::default() }
    }

    pub fn rank(&self) -> usize {
        self.inner.rank()
    }

    pub fn ranks(&self) -> usize {
        self.inner.ranks()
    }

    /// The figures so far, reset to zero.
    pub fn take_stats(&mut self) -> CommStats {
        std::mem::take(&mut self.stats)
    }

    fn gather<T: bytemuck::Pod>(&mut self, local: &[T]) -> Result<Vec<T>> {
        let start = Instant::now();
        let bytes = self.inner.all_gather(bytemuck::cast_slice(local))?;
        self.stats.calls += 1;
        self.stats.bytes += std::mem::size_of_val(local) as u64;
        self.stats.seconds += start.elapsed().as_secs_f64();
        if bytes.len() != std::mem::size_of_val(local) * self.ranks() {
            return Err(Error::Collective(format!(
                "an all-gather of {} bytes per rank returned {} bytes for {} ranks",
                std::mem::size_of_val(local),
                bytes.len(),
                self.ranks()
            )));
        }
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Every rank's `local`, one vector per rank in rank order.
    pub fn all_gather_f64(&mut self, local: &[f64]) -> Result<Vec<Vec<f64>>> {
        let all = self.gather(local)?;
        Ok(all.chunks(local.len().max(1)).map(<[f64]>::to_vec).take(self.ranks()).collect())
    }

    /// `data` replaced by the mean over ranks: summed in rank order, then scaled, so every
    /// rank gets the same bits.
    pub fn mean_f32(&mut self, data: &mut [f32]) -> Result<()> {
        let all = self.gather(data)?;
        let (ranks, len) = (self.ranks(), data.len());
        for (i, v) in data.iter_mut().enumerate() {
            let sum = (1..ranks).fold(all[i], |acc, r| acc + all[r * len + i]);
            *v = sum / ranks as f32;
        }
        Ok(())
    }

    /// Fails, naming both, unless every rank passes the same `what` (the step about to run,
    /// the shape of the graph): ranks that disagree would pair the wrong exchanges.
    pub fn check_agreement(&mut self, what: &str) -> Result<()> {
        let mut fingerprint = [0u8; 64];
        let text = what.as_bytes();
        fingerprint[..text.len().min(64)].copy_from_slice(&text[..text.len().min(64)]);
        let all = self.gather(&fingerprint)?;
        let rank = self.rank();
        for (other, theirs) in all.chunks(64).enumerate() {
            if theirs != fingerprint {
                let shown = String::from_utf8_lossy(theirs).trim_end_matches('\0').to_string();
                return Err(Error::Collective(format!(
                    "rank {rank} is at {what:?} but rank {other} at {shown:?}: the ranks must run the same \
                     model, batch and step"
                )));
            }
        }
        Ok(())
    }
}

/// Runs `rank(r, comm)` for each of `ranks` ranks on a thread of its own, with rank r's
/// collective, and gives every rank's result, or the error that ended the run: the first
/// rank's own error rather than the others' failed exchanges with it (a panic is an error).
pub fn on_threads<T: Send>(ranks: usize, rank: impl Fn(usize, Comm) -> Result<T> + Sync) -> Result<Vec<T>> {
    let results: Vec<Result<T>> = std::thread::scope(|scope| {
        let rank = &rank;
        let threads: Vec<_> = LocalGroup::new(ranks)
            .into_iter()
            .enumerate()
            .map(|(r, group)| scope.spawn(move || rank(r, Comm::new(Box::new(group)))))
            .collect();
        let panicked = |r| Error::Invalid(format!("rank {r}'s thread panicked"));
        threads.into_iter().enumerate().map(|(r, t)| t.join().unwrap_or_else(|_| Err(panicked(r)))).collect()
    });
    let own = results.iter().position(|r| matches!(r, Err(e) if !matches!(e, Error::Collective(_))));
    match own.or_else(|| results.iter().position(Result::is_err)) {
        Some(failed) => Err(results.into_iter().nth(failed).and_then(Result::err).expect("a failed rank")),
        None => results.into_iter().collect(),
    }
}

/// Ranks as threads of one process: each thread holds one handle (`LocalGroup::new(n)`),
/// and an all-gather meets in shared memory. A handle dropped while others wait (its thread
/// failed) makes their calls fail instead of hanging.
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    ranks: usize,
    state: Mutex<Round>,
    arrived: Condvar,
}

#[derive(Default)]
struct Round {
    generation: u64,
    slots: Vec<Option<Vec<u8>>>,
    result: Arc<Vec<u8>>,
    left: Option<usize>,
}

impl LocalGroup {
    /// One handle per rank, rank order.
    pub fn new(ranks: usize) -> Vec<LocalGroup> {
        let round = Round { slots: vec![None; ranks], ..Round::default() };
        let shared = Arc::new(Shared { ranks, state: Mutex::new(round), arrived: Condvar::new() });
        (0..ranks).map(|rank| LocalGroup { rank, shared: Arc::clone(&shared) }).collect()
    }
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn ranks(&self) -> usize {
        self.shared.ranks
    }

    fn all_gather(&mut self, local: &[u8]) -> Result<Vec<u8>> {
        let left = |r: usize| Error::Collective(format!("rank {r} left the group (its thread failed)"));
        let mut round = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = round.left {
            return Err(left(r));
        }
        let generation = round.generation;
        round.slots[self.rank] = Some(local.to_vec());
        if round.slots.iter().all(Option::is_some) {
            let lengths: Vec<usize> = round.slots.iter().flatten().map(Vec::len).collect();
            if lengths.iter().any(|&l| l != local.len()) {
                return Err(Error::Collective(format!("an all-gather with per-rank lengths {lengths:?}")));
            }
            round.result =
                Arc::new(round.slots.iter_mut().flat_map(|s| s.take().unwrap_or_default()).collect());
            round.generation += 1;
            self.shared.arrived.notify_all();
        } else {
            while round.generation == generation {
                if let Some(r) = round.left {
                    return Err(left(r));
                }
                round = self.shared.arrived.wait(round).unwrap_or_else(|p| p.into_inner());
            }
        }
        Ok(round.result.as_ref().clone())
    }
}

impl Drop for LocalGroup {
    fn drop(&mut self) {
        let mut round = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        round.left.get_or_insert(self.rank);
        self.shared.arrived.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `f` on each of `ranks` threads with its rank's collective; the results in rank order.
    fn on_ranks<T: Send>(ranks: usize, f: fn(&mut Comm) -> T) -> Vec<T> {
        on_threads(ranks, |_, mut comm| Ok(f(&mut comm))).unwrap()
    }

    #[test]
    fn threads_gather_in_rank_order_and_average_identically() {
        let results = on_ranks(3, |comm| {
            let r = comm.rank() as f64;
            let rounds: Vec<_> =
                (0..50).map(|round| comm.all_gather_f64(&[r, f64::from(round)]).unwrap()).collect();
            let mut v = vec![0.1f32 * (comm.rank() as f32 + 1.0), 1e8];
            comm.mean_f32(&mut v).unwrap();
            (rounds, v)
        });
        for (rounds, v) in &results {
            for (round, all) in rounds.iter().enumerate() {
                let want: Vec<Vec<f64>> = (0..3).map(|r| vec![f64::from(r), round as f64]).collect();
                assert_eq!(all, &want);
            }
            assert_eq!(v[0].to_bits(), (((0.1f32 + 0.2) + 0.3) / 3.0).to_bits());
            assert_eq!(v[1], 1e8);
        }
    }

    #[test]
    fn a_failed_rank_s_own_error_is_the_run_s() {
        let err = on_threads(3, |rank, mut comm| match rank {
            1 => Err(Error::Invalid("rank 1's own trouble".into())),
            _ => comm.all_gather_f64(&[1.0]).map(drop),
        });
        assert_eq!(err.unwrap_err().to_string(), "rank 1's own trouble");
    }

    #[test]
    fn a_rank_that_leaves_fails_the_others_calls() {
        let mut group = LocalGroup::new(2);
        let gone = group.pop().unwrap();
        let mut comm = Comm::new(Box::new(group.pop().unwrap()));
        drop(gone);
        let err = comm.all_gather_f64(&[1.0]).unwrap_err().to_string();
        assert!(err.contains("rank 1 left"), "{err}");
    }

    #[test]
    fn ranks_at_different_steps_are_named() {
        let results = on_ranks(2, |comm| {
            let what = format!("step {}", 5 + comm.rank());
            comm.check_agreement(&what).map_err(|e| e.to_string())
        });
        for err in results.into_iter().map(Result::unwrap_err) {
            assert!(err.contains("step 5") && err.contains("step 6"), "{err}");
        }
    }
}
