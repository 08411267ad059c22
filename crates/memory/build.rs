//! `MRREC_SKIP_PG=1` at build time marks the PostgreSQL tests ignored, so that a run without
//! PostgreSQL reports them as skipped (nextest: SKIP), never as passed.
fn main() {
    println!("cargo:rustc-check-cfg=cfg(mrrec_skip_pg)");
    println!("cargo:rerun-if-env-changed=MRREC_SKIP_PG");
    if std::env::var("MRREC_SKIP_PG").is_ok_and(|v| v == "1") {
        println!("cargo:rustc-cfg=mrrec_skip_pg");
    }
}
