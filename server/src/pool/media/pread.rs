//! A read-only medium over a regular file, read with `pread(2)`: what offline checks use.
//!
//! A mapping of a file faults with SIGBUS where the file is shorter than the mapping (a
//! truncated or hostile image) or where a page cannot be provided (a hole on a full tmpfs). A
//! `pread` returns an error or zeros instead, so `rdaxctl fsck` reports such a pool as damaged
//! rather than dying. Short reads past the end read as zero, like the rest of a hole.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::mapped::MapError;
use super::{Media, Persistence, PoolMode, check_range};

/// A read-only view of a pool file.
#[derive(Debug)]
pub struct PreadMedia {
    file: File,
    len: u64,
    mode: PoolMode,
    path: PathBuf,
}

impl PreadMedia {
    /// Open `path` (a regular file) for reading.
    pub fn open(path: &Path, mode: PoolMode) -> Result<Self, MapError> {
        let io = |op| {
            let path = path.to_path_buf();
            move |source| MapError::Io { path, op, source }
        };
        let file = File::open(path).map_err(io("open the pool"))?;
        let len = file.metadata().map_err(io("stat the pool"))?.len() / 4096 * 4096;
        if len == 0 {
            return Err(MapError::Unsupported { path: path.to_path_buf(), detail: "empty file".into() });
        }
        Ok(Self { file, len, mode, path: path.to_path_buf() })
    }
}

impl Media for PreadMedia {
    fn len(&self) -> u64 {
        self.len
    }

    fn read(&self, off: u64, dst: &mut [u8]) {
        check_range(off, dst.len() as u64, self.len);
        let mut done = 0;
        while done < dst.len() {
            match self.file.read_at(&mut dst[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // An unreadable page is reported by the checks that find garbage in it.
                    tracing::warn!(path = %self.path.display(), off, error = %e, "read failed; treating the bytes as zero");
                    break;
                }
            }
        }
        dst[done..].fill(0);
    }

    fn write(&self, _off: u64, _src: &[u8]) {
        panic!("store to a read-only pool view");
    }

    fn fill(&self, _off: u64, _len: u64, _byte: u8) {
        panic!("store to a read-only pool view");
    }

    fn write_u64_atomic(&self, _off: u64, _value: u64) {
        panic!("store to a read-only pool view");
    }

    fn flush(&self, _off: u64, _len: u64) {}

    fn drain(&self) {}

    fn mode(&self) -> PoolMode {
        self.mode
    }

    fn persistence(&self) -> Persistence {
        Persistence::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_past_a_shrunk_end_are_zero_not_sigbus() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![7u8; 16384]).unwrap();
        let m = PreadMedia::open(&p, PoolMode::File).unwrap();
        // The file shrinks under the reader (a mapping would now fault on the last pages).
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(5000).unwrap();
        let mut b = vec![1u8; 8192];
        m.read(4096, &mut b);
        assert!(b[..904].iter().all(|&x| x == 7));
        assert!(b[904..].iter().all(|&x| x == 0));
    }
}
