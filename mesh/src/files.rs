//! Private files: the keys and join state only their owner may read.

use std::io::Write as _;
use std::path::Path;

/// Writes `contents` to a new file at `path` readable by its owner only, atomically (a
/// temporary file renamed into place, synced first).
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    replace_private(path, contents, true)
}

/// As [`write_private`], without waiting for the disk: for reports rewritten every few seconds,
/// which a crash may lose but must never leave half written.
pub fn write_private_unsynced(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    replace_private(path, contents, false)
}

fn replace_private(path: &Path, contents: &[u8], sync: bool) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let mut file = options.open(&temporary)?;
        file.write_all(contents)?;
        if sync {
            file.sync_all()?;
        }
    }
    std::fs::rename(&temporary, path)?;
    if sync && let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Makes the directory `path` (and its parents), readable by its owner only when it is new.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(path)
}

/// The value kept in the key file `path`, read with `parse`; when the file does not exist,
/// `make` gives a new value and its text, which is written there privately. A file `parse`
/// cannot read is an error naming it and `what` it should hold.
pub(crate) fn load_or_make<T>(
    path: &Path,
    what: &str,
    parse: impl FnOnce(&str) -> Option<T>,
    make: impl FnOnce() -> (T, String),
) -> std::io::Result<T> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: not {what}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (value, text) = make();
            write_private(path, text.as_bytes())?;
            Ok(value)
        }
        Err(e) => Err(e),
    }
}
