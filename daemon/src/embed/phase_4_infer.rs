//! Stage 4, inference: one thread owns the TorchScript model (libtorch through `tch`, behind the
//! `embed` cargo feature). It pulls decoded tracks from a bounded queue into the batcher, runs a
//! forward pass when a batch is full or the oldest window has waited `flush_after`, and hands
//! finished tracks to the store stage. On a CUDA out-of-memory error it halves the batch and
//! retries (and keeps the smaller size).
//!
//! Device: `auto` uses CUDA when an NVIDIA driver is present and libtorch's CUDA backend loads
//! and finds a device; otherwise CPU. libtorch's CUDA backend (`libtorch_cuda.so`) is loaded at
//! run time with `dlopen` rather than linked: the linker drops it (`--as-needed`, nothing
//! references it directly), and loading it only where a driver exists keeps CPU machines free
//! of the CUDA libraries it needs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::model::ModelFiles;
use super::phase_3_batch::{Batcher, Failed, Finished};

pub use crate::config::embed::DeviceChoice;

/// Why the model cannot run.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error(
        "corald was built without the `embed` feature (libtorch); rebuild with `--features corald/embed`"
    )]
    FeatureDisabled,
    #[error("device {device}: {message}")]
    Device { device: String, message: String },
    #[error("libtorch cannot load model {path}: {message}")]
    Load { path: String, message: String },
    #[error("model {path} does not follow its manifest: {message}")]
    Contract { path: String, message: String },
}

/// A failed forward pass.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ForwardError {
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    #[error("inference failed: {0}")]
    Failed(String),
}

/// Something that turns `rows` windows (`rows × row_len` samples) into `rows × dim` values:
/// the TorchScript model, or a stand-in in tests.
pub trait Forward {
    fn forward(&mut self, input: &[f32], rows: usize) -> Result<Vec<f32>, ForwardError>;
    /// Samples per row.
    fn row_len(&self) -> usize;
    /// Values per output row.
    fn dim(&self) -> usize;
    /// `cpu` or `cuda:N`.
    fn device_label(&self) -> String;
    /// True on an accelerator (bigger default batches).
    fn is_accelerator(&self) -> bool {
        false
    }
}

/// Run `rows` windows; on out-of-memory, split in halves (recursively) and lower `max_rows`.
pub fn forward_with_retry<F: Forward + ?Sized>(
    model: &mut F,
    input: &[f32],
    rows: usize,
    max_rows: &mut usize,
) -> Result<Vec<f32>, ForwardError> {
    match model.forward(input, rows) {
        Err(ForwardError::OutOfMemory(msg)) if rows > 1 => {
            let half = rows / 2;
            *max_rows = (*max_rows).min(half).max(1);
            tracing::warn!(rows, now = *max_rows, error = %msg, "out of memory: halving the batch");
            let row_len = input.len() / rows;
            let mut first = forward_with_retry(model, &input[..half * row_len], half, max_rows)?;
            let second =
                forward_with_retry(model, &input[half * row_len..], rows - half, max_rows)?;
            first.extend(second);
            Ok(first)
        }
        other => other,
    }
}

/// Counters of the inference thread, read by `Embedder::stats`.
#[derive(Debug, Default)]
pub struct InferStats {
    pub windows: AtomicU64,
    pub batches: AtomicU64,
    pub busy_us: AtomicU64,
    pub queued_tracks: AtomicU64,
}

/// A track's windows, ready for the model.
pub struct InferInput<T> {
    pub meta: T,
    pub samples: Vec<f32>,
    pub windows: usize,
}

/// What the inference thread settles.
pub enum InferOutput<T> {
    Done(Finished<T>),
    Failed(Failed<T>),
}

/// How the inference loop batches.
#[derive(Debug, Clone, Copy)]
pub struct LoopConfig {
    pub max_rows: usize,
    pub flush_after: Duration,
}

