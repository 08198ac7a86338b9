//! Just enough of QMP, QEMU's JSON control protocol, on its unix socket.
//!
//! One command at a time: connect, read the greeting, `qmp_capabilities`, then a
//! command and its `return` (asynchronous events in between are skipped).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A QMP connection.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    deadline: Instant,
}

impl Qmp {
    /// Connects and negotiates capabilities, all within `timeout`.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + timeout;
        let stream = UnixStream::connect(socket)
            .map_err(|e| format!("cannot connect to QMP at {}: {e}", socket.display()))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            deadline,
        };
        let greeting = qmp.read_value()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("QMP sent no greeting but {greeting}"));
        }
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    fn read_value(&mut self) -> Result<Value, String> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("QMP did not answer in time".to_owned());
        }
        self.reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP closed the connection".to_owned()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("QMP sent bad JSON: {e}")),
            Err(e) => Err(format!("reading from QMP: {e}")),
        }
    }

    /// Runs `command` and returns its `return` value.
    pub fn execute(&mut self, command: &str) -> Result<Value, String> {
        let mut text = json!({ "execute": command }).to_string();
        text.push('\n');
        self.reader
            .get_mut()
            .write_all(text.as_bytes())
            .map_err(|e| format!("writing to QMP: {e}"))?;
        loop {
            let v = self.read_value()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP refused {command}: {e}"));
            }
            // An event (`{"event": ...}`): not the answer.
        }
    }

    /// `query-status`: the run state (`running`, `paused`, `shutdown`, ...).
    pub fn status(&mut self) -> Result<String, String> {
        let r = self.execute("query-status")?;
        Ok(r.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned())
    }
}
