//! Where this process stands in a multi-process job, read from the variables the ecosystem's
//! launchers set: torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`),
//! Slurm's `srun` (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, …), Open MPI's `mpirun`
//! (`OMPI_COMM_WORLD_*`) and MPICH/Intel MPI (`PMI_RANK`, `PMI_SIZE`, `MPI_LOCALRANKID`).
//! torchrun's variables win when several are set (torchrun inside a Slurm allocation).
use crate::{Error, Result};

/// Which launcher's variables described the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher: one process.
    None,
    /// torchrun / `torch.distributed.run` (or `sd2 train --nproc` on GPUs, which sets the same).
    Torchrun,
    /// Slurm's `srun`.
    Slurm,
    /// Open MPI's `mpirun` / `mpiexec`.
    OpenMpi,
    /// MPICH, Intel MPI and other PMI launchers.
    Pmi,
}

/// This process's place in the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Who set the variables.
    pub launcher: Launcher,
    /// This process's rank, 0..world.
    pub rank: usize,
    /// Processes in the job.
    pub world: usize,
    /// Rank among the processes on this machine: the GPU this process uses.
    pub local_rank: usize,
    /// Processes on this machine (None where the launcher does not say).
    pub local_world: Option<usize>,
    /// Where rank 0 listens for the NCCL rendezvous (`MASTER_ADDR`; the first host of a Slurm
    /// step; `127.0.0.1` when every process is on one machine). None when it cannot be known.
    pub master_addr: Option<String>,
    /// The rendezvous port: `SD2_RDZV_PORT`, else `MASTER_PORT` — plus one under torchrun,
    /// whose agent keeps its own store on `MASTER_PORT` — else 29500 (+ the Slurm job id
    /// modulo 1000 under Slurm, so two jobs on one node differ).
    pub port: u16,
}

impl Launch {
    /// One process, no launcher.
    pub fn single() -> Launch {
        Launch {
            launcher: Launcher::None,
            rank: 0,
            world: 1,
            local_rank: 0,
            local_world: Some(1),
            master_addr: None,
            port: DEFAULT_PORT,
        }
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Launch> {
        Launch::from_vars(|k| std::env::var(k).ok())
    }

    /// Reads the variables `get` returns (the environment in [`Launch::from_env`]); a
    /// variable that is set but does not parse, or ranks that do not fit, is an
    /// `Error::Config` naming it.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Launch> {
        let num = |k: &str| -> Result<Option<usize>> {
            match get(k) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map(Some)
                    .map_err(|_| Error::Config {
                        key: k.into(),
                        msg: format!("`{v}` is not a non-negative integer"),
                    }),
            }
        };
        let (launcher, rank, world, local, local_world) = if let Some(r) = num("RANK")? {
            let w = num("WORLD_SIZE")?.ok_or_else(|| missing("WORLD_SIZE", "RANK"))?;
            let l = num("LOCAL_RANK")?.unwrap_or(r);
            (Launcher::Torchrun, r, w, l, num("LOCAL_WORLD_SIZE")?)
        } else if let Some(r) = num("OMPI_COMM_WORLD_RANK")? {
            let w = num("OMPI_COMM_WORLD_SIZE")?
                .ok_or_else(|| missing("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"))?;
            let l = num("OMPI_COMM_WORLD_LOCAL_RANK")?.unwrap_or(r);
            (
                Launcher::OpenMpi,
                r,
                w,
                l,
                num("OMPI_COMM_WORLD_LOCAL_SIZE")?,
            )
        } else if let Some(r) = num("SLURM_PROCID")? {
            let w = num("SLURM_NTASKS")?
                .or(num("SLURM_NPROCS")?)
                .ok_or_else(|| missing("SLURM_NTASKS", "SLURM_PROCID"))?;
            let l = num("SLURM_LOCALID")?.unwrap_or(r);
            let lw = get("SLURM_TASKS_PER_NODE")
                .and_then(|v| v.split(['(', ',']).next()?.trim().parse().ok());
            (Launcher::Slurm, r, w, l, lw)
        } else if let Some(r) = num("PMI_RANK")? {
            let w = num("PMI_SIZE")?.ok_or_else(|| missing("PMI_SIZE", "PMI_RANK"))?;
            let l = num("MPI_LOCALRANKID")?.unwrap_or(r);
            (Launcher::Pmi, r, w, l, num("MPI_LOCALNRANKS")?)
        } else {
            return Ok(Launch::single());
        };
        if world == 0 || rank >= world {
            return Err(Error::Config {
                key: "rank".into(),
                msg: format!("{launcher:?} gave rank {rank} of a world of {world}"),
            });
        }
        if local_world.is_some_and(|lw| local >= lw) {
            return Err(Error::Config {
                key: "local_rank".into(),
                msg: format!(
                    "{launcher:?} gave local rank {local} of {} on this machine",
                    local_world.unwrap_or(0)
                ),
            });
        }
        let one_machine = local_world == Some(world);
        let master_addr = get("MASTER_ADDR")
            .filter(|s| !s.trim().is_empty())
            .or_else(|| match launcher {
                Launcher::Slurm => get("SLURM_STEP_NODELIST")
                    .or(get("SLURM_JOB_NODELIST"))
                    .and_then(|l| first_host(&l)),
                _ => None,
            })
            .or_else(|| one_machine.then(|| "127.0.0.1".to_string()));
        let port = match (num("SD2_RDZV_PORT")?, num("MASTER_PORT")?) {
            (Some(p), _) => p,
            // torchrun's agent hosts its TCPStore on MASTER_PORT.
            (None, Some(p))
                if launcher == Launcher::Torchrun && get("TORCHELASTIC_RUN_ID").is_some() =>
            {
                p + 1
            }
            (None, Some(p)) => p,
            (None, None) => match (launcher, num("SLURM_JOB_ID")?) {
                (Launcher::Slurm, Some(job)) => DEFAULT_PORT as usize + job % 1000,
                _ => DEFAULT_PORT as usize,
            },
        };
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| Error::Config {
                key: "MASTER_PORT".into(),
                msg: format!("port {port} is not in 1..=65535"),
            })?;
        Ok(Launch {
            launcher,
            rank,
            world,
            local_rank: local,
            local_world,
            master_addr,
            port,
        })
    }

    /// More than one process.
    pub fn is_distributed(&self) -> bool {
        self.world > 1
    }
}

