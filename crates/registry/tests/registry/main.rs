//! Integration tests of kiln-registry against real `docker-registry` processes, with skopeo as
//! the independent client on the other side. One test binary, several modules, so the
//! workspace links it once.

mod anonymous;
mod basic_tls;
mod memory;
mod support;
mod token;
mod user_tls;
