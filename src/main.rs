//! The `virtdisk-csi` binary: everything lives in the library ([`virtdisk_csi::cli`]).

fn main() -> std::process::ExitCode {
    virtdisk_csi::cli::main()
}
