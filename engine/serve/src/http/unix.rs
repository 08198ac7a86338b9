//! The unix socket listener.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use futures_lite::FutureExt;

/// How long a socket that may be live is given to answer `connect`.
const PROBE: Duration = Duration::from_secs(2);

/// Binds a unix socket at `path`, mode 0600.
///
/// A socket file already there is removed only if nothing listens on it
/// (`connect` is refused: a daemon that died left it); one that answers (or does
/// not refuse within 2 s) is left alone and `AddrInUse` returned. A path that is
/// not a socket is never removed.
///
/// The mode is set just after `bind`: until then the file has the mode the
/// umask gives, so keep the socket in a private directory (the state directory).
pub fn bind_unix(path: &Path) -> io::Result<async_net::unix::UnixListener> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(context(e, path, "cannot look at the socket path")),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: exists and is not a socket", path.display()),
            ));
        }
        Ok(_) => match probe(path) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!("{}: removing a stale socket", path.display());
                std::fs::remove_file(path)
                    .map_err(|e| context(e, path, "cannot remove the stale socket"))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Ok(()) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{}: another server listens on this socket", path.display()),
                ));
            }
            Err(e) => return Err(context(e, path, "cannot tell whether the socket is live")),
        },
    }
    let listener = async_net::unix::UnixListener::bind(path)
        .map_err(|e| context(e, path, "cannot bind the socket"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| context(e, path, "cannot make the socket private"))?;
    Ok(listener)
}

/// Connects to the socket at `path` and hangs up: `Ok` if something listens.
fn probe(path: &Path) -> io::Result<()> {
    async_io::block_on(
        async { async_net::unix::UnixStream::connect(path).await.map(drop) }.or(async {
            async_io::Timer::after(PROBE).await;
            // A listener too busy to accept is still live.
            Ok(())
        }),
    )
}

fn context(e: io::Error, path: &Path, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {what}: {e}", path.display()))
}
