//! The `bearer-proxy` binary: everything lives in the library; see `bearer_proxy::cli`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(bearer_proxy::cli::main())
}
