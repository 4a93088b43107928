//! Build script: rebuild when migrations change (`sqlx::migrate!` embeds them), and, with the
//! `embed` feature, point binaries at libtorch.
//!
//! torch-sys (`links = "tch"`) exports the libtorch library directory as
//! `DEP_TCH_LIBTORCH_LIB`. We turn it into an rpath for corald's own binaries and tests (so they
//! run with no `LD_LIBRARY_PATH`), into `CORAL_LIBTORCH_LIB` for the code (which `dlopen`s
//! libtorch's CUDA backend from there on GPU machines), and into `cargo:libtorch_lib` metadata
//! (this package `links = "corald_torch"`) so crates depending on corald can add the same rpath
//! to their binaries from their own build scripts (`DEP_CORALD_TORCH_LIBTORCH_LIB`).
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        println!("cargo:rustc-env=CORAL_LIBTORCH_LIB={lib}");
        println!("cargo:libtorch_lib={lib}");
    }
}
