//! A run's checkpoints, saved so that a kill at any point leaves the last complete one:
//!
//! ```text
//! OUT/checkpoints/
//!   step-00000040/    trainable.safetensors  optimizer.safetensors  state.json  (+ run files)
//!   step-00000080/
//!   last -> step-00000080
//!   best -> step-00000040
//! ```
//!
//! A save writes a `step-N.tmp-PID/` folder, fsyncs each file and the folder, renames it to
//! `step-N/` and fsyncs `checkpoints/` — so every `step-*` folder is complete — and only then
//! points `last` (and `best`) at it: a symlink made beside and renamed over the old one, an
//! atomic switch. Folders neither pointer names are removed afterwards. A `last` that is missing
//! or dangling (a kill between the rename and the switch, a hand-deleted folder) is recovered
//! from the newest complete `step-*` folder. Any failure (a full disk) removes the temporary
//! folder and names the file. Paths such as `OUT/checkpoints/best` load as folders, as before.
use std::path::{Path, PathBuf};

use super::train::{checkpoint_metric, Trainer};
use crate::fs::{fsync, write_synced};
use crate::{Error, Result};

fn err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("{}: {e}", path.display()))
}

/// The checkpoints folder of a run.
#[derive(Clone, Debug)]
pub struct Checkpoints {
    dir: PathBuf,
}

/// The step of a `step-N` (or `step-N.k`) folder name.
fn step_of(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("step-")?;
    let digits = rest.split('.').next()?;
    if rest.contains(".tmp-") {
        return None;
    }
    digits.parse().ok()
}

impl Checkpoints {
    /// The checkpoints folder at `dir` (a run's `OUT/checkpoints`). Nothing is read or created
    /// here; the first `save` creates the folder.
    pub fn new(dir: impl Into<PathBuf>) -> Checkpoints {
        Checkpoints { dir: dir.into() }
    }

