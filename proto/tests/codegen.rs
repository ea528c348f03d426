//! Regenerates the committed Rust code from the `.proto` files and fails on a diff.

use std::path::Path;

#[test]
fn generated_code_is_up_to_date() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile(["proctor/agent/v1/agent.proto"], [root.join("proto")]).expect("agent.proto compiles");
    let out = std::env::temp_dir().join(format!("proctor-proto-gen-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .out_dir(&out)
        .compile_fds(fds)
        .expect("code generation succeeds");

    let fresh = std::fs::read_to_string(out.join("proctor.agent.v1.rs")).unwrap();
    let committed_path = root.join("src/gen/proctor.agent.v1.rs");
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    std::fs::remove_dir_all(&out).ok();
    if fresh != committed {
        if std::env::var_os("PROCTOR_BLESS").is_some() {
            std::fs::write(&committed_path, fresh).unwrap();
            return;
        }
        panic!(
            "{} is stale: the .proto files changed. Regenerate with \
             `PROCTOR_BLESS=1 cargo nextest run -p proto` and commit the result.",
            committed_path.display()
        );
    }
}
