//! The bearer token TCP clients present.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Random bytes in a new token (64 hex digits).
const TOKEN_BYTES: usize = 32;

/// Longest token file read back (a token is 64 characters; this leaves room for
/// one written by hand).
const MAX_TOKEN_FILE: u64 = 4096;

/// A bearer token. Its `Debug` does not show it.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// Loads the token at `path`, or creates one there: 32 bytes from
    /// `/dev/urandom`, hex-encoded, in a file of mode 0600 (its parent directory,
    /// if missing, is created 0700). The new file appears whole or not at all
    /// (written and synced under a temporary name, then linked into place, then
    /// the directory synced); a second process creating it at the same moment
    /// loses the race and loads the winner's. Returns whether it was created.
    ///
    /// An existing file that is not a regular file, is readable or writable by
    /// group or others, or holds no valid token is refused with an error that
    /// names the file.
    pub fn load_or_create(path: &Path) -> io::Result<(Token, bool)> {
        match Self::load(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => return other.map(|t| (t, false)),
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| context(e, dir, "cannot create the token's directory"))?;
        let token = Token(hex(&random_bytes()?));
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(token.0.as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(context(e, &tmp, "cannot write a new token"));
        }
        let linked = fs::hard_link(&tmp, path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| context(e, dir, "cannot sync the token's directory"))?;
                Ok((token, true))
            }
            // Another process created it first: use theirs.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Self::load(path).map(|t| (t, false))
            }
            Err(e) => Err(context(e, path, "cannot create the token file")),
        }
    }

    fn load(path: &Path) -> io::Result<Token> {
        let mut f = File::open(path)?;
        let meta = f.metadata()?;
        if !meta.is_file() {
            return Err(invalid(path, "is not a regular file"));
        }
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{}: the token file has mode {mode:04o}, so group or others may read or \
                     change it; make it private (chmod 600) or remove it to have a new one made",
                    path.display()
                ),
            ));
        }
        let mut text = String::new();
        (&mut f)
            .take(MAX_TOKEN_FILE)
            .read_to_string(&mut text)
            .map_err(|e| context(e, path, "cannot read the token file"))?;
        let token = text.trim_end_matches(['\n', '\r']);
        if token.is_empty() || token.len() >= MAX_TOKEN_FILE as usize {
            return Err(invalid(path, "holds no token"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                path,
                "holds a token with a space or a character that is not printable ASCII",
            ));
        }
        Ok(Token(token.to_owned()))
    }

    /// The token, to print for whoever sets up a client.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether an `Authorization` header value is `Bearer <this token>` (the
    /// scheme is case-insensitive). The token is compared in constant time: every
    /// byte of the longer of the two is looked at, whatever differs and where.
    pub fn matches(&self, header_value: &[u8]) -> bool {
        const SCHEME: &[u8] = b"bearer ";
        let Some(scheme) = header_value.get(..SCHEME.len()) else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case(SCHEME) {
            return false;
        }
        let given = header_value[SCHEME.len()..].trim_ascii();
        constant_time_eq(self.0.as_bytes(), given)
    }
}

/// Equality whose time depends on the longer length only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    // Lengths differ: not equal, but still look at every byte.
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

fn random_bytes() -> io::Result<[u8; TOKEN_BYTES]> {
    let mut buf = [0u8; TOKEN_BYTES];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| context(e, Path::new("/dev/urandom"), "cannot read random bytes"))?;
    Ok(buf)
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

fn context(e: io::Error, path: &Path, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {what}: {e}", path.display()))
}

fn invalid(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: the token file {what}", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        // A longer one that differs only by trailing NULs (what the padding reads).
        assert!(!constant_time_eq(b"ab", b"ab\0"));
    }

    #[test]
    fn hex_digits() {
        assert_eq!(hex(&[0x00, 0x9f, 0xff]), "009fff");
    }
}
