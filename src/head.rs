//! The ArcFace identification head: class-centre matrix, slot labels and species, in the upstream formats.
//!
//! Files (named in the embedder manifest): `head` is a float32 `.npy` of shape `[slots, dim]` (upstream
//! `arc.weight`); `labels` is upstream's `encoder_classes.npy`, one 12-hex individual id per slot, saved as
//! a numpy unicode (`<U12`) or bytes array; `species_map.csv` has `individual_id,species`. Only the first
//! `active_slots` rows take part in scoring (upstream: 13,837 of 15,587). Rows are L2-normalised at load,
//! so scoring is a plain dot product.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::manifest::HeadFiles;

/// Class centres and their labels, ready for cosine scoring.
#[derive(Debug)]
pub struct IdentificationHead {
    dim: usize,
    /// `active_slots x dim`, rows L2-normalised.
    centres: Vec<f32>,
    ids: Vec<String>,
    species: Vec<String>,
}

impl IdentificationHead {
    /// Loads the head files of `spec`; `dim` is the embedder's output size, `manifest` names errors.
    pub fn load(manifest: &Path, spec: &HeadFiles, dim: usize) -> Result<Self> {
        let err = |msg: String| Error::model(manifest, msg);
        for (file, want) in [
            (&spec.head, &spec.head_sha256),
            (&spec.labels, &spec.labels_sha256),
            (&spec.species_map, &spec.species_map_sha256),
        ] {
            verify_pinned(file, want.as_deref()).map_err(err)?;
        }
        let open = |p: &Path| -> Result<npyz::NpyFile<std::io::BufReader<std::fs::File>>> {
            let f = std::fs::File::open(p).map_err(|e| err(format!("cannot open {}: {e}", p.display())))?;
            npyz::NpyFile::new(std::io::BufReader::new(f))
                .map_err(|e| err(format!("{} is not a .npy file: {e}", p.display())))
        };

        let npy = open(&spec.head)?;
        let shape = npy.shape().to_vec();
        let [slots, cols] = shape[..] else {
            return Err(err(format!("{} has shape {shape:?}; expected [slots, {dim}]", spec.head.display())));
        };
        if cols as usize != dim {
            return Err(err(format!("{} rows have {cols} values but the embedder outputs {dim}", spec.head.display())));
        }
        if (slots as usize) < spec.active_slots {
            return Err(err(format!(
                "{} has {slots} rows, fewer than active_slots = {}",
                spec.head.display(),
                spec.active_slots
            )));
        }
        if npy.order() != npyz::Order::C {
            return Err(err(format!("{} is Fortran-ordered; save it with np.ascontiguousarray", spec.head.display())));
        }
        let mut centres: Vec<f32> =
            npy.into_vec().map_err(|e| err(format!("{}: expected float32 values: {e}", spec.head.display())))?;
        centres.truncate(spec.active_slots * dim);
        for (i, row) in centres.chunks_exact_mut(dim).enumerate() {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            if !norm.is_finite() || norm == 0.0 {
                return Err(err(format!("{}: row {i} has norm {norm}", spec.head.display())));
            }
            row.iter_mut().for_each(|v| *v /= norm);
        }

        let npy = open(&spec.labels)?;
        if npy.uses_pickled_array() {
            return Err(err(format!(
                "{} holds a pickled object array, which whaled does not unpickle; re-save it as text: \
                 python3 -c \"import numpy as np; a=np.load('{0}', allow_pickle=True); np.save('{0}', a.astype(str))\"",
                spec.labels.display()
            )));
        }
        let ids: Vec<String> = npy
            .into_vec()
            .map_err(|e| err(format!("{}: expected a numpy string array: {e}", spec.labels.display())))?;
        if ids.len() < spec.active_slots {
            return Err(err(format!(
                "{} has {} labels, fewer than active_slots = {}",
                spec.labels.display(),
                ids.len(),
                spec.active_slots
            )));
        }
        let ids: Vec<String> = ids.into_iter().take(spec.active_slots).collect();

        let mut reader = csv::Reader::from_path(&spec.species_map)
            .map_err(|e| err(format!("{}: {e}", spec.species_map.display())))?;
        let headers = reader.headers().map_err(|e| err(format!("{}: {e}", spec.species_map.display())))?.clone();
        let col = |name: &str| headers.iter().position(|h| h == name);
        let (Some(id_col), Some(sp_col)) = (col("individual_id"), col("species")) else {
            return Err(err(format!(
                "{} needs columns individual_id,species; it has {:?}",
                spec.species_map.display(),
                headers
            )));
        };
        let mut map = HashMap::new();
        for (n, row) in reader.records().enumerate() {
            let row = row.map_err(|e| err(format!("{}: {e}", spec.species_map.display())))?;
            match (row.get(id_col), row.get(sp_col)) {
                (Some(id), Some(sp)) => {
                    map.insert(id.to_string(), sp.to_string());
                }
                _ => {
                    return Err(err(format!(
                        "{} row {}: missing individual_id or species",
                        spec.species_map.display(),
                        n + 2
                    )))
                }
            }
        }
        let mut missing = 0usize;
        let species = ids
            .iter()
            .map(|id| {
                map.get(id).cloned().unwrap_or_else(|| {
                    missing += 1;
                    "unknown".to_string()
                })
            })
            .collect();
        if missing > 0 {
            log::warn!(
                "{}: {missing} of {} active individuals have no species in {}; reported as \"unknown\"",
                manifest.display(),
                spec.active_slots,
                spec.species_map.display()
            );
        }
        Ok(IdentificationHead { dim, centres, ids, species })
    }