/// torchrun's default port.
pub const DEFAULT_PORT: u16 = 29500;

fn missing(key: &str, because: &str) -> Error {
    Error::Config {
        key: key.into(),
        msg: format!("not set, though {because} is"),
    }
}

/// The first host of a Slurm node list: `node[03-05,07],gpu1` → `node03`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let end = list.find([',', '[']).unwrap_or(list.len());
    let prefix = &list[..end];
    if list[end..].starts_with('[') {
        let inner = &list[end + 1..];
        let first = inner.split([',', '-', ']']).next()?.trim();
        if first.is_empty() {
            return None;
        }
        Some(format!("{prefix}{first}"))
    } else {
        (!prefix.is_empty()).then(|| prefix.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Launch> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_slurm_openmpi_and_pmi_variables() {
        let t = launch(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.0.0.7"),
            ("MASTER_PORT", "29400"),
            ("TORCHELASTIC_RUN_ID", "none"),
            ("SLURM_PROCID", "5"),
        ])
        .unwrap();
        assert_eq!(
            (t.launcher, t.rank, t.world, t.local_rank),
            (Launcher::Torchrun, 3, 8, 1)
        );
        assert_eq!(t.master_addr.as_deref(), Some("10.0.0.7"));
        assert_eq!(t.port, 29401, "torchrun's agent owns MASTER_PORT");

        let s = launch(&[
            ("SLURM_PROCID", "2"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_TASKS_PER_NODE", "2(x2)"),
            ("SLURM_STEP_NODELIST", "gpu[07-08]"),
            ("SLURM_JOB_ID", "123456"),
        ])
        .unwrap();
        assert_eq!((s.launcher, s.rank, s.world), (Launcher::Slurm, 2, 4));
        assert_eq!(s.local_world, Some(2));
        assert_eq!(s.master_addr.as_deref(), Some("gpu07"));
        assert_eq!(s.port, 29500 + 456);

        let o = launch(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ])
        .unwrap();
        assert_eq!((o.launcher, o.rank, o.world), (Launcher::OpenMpi, 1, 2));
        assert_eq!(o.master_addr.as_deref(), Some("127.0.0.1"), "one machine");
        assert_eq!(o.port, 29500);

        let p = launch(&[
            ("PMI_RANK", "0"),
            ("PMI_SIZE", "3"),
            ("SD2_RDZV_PORT", "4000"),
        ])
        .unwrap();
        assert_eq!((p.launcher, p.world, p.port), (Launcher::Pmi, 3, 4000));
        assert_eq!(p.master_addr, None, "several machines may be involved");

        assert_eq!(launch(&[]).unwrap(), Launch::single());
    }

    #[test]
    fn bad_variables_are_named() {
        let e = launch(&[("RANK", "x"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(
            matches!(&e, Error::Config { key, .. } if key == "RANK"),
            "{e}"
        );
        let e = launch(&[("RANK", "2"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(e.to_string().contains("rank 2 of a world of 2"), "{e}");
        let e = launch(&[("RANK", "0")]).unwrap_err();
        assert!(
            matches!(&e, Error::Config { key, .. } if key == "WORLD_SIZE"),
            "{e}"
        );
        let e =
            launch(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_PORT", "70000")]).unwrap_err();
        assert!(e.to_string().contains("70000"), "{e}");
        let e = launch(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "2"),
            ("LOCAL_WORLD_SIZE", "2"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("local rank 2 of 2"), "{e}");
    }

    #[test]
    fn slurm_node_lists() {
        assert_eq!(first_host("node[03-05,07],gpu1").as_deref(), Some("node03"));
        assert_eq!(first_host("gpu1,gpu2").as_deref(), Some("gpu1"));
        assert_eq!(first_host("solo").as_deref(), Some("solo"));
        assert_eq!(first_host("n[]"), None);
        assert_eq!(first_host(""), None);
    }
}