/// The inference thread's body: runs until `rx` is closed and drained, `emit` returns false
/// (nobody listens), or `stop` is cancelled. `keep` is false for tracks of cancelled jobs,
/// which are dropped without a report. `beat` is called at least every 200 ms while idle and
/// after every forward pass (the liveness heartbeat).
#[allow(clippy::too_many_arguments)]
pub fn run_loop<T, F: Forward + ?Sized>(
    model: &mut F,
    rx: Receiver<InferInput<T>>,
    mut emit: impl FnMut(InferOutput<T>) -> bool,
    keep: impl Fn(&T) -> bool,
    cfg: LoopConfig,
    stop: &CancellationToken,
    stats: &InferStats,
    beat: impl Fn(),
) {
    let mut batcher: Batcher<T> = Batcher::new(model.row_len(), model.dim());
    let mut max_rows = cfg.max_rows.max(1);
    let mut oldest: Option<Instant> = None;
    let mut closed = false;
    loop {
        beat();
        if stop.is_cancelled() {
            return;
        }
        if !closed && batcher.pending_windows() < max_rows {
            let wait = match oldest {
                None => Duration::from_millis(200),
                Some(t) => (t + cfg.flush_after).saturating_duration_since(Instant::now()),
            };
            match rx.recv_timeout(wait) {
                Ok(input) => {
                    stats.queued_tracks.fetch_sub(1, Ordering::Relaxed);
                    if !keep(&input.meta) {
                        continue;
                    }
                    if oldest.is_none() {
                        oldest = Some(Instant::now());
                    }
                    if let Err(f) = batcher.push(input.meta, input.samples, input.windows)
                        && !emit(InferOutput::Failed(f))
                    {
                        return;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => {
                    if batcher.pending_windows() == 0 {
                        continue;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => closed = true,
            }
        }
        batcher.retain(&keep);
        let Some(batch) = batcher.next_batch(max_rows) else {
            if closed {
                return;
            }
            oldest = None;
            continue;
        };
        oldest = (batcher.pending_windows() > 0).then(Instant::now);
        let started = Instant::now();
        let rows = batch.rows;
        let result = forward_with_retry(model, &batch.input, rows, &mut max_rows);
        stats
            .busy_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        let (done, failed) = match result {
            Ok(y) => {
                stats.windows.fetch_add(rows as u64, Ordering::Relaxed);
                batcher.complete(batch, &y)
            }
            Err(e) => {
                tracing::warn!(rows, error = %e, "forward pass failed");
                (Vec::new(), batcher.fail(batch, &e.to_string()))
            }
        };
        for d in done {
            if !emit(InferOutput::Done(d)) {
                return;
            }
        }
        for f in failed {
            if !emit(InferOutput::Failed(f)) {
                return;
            }
        }
    }
}

/// Load the model for the inference thread (call it on that thread: libtorch's CPU thread
/// count is set for the calling thread). `threads`: intra-op threads on CPU.
#[cfg(feature = "embed")]
pub fn load_model(
    files: &ModelFiles,
    choice: DeviceChoice,
    threads: usize,
    row_len: usize,
) -> Result<Box<dyn Forward + Send>, InferError> {
    Ok(Box::new(torch::TorchModel::load(
        files, choice, threads, row_len,
    )?))
}

/// Without the `embed` feature there is no libtorch: embeddings are unavailable.
#[cfg(not(feature = "embed"))]
pub fn load_model(
    _files: &ModelFiles,
    _choice: DeviceChoice,
    _threads: usize,
    _row_len: usize,
) -> Result<Box<dyn Forward + Send>, InferError> {
    Err(InferError::FeatureDisabled)
}

/// Whether `choice` resolves to an accelerator on this machine (`auto` with a usable CUDA
/// device, or an explicit `cuda[:N]` that works). Chooses the default model; loads the CUDA
/// backend when it is asked for, as the model's own load would.
#[cfg(feature = "embed")]
pub fn resolves_to_accelerator(choice: DeviceChoice) -> Result<bool, InferError> {
    Ok(torch::resolve(choice)? != tch::Device::Cpu)
}

/// Without the `embed` feature nothing runs anywhere; the caller fails on `available()`.
#[cfg(not(feature = "embed"))]
pub fn resolves_to_accelerator(_choice: DeviceChoice) -> Result<bool, InferError> {
    Ok(false)
}

/// Whether this build can run models at all.
pub const fn available() -> bool {
    cfg!(feature = "embed")
}

#[cfg(feature = "embed")]
pub use torch::TorchModel;

#[cfg(feature = "embed")]
mod torch {
    use std::ffi::CString;
    use std::path::Path;
    use std::sync::OnceLock;

    use tch::{CModule, Device, Kind, Tensor};

    use super::{DeviceChoice, Forward, ForwardError, InferError, ModelFiles};

    /// Present on machines with the NVIDIA kernel driver.
    const NVIDIA_DRIVER: &str = "/proc/driver/nvidia/version";

    /// The directory of the shared library `name` mapped into this process, from
    /// `/proc/self/maps`.
    pub(super) fn loaded_library_dir(name: &str) -> Option<std::path::PathBuf> {
        let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
        maps.lines()
            .filter_map(|line| line.split_whitespace().nth(5))
            .map(Path::new)
            .find(|p| p.file_name().is_some_and(|f| f == name))
            .and_then(Path::parent)
            .map(Path::to_path_buf)
    }

    /// `dlopen` libtorch's CUDA backend once; registers CUDA with libtorch when it loads.
    fn load_cuda_backend() -> Result<(), String> {
        static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
        LOADED
            .get_or_init(|| {
                let mut candidates = Vec::new();
                // First beside the libtorch_cpu.so this process loaded (the installed package's
                // /usr/lib/coral/torch/lib, whichever of coral-libtorch or -cuda is there), then
                // in the libtorch this binary was linked against (set by build.rs), then by name.
                let dirs = [
                    loaded_library_dir("libtorch_cpu.so"),
                    option_env!("CORAL_LIBTORCH_LIB")
                        .map(Path::new)
                        .map(Path::to_path_buf),
                ];
                for dir in dirs.into_iter().flatten() {
                    let p = dir.join("libtorch_cuda.so").to_string_lossy().into_owned();
                    if Path::new(&p).exists() && !candidates.contains(&p) {
                        candidates.push(p);
                    }
                }
                candidates.push("libtorch_cuda.so".to_owned());
                let mut last = String::new();
                for c in candidates {
                    let Ok(name) = CString::new(c.clone()) else {
                        continue;
                    };
                    // SAFETY: a plain dlopen of a library path; the handle is kept for the
                    // life of the process (never closed), as libtorch expects.
                    let handle =
                        unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
                    if !handle.is_null() {
                        tracing::debug!(library = %c, "loaded libtorch's CUDA backend");
                        return Ok(());
                    }
                    // SAFETY: dlerror returns a thread-local C string or null.
                    let err = unsafe { libc::dlerror() };
                    last = if err.is_null() {
                        format!("{c}: unknown error")
                    } else {
                        // SAFETY: non-null dlerror result is a valid C string.
                        unsafe { std::ffi::CStr::from_ptr(err) }
                            .to_string_lossy()
                            .into_owned()
                    };
                }
                Err(last)
            })
            .clone()
    }

    /// A device as `embed.device` names it.
    fn label(device: Device) -> String {
        match device {
            Device::Cuda(n) => format!("cuda:{n}"),
            _ => "cpu".to_owned(),
        }
    }

    pub(super) fn resolve(choice: DeviceChoice) -> Result<Device, InferError> {
        match choice {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Auto => {
                if !Path::new(NVIDIA_DRIVER).exists() {
                    return Ok(Device::Cpu);
                }
                match load_cuda_backend() {
                    Ok(()) if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
                    Ok(()) => {
                        tracing::info!(
                            "NVIDIA driver present but CUDA reports no device: using CPU"
                        );
                        Ok(Device::Cpu)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "NVIDIA driver present but libtorch's CUDA backend cannot be loaded: using CPU");
                        Ok(Device::Cpu)
                    }
                }
            }
            DeviceChoice::Cuda(n) => {
                let device = format!("cuda:{n}");
                let fail = |message: String| InferError::Device {
                    device: device.clone(),
                    message,
                };
                load_cuda_backend().map_err(|e| {
                    fail(format!(
                        "libtorch's CUDA backend cannot be loaded ({e}); build against a CUDA \
                         libtorch (the full torch install) or set `embed.device = \"cpu\"`"
                    ))
                })?;
                if !tch::Cuda::is_available() {
                    return Err(fail("CUDA reports no usable device (driver?)".into()));
                }
                let count = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
                if n >= count {
                    return Err(fail(format!("only {count} CUDA device(s) present")));
                }
                Ok(Device::Cuda(n))
            }
        }
    }

    fn classify(e: tch::TchError) -> ForwardError {
        let msg = e.to_string();
        if msg.to_ascii_lowercase().contains("out of memory") {
            ForwardError::OutOfMemory(msg)
        } else {
            ForwardError::Failed(msg)
        }
    }

    /// The TorchScript model on its device.
    pub struct TorchModel {
        module: CModule,
        device: Device,
        row_len: usize,
        dim: usize,
    }

    impl TorchModel {
        pub fn load(
            files: &ModelFiles,
            choice: DeviceChoice,
            threads: usize,
            row_len: usize,
        ) -> Result<TorchModel, InferError> {
            let mut device = resolve(choice)?;
            if files.manifest.cpu_only && device != Device::Cpu {
                if choice != DeviceChoice::Auto {
                    return Err(InferError::Device {
                        device: label(device),
                        message: format!(
                            "model {} runs on a CPU only (int8 kernels); set `embed.model = \"{}\"` \
                             for CUDA, or `embed.device = \"cpu\"`",
                            files.manifest.name,
                            crate::embed::model::DEFAULT_ACCELERATOR_MODEL
                        ),
                    });
                }
                tracing::warn!(
                    model = %files.manifest.name,
                    "this model runs on a CPU only (int8 kernels): not using CUDA; set \
                     `embed.model = \"{}\"` to embed on the GPU",
                    crate::embed::model::DEFAULT_ACCELERATOR_MODEL
                );
                device = Device::Cpu;
            }
            if device == Device::Cpu {
                tch::set_num_threads(i32::try_from(threads.max(1)).unwrap_or(1));
            }
            let path = files.path.display().to_string();
            let mut reader = std::io::Cursor::new(files.bytes.as_slice());
            let mut module = CModule::load_data_on_device(&mut reader, device).map_err(|e| {
                InferError::Load {
                    path: path.clone(),
                    message: e.to_string(),
                }
            })?;
            module.f_set_eval().map_err(|e| InferError::Load {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let mut model = TorchModel {
                module,
                device,
                row_len,
                dim: files.manifest.embedding_dim,
            };
            // One forward pass checks the contract (and warms libtorch up).
            let probe = vec![0.0f32; row_len];
            model.forward(&probe, 1).map_err(|e| InferError::Contract {
                path,
                message: e.to_string(),
            })?;
            Ok(model)
        }

        fn run(&self, input: &[f32], rows: usize) -> Result<Vec<f32>, tch::TchError> {
            let _guard = tch::no_grad_guard();
            let x = Tensor::f_from_slice(input)?
                .f_view([rows as i64, self.row_len as i64])?
                .f_to_device(self.device)?;
            let y = self.module.forward_ts(&[x])?;
            let size = y.size();
            if size != [rows as i64, self.dim as i64] {
                return Err(tch::TchError::Shape(format!(
                    "output shape {size:?}, expected [{rows}, {}]",
                    self.dim
                )));
            }
            let flat = y
                .f_to_device(Device::Cpu)?
                .f_to_kind(Kind::Float)?
                .f_contiguous()?
                .f_view([-1i64])?;
            Vec::<f32>::try_from(&flat)
        }
    }

    impl Forward for TorchModel {
        fn forward(&mut self, input: &[f32], rows: usize) -> Result<Vec<f32>, ForwardError> {
            if rows == 0 || input.len() != rows * self.row_len {
                return Err(ForwardError::Failed(format!(
                    "{} samples for {rows} rows of {}",
                    input.len(),
                    self.row_len
                )));
            }
            self.run(input, rows).map_err(classify)
        }

        fn row_len(&self) -> usize {
            self.row_len
        }

        fn dim(&self) -> usize {
            self.dim
        }

        fn device_label(&self) -> String {
            label(self.device)
        }

        fn is_accelerator(&self) -> bool {
            matches!(self.device, Device::Cuda(_))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stands in for a GPU with little memory (no GPU here): fails batches above `limit` rows
    /// with CUDA's out-of-memory message.
    struct FakeGpuWithLittleMemory {
        limit: usize,
        calls: Vec<usize>,
    }

    impl Forward for FakeGpuWithLittleMemory {
        fn forward(&mut self, input: &[f32], rows: usize) -> Result<Vec<f32>, ForwardError> {
            self.calls.push(rows);
            if rows > self.limit {
                return Err(ForwardError::OutOfMemory(
                    "CUDA out of memory. Tried to allocate 2.00 GiB".into(),
                ));
            }
            Ok(input.chunks(2).map(|w| w[0] * 2.0).collect())
        }
        fn row_len(&self) -> usize {
            2
        }
        fn dim(&self) -> usize {
            1
        }
        fn device_label(&self) -> String {
            "cuda:0 (fake)".into()
        }
    }

    #[test]
    fn fake_gpu_out_of_memory_halves_the_batch_and_keeps_the_order() {
        let mut m = FakeGpuWithLittleMemory {
            limit: 3,
            calls: Vec::new(),
        };
        let input: Vec<f32> = (0..20).map(|i| i as f32).collect();
        let mut max_rows = 10;
        let y = forward_with_retry(&mut m, &input, 10, &mut max_rows).expect("runs in halves");
        assert_eq!(y, (0..10).map(|i| (2 * i) as f32 * 2.0).collect::<Vec<_>>());
        assert_eq!(max_rows, 2, "the batch size stays lowered");
        assert_eq!(m.calls[0], 10);
        assert!(m.calls[1..].iter().all(|r| *r <= 5));
        // A single row that does not fit is an error, not an endless retry.
        let mut tiny = FakeGpuWithLittleMemory {
            limit: 0,
            calls: Vec::new(),
        };
        assert!(forward_with_retry(&mut tiny, &input[..2], 1, &mut max_rows).is_err());
    }

    #[test]
    fn device_strings() {
        assert_eq!(DeviceChoice::parse("auto"), Some(DeviceChoice::Auto));
        assert_eq!(DeviceChoice::parse("cpu"), Some(DeviceChoice::Cpu));
        assert_eq!(DeviceChoice::parse("cuda"), Some(DeviceChoice::Cuda(0)));
        assert_eq!(DeviceChoice::parse("cuda:3"), Some(DeviceChoice::Cuda(3)));
        assert_eq!(DeviceChoice::parse("gpu"), None);
        assert_eq!(DeviceChoice::parse("cuda:x"), None);
    }

    #[test]
    fn the_loop_batches_across_tracks_and_drains_on_close() {
        struct Doubler;
        impl Forward for Doubler {
            fn forward(&mut self, input: &[f32], _rows: usize) -> Result<Vec<f32>, ForwardError> {
                Ok(input.chunks(2).flat_map(|w| [w[0], 1.0]).collect())
            }
            fn row_len(&self) -> usize {
                2
            }
            fn dim(&self) -> usize {
                2
            }
            fn device_label(&self) -> String {
                "test".into()
            }
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        let stats = InferStats::default();
        for id in 0..5u32 {
            stats.queued_tracks.fetch_add(1, Ordering::Relaxed);
            tx.send(InferInput {
                meta: id,
                samples: vec![id as f32 + 1.0; 6],
                windows: 3,
            })
            .expect("send");
        }
        drop(tx);
        let mut done = Vec::new();
        let beats = std::cell::Cell::new(0u64);
        run_loop(
            &mut Doubler,
            rx,
            |o| {
                if let InferOutput::Done(f) = o {
                    done.push(f.meta);
                }
                true
            },
            |m| *m != 2,
            LoopConfig {
                max_rows: 4,
                flush_after: Duration::from_millis(5),
            },
            &CancellationToken::new(),
            &stats,
            || beats.set(beats.get() + 1),
        );
        done.sort();
        assert_eq!(done, vec![0, 1, 3, 4], "track 2 was cancelled");
        assert_eq!(stats.windows.load(Ordering::Relaxed), 12);
        assert!(stats.batches.load(Ordering::Relaxed) >= 3);
        assert!(
            beats.get() > stats.batches.load(Ordering::Relaxed),
            "the heartbeat beats around every forward pass ({} beats, {} batches)",
            beats.get(),
            stats.batches.load(Ordering::Relaxed)
        );
    }

    #[cfg(feature = "embed")]
    #[test]
    fn the_cuda_backend_is_looked_for_beside_the_loaded_libtorch() {
        // libtorch_cpu.so is linked into this test binary: its directory is where an installed
        // coral-libtorch-cuda puts libtorch_cuda.so.
        let dir =
            super::torch::loaded_library_dir("libtorch_cpu.so").expect("libtorch_cpu.so is mapped");
        assert!(dir.join("libtorch_cpu.so").is_file(), "{}", dir.display());
        assert_eq!(
            super::torch::loaded_library_dir("libnot_loaded_here.so"),
            None
        );
    }
}