    /// The folder itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Saves `trainer` (with its validation `metric`, if any, and `extra` files beside its own)
    /// as a new complete folder, then points `last` — and `best` when `best` — at it and removes
    /// the folders no pointer names. Returns the folder.
    pub fn save(
        &self,
        trainer: &Trainer,
        metric: Option<f64>,
        extra: &[(&str, Vec<u8>)],
        best: bool,
    ) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.dir).map_err(|e| err(&self.dir, e))?;
        self.remove_stale_temporaries();
        self.adopt_legacy()?;
        let mut name = format!("step-{:08}", trainer.steps());
        let mut k = 1;
        while self.dir.join(&name).exists() {
            name = format!("step-{:08}.{k}", trainer.steps());
            k += 1;
        }
        let tmp = self.dir.join(format!("{name}.tmp-{}", std::process::id()));
        let written = (|| {
            std::fs::create_dir_all(&tmp).map_err(|e| err(&tmp, e))?;
            trainer.write_files(&tmp, metric)?;
            for (file, bytes) in extra {
                write_synced(&tmp.join(file), bytes)?;
            }
            fsync(&tmp)
        })();
        let folder = self.dir.join(&name);
        if let Err(e) = written {
            std::fs::remove_dir_all(&tmp).ok();
            // Named as the folder it was to become: the temporary is gone.
            return Err(match e {
                Error::Write { path, source } => Error::Write {
                    path: path
                        .strip_prefix(&tmp)
                        .map(|rel| folder.join(rel))
                        .unwrap_or(path),
                    source,
                },
                e => e,
            });
        }
        if let Err(e) = std::fs::rename(&tmp, &folder) {
            std::fs::remove_dir_all(&tmp).ok();
            return Err(err(&folder, e));
        }
        fsync(&self.dir)?;
        // `best` first: a kill between the two switches leaves `last` on the previous folder,
        // whose run state agrees with where `best` stood, never a `last` that believes in a
        // best that `best` does not name.
        if best {
            self.point("best", &name)?;
        }
        self.point("last", &name)?;
        self.prune();
        Ok(folder)
    }

    /// Points `pointer` at folder `name`: a new symlink renamed over the old one.
    fn point(&self, pointer: &str, name: &str) -> Result<()> {
        let link = self.dir.join(pointer);
        let tmp = self
            .dir
            .join(format!("{pointer}.tmp-{}", std::process::id()));
        std::fs::remove_file(&tmp).ok();
        #[cfg(unix)]
        std::os::unix::fs::symlink(name, &tmp).map_err(|e| err(&tmp, e))?;
        #[cfg(not(unix))]
        return Err(err(&tmp, "checkpoint pointers need symlinks (unix)"));
        if let Err(e) = std::fs::rename(&tmp, &link) {
            std::fs::remove_file(&tmp).ok();
            return Err(err(&link, e));
        }
        fsync(&self.dir)
    }

    /// The folder `pointer` names, when it names a complete one.
    fn target(&self, pointer: &str) -> Option<PathBuf> {
        let p = self.dir.join(pointer);
        p.join("state.json").is_file().then_some(p)
    }

    /// The checkpoint to resume from: `last`, or — when `last` is missing or dangling — the
    /// newest complete `step-*` folder. None when there is none.
    pub fn last(&self) -> Option<PathBuf> {
        self.target("last").or_else(|| {
            self.steps()
                .into_iter()
                .rev()
                .map(|(_, p)| p)
                .find(|p| p.join("state.json").is_file())
        })
    }

    /// The best checkpoint so far, if any.
    pub fn best(&self) -> Option<PathBuf> {
        self.target("best")
    }

    /// `save`s a checkpoint with `metric` (higher is better), pointing `best` at it when it
    /// beats the metric `best`'s checkpoint holds (or there is none). Returns whether it did.
    pub fn save_keeping_best(&self, trainer: &Trainer, metric: f64) -> Result<bool> {
        let prev = self.best().and_then(|b| checkpoint_metric(&b));
        let better = prev.is_none_or(|p| metric > p);
        self.save(trainer, Some(metric), &[], better)?;
        Ok(better)
    }

    /// The complete step folders, oldest first.
    fn steps(&self) -> Vec<(u64, PathBuf)> {
        let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                Some((step_of(&name)?, e.path()))
            })
            .collect();
        v.sort();
        v
    }

    /// Removes what a save killed midway left: temporaries, and step folders no pointer names
    /// (a kill after `last` moved, before the old folder went). Only when `last` names a
    /// complete folder, so nothing a resume could still need is removed. Call it holding the
    /// run's lock.
    pub fn tidy(&self) {
        self.remove_stale_temporaries();
        if self.target("last").is_some() {
            self.prune();
        }
    }

    /// Removes the step folders neither pointer names.
    fn prune(&self) {
        let keep: Vec<PathBuf> = ["last", "best"]
            .iter()
            .filter_map(|p| std::fs::canonicalize(self.dir.join(p)).ok())
            .collect();
        for (_, p) in self.steps() {
            if let Ok(c) = std::fs::canonicalize(&p) {
                if !keep.contains(&c) {
                    std::fs::remove_dir_all(&p).ok();
                }
            }
        }
        // Legacy folders once the pointers have moved on.
        for old in ["last.legacy", "best.legacy"] {
            let p = self.dir.join(old);
            if p.exists() && !keep.iter().any(|k| k.ends_with(old)) {
                std::fs::remove_dir_all(&p).ok();
            }
        }
    }

    /// Temporary folders and links a killed save left behind.
    fn remove_stale_temporaries(&self) {
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains(".tmp-") {
                let p = e.path();
                if p.is_dir() && !p.is_symlink() {
                    std::fs::remove_dir_all(&p).ok();
                } else {
                    std::fs::remove_file(&p).ok();
                }
            }
        }
    }

    /// A folder of the earlier layout (`last/`, `best/` as plain folders) becomes a step folder
    /// the pointers can name.
    fn adopt_legacy(&self) -> Result<()> {
        for pointer in ["last", "best"] {
            let p = self.dir.join(pointer);
            let is_dir = std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir());
            if is_dir {
                let to = format!("{pointer}.legacy");
                std::fs::rename(&p, self.dir.join(&to)).map_err(|e| err(&p, e))?;
                self.point(pointer, &to)?;
            }
        }
        Ok(())
    }
}
