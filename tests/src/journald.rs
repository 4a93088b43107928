//! A fake journald for tests of corald's journal output.
//!
//! corald logs to journald when `JOURNAL_STREAM` names its stderr, by sending native-protocol
//! datagrams to the fixed path `/run/systemd/journal/socket`. journald itself cannot run inside
//! the tests, and that path belongs to the host, so [`JournalSocket`] binds a datagram socket in
//! a directory of the test's own and [`JournalSocket::command`] starts corald in a private
//! mount namespace where that directory is `/run/systemd/journal` (needs root and `unshare`).
//! [`parse_journal_entry`] decodes what arrives.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::daemon::Daemon;

/// One journal entry: each field name with its values (a field may repeat).
pub type JournalEntry = HashMap<String, Vec<String>>;

/// Fields of one journald native-protocol datagram (`NAME=value\n`, or `NAME\n`, a 64-bit
/// little-endian length, the value, `\n`).
pub fn parse_journal_entry(buf: &[u8]) -> Result<JournalEntry> {
    let mut fields: JournalEntry = HashMap::new();
    let mut i = 0;
    while i < buf.len() {
        let nl = buf[i..]
            .iter()
            .position(|&b| b == b'\n')
            .context("field without newline")?;
        let line = &buf[i..i + nl];
        i += nl + 1;
        let (name, value) = match line.iter().position(|&b| b == b'=') {
            Some(eq) => (&line[..eq], line[eq + 1..].to_vec()),
            None => {
                let len_bytes: [u8; 8] =
                    buf.get(i..i + 8).context("truncated length")?.try_into()?;
                let len = usize::try_from(u64::from_le_bytes(len_bytes))?;
                i += 8;
                let v = buf.get(i..i + len).context("truncated value")?.to_vec();
                i += len;
                ensure!(
                    buf.get(i) == Some(&b'\n'),
                    "value not followed by a newline"
                );
                i += 1;
                (line, v)
            }
        };
        fields
            .entry(String::from_utf8_lossy(name).into_owned())
            .or_default()
            .push(String::from_utf8_lossy(&value).into_owned());
    }
    Ok(fields)
}

/// The fake journald's socket (`<dir>/socket`), read by a thread while corald runs: a full
/// datagram queue would block corald's logging.
pub struct JournalSocket {
    dir: PathBuf,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<Vec<Vec<u8>>>>,
}

impl JournalSocket {
    /// Create `dir` (it must not exist) and bind `dir/socket` in it.
    pub fn bind(dir: PathBuf) -> Result<JournalSocket> {
        std::fs::create_dir(&dir)?;
        let journal = UnixDatagram::bind(dir.join("socket"))?;
        journal.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut got = Vec::new();
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    match journal.recv(&mut buf) {
                        Ok(n) if n > 0 => got.push(buf[..n].to_vec()),
                        Ok(_) => {}
                        Err(_) if stop.load(Ordering::Relaxed) => return got,
                        Err(_) => {}
                    }
                }
            })
        };
        Ok(JournalSocket {
            dir,
            stop,
            reader: Some(reader),
        })
    }

    /// `d`'s command (see [`Daemon::command`]) run through `unshare` in a private mount
    /// namespace whose `/run/systemd/journal` is this socket's directory, with stderr (`d`'s
    /// log) named by `JOURNAL_STREAM` (device:inode), as systemd does for a service whose
    /// output goes to the journal.
    pub fn command(&self, d: &Daemon) -> Result<Command> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&d.log)?;
        let md = log.metadata()?;
        let script = r#"mount -t tmpfs coral-test /run && mkdir -p /run/systemd/journal && mount --bind "$CORAL_TEST_JOURNAL_DIR" /run/systemd/journal && exec "$0" "$@""#;
        let mut cmd = d.command(&[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
        ]);
        cmd.env("CORAL_TEST_JOURNAL_DIR", &self.dir)
            .env("JOURNAL_STREAM", format!("{}:{}", md.dev(), md.ino()));
        Ok(cmd)
    }

    /// Stop reading; every entry received, parsed, oldest first.
    pub fn entries(mut self) -> Result<Vec<JournalEntry>> {
        let datagrams = self.stop_reading()?;
        datagrams.iter().map(|d| parse_journal_entry(d)).collect()
    }

    fn stop_reading(&mut self) -> Result<Vec<Vec<u8>>> {
        self.stop.store(true, Ordering::Relaxed);
        match self.reader.take() {
            Some(r) => r
                .join()
                .map_err(|_| anyhow::anyhow!("journal reader panicked")),
            None => Ok(Vec::new()),
        }
    }
}

impl Drop for JournalSocket {
    fn drop(&mut self) {
        let _ = self.stop_reading();
    }
}
