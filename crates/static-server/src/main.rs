//! `kiln-static-server [DIR]`: serves DIR (default: the working directory) on `0.0.0.0:$PORT`
//! (8080 when `PORT` is unset).
//!
//! Exit status: 2 for a bad argument or `PORT`, 1 when the port cannot be bound.

#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let root = args.next().map(PathBuf::from).unwrap_or_else(|| ".".into());
    if args.next().is_some() {
        eprintln!("usage: kiln-static-server [DIR]");
        return ExitCode::from(2);
    }
    let port = match kiln_static_server::port_from_env(std::env::var("PORT").ok().as_deref()) {
        Ok(port) => port,
        Err(e) => {
            eprintln!("kiln-static-server: {e}");
            return ExitCode::from(2);
        }
    };
    if !root.is_dir() {
        eprintln!("kiln-static-server: {} is not a directory", root.display());
        return ExitCode::from(2);
    }
    let listener = match TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("kiln-static-server: cannot listen on port {port}: {e}");
            return ExitCode::from(1);
        }
    };
    eprintln!(
        "kiln-static-server: serving {} on port {port}",
        root.display()
    );
    match kiln_static_server::serve(root, listener) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-static-server: {e}");
            ExitCode::from(1)
        }
    }
}
