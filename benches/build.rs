//! Build script: with corald's `embed` feature on, give the bench binaries an rpath to the
//! libtorch corald was built against (corald's build script passes it on as
//! `DEP_CORALD_TORCH_LIBTORCH_LIB`), so they run with no `LD_LIBRARY_PATH`.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_CORALD_TORCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_CORALD_TORCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