    /// Builds a head from memory (tests, enrolment tools). `centres` is `ids.len() x dim`, any norm.
    pub fn from_parts(dim: usize, mut centres: Vec<f32>, ids: Vec<String>, species: Vec<String>) -> Result<Self> {
        if dim == 0 || centres.len() != ids.len() * dim || species.len() != ids.len() || ids.is_empty() {
            return Err(Error::Input(format!(
                "head parts disagree: {} centre values, dim {dim}, {} ids, {} species",
                centres.len(),
                ids.len(),
                species.len()
            )));
        }
        for row in centres.chunks_exact_mut(dim) {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            if norm > 0.0 {
                row.iter_mut().for_each(|v| *v /= norm);
            }
        }
        Ok(IdentificationHead { dim, centres, ids, species })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn slots(&self) -> usize {
        self.ids.len()
    }

    pub fn id(&self, slot: usize) -> &str {
        &self.ids[slot]
    }

    pub fn species(&self, slot: usize) -> &str {
        &self.species[slot]
    }

    /// Cosine similarity of an (L2-normalised) embedding with every active class centre: the gallery's
    /// vectorised dot product (a plain `sum` of products is one dependent chain of additions: 6-9 ms
    /// for the upstream's 15,587 x 512 head, against about 2 ms, the time to read the head from memory).
    pub fn cosines(&self, embedding: &[f32], out: &mut Vec<f32>) {
        out.clear();
        out.extend(self.centres.chunks_exact(self.dim).map(|row| crate::gallery::dot(row, embedding)));
    }
}

/// Checks a file a manifest pins by SHA-256 (`None`: not pinned); the error says which file and both digests.
pub fn verify_pinned(file: &Path, want: Option<&str>) -> std::result::Result<(), String> {
    let Some(want) = want else { return Ok(()) };
    let got = sha256_file(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    if got != want {
        return Err(format!(
            "{} has SHA-256 {got}, the manifest says {want}: the file is corrupt or not the one the manifest describes",
            file.display()
        ));
    }
    Ok(())
}

/// SHA-256 of a file, lowercase hex, read in 1 MiB blocks.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
