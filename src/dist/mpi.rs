//! Ranks as MPI processes (`mpirun -np N hrnet-ocr train ...`), on one machine or many: the
//! all-gather is `MPI_Allgather` on `MPI_COMM_WORLD`. Only the process's main thread calls
//! MPI, so the lowest threading level suffices.

use super::Collective;
use crate::error::{Error, Result};
use mpi::traits::{Communicator, CommunicatorCollectives};

/// MPI in this process: initialised by [`Mpi::init`], finalised when dropped. A run keeps
/// it apart from the ranks' collectives, so that a failed rank can still end the others
/// ([`Mpi::abort_all`]) after its collective is gone.
pub struct Mpi {
    universe: mpi::environment::Universe,
}

/// This process's rank of `MPI_COMM_WORLD`.
pub struct MpiGroup {
    world: mpi::topology::SimpleCommunicator,
}

impl Mpi {
    /// Initialises MPI (once per process).
    pub fn init() -> Result<Self> {
        let universe = mpi::initialize()
            .ok_or_else(|| Error::Collective("MPI was already initialised in this process".into()))?;
        Ok(Mpi { universe })
    }

    /// The ranks of `MPI_COMM_WORLD`, as this process's collective.
    pub fn world(&self) -> MpiGroup {
        MpiGroup { world: self.universe.world() }
    }

    /// Ends every rank of the run (`MPI_Abort`): a rank that failed would otherwise leave
    /// the others waiting in their next collective for ever.
    pub fn abort_all(&self, code: i32) -> ! {
        self.universe.world().abort(code)
    }

    /// Whether this process was started by an MPI launcher (Open MPI's or MPICH's
    /// `mpirun`), by the variables they set.
    pub fn launched() -> bool {
        ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"].iter().any(|v| std::env::var_os(v).is_some())
    }

    /// This rank's place among the ranks on its own machine (for choosing its adapter).
    pub fn local_rank() -> usize {
        ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK"]
            .iter()
            .find_map(|v| std::env::var(v).ok()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Collective for MpiGroup {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn ranks(&self) -> usize {
        self.world.size() as usize
    }

    fn all_gather(&mut self, local: &[u8]) -> Result<Vec<u8>> {
        let mut all = vec![0u8; local.len() * self.ranks()];
        self.world.all_gather_into(local, &mut all[..]);
        Ok(all)
    }
}
