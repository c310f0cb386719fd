//! Python face of the benchmark load generators (`podrouter_io::blast`).
//!
//! Each call blocks for its whole duration with the GIL released, so a Python driver can run a
//! sink and a sender in two threads of one process, or in two processes in different namespaces.

use std::net::{IpAddr, SocketAddr};

use podrouter_io::blast;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

fn addr(host: &str, port: u16) -> PyResult<SocketAddr> {
    let ip: IpAddr = host
        .parse()
        .map_err(|_| PyValueError::new_err(format!("not an IP address: {host:?}")))?;
    Ok(SocketAddr::new(ip, port))
}

fn to_py_err(e: std::io::Error) -> PyErr {
    if e.kind() == std::io::ErrorKind::InvalidInput {
        PyValueError::new_err(e.to_string())
    } else {
        PyOSError::new_err(e.to_string())
    }
}

/// `count` per second over `seconds`; 0 for an empty window (a run that ended at once).
fn per_second(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

/// A dict of a report's fields, keys in the order given (the order the docstrings list).
macro_rules! report_dict {
    ($py:expr, { $($key:literal => $value:expr),* $(,)? }) => {{
        let d = PyDict::new($py);
        $(d.set_item($key, $value)?;)*
        d
    }};
}

/// Send `size`-byte UDP datagrams to dst:port in sendmmsg batches for `seconds` (capped at 30 s).
///
/// Returns {"packets", "bytes", "errors", "calls", "seconds", "pps"} as seen by the sender.
#[pyfunction]
#[pyo3(signature = (dst, port, size, seconds, batch = 64, rate_pps = None))]
fn udp_blast<'py>(
    py: Python<'py>,
    dst: &str,
    port: u16,
    size: usize,
    seconds: f64,
    batch: usize,
    rate_pps: Option<u64>,
) -> PyResult<Bound<'py, PyDict>> {
    let cfg = blast::BlastConfig {
        dst: addr(dst, port)?,
        size,
        seconds,
        batch,
        rate_pps,
    };
    let r = py
        .allow_threads(|| blast::udp_blast(&cfg))
        .map_err(to_py_err)?;
    Ok(report_dict!(py, {
        "packets" => r.packets,
        "bytes" => r.bytes,
        "errors" => r.errors,
        "calls" => r.calls,
        "seconds" => r.seconds,
        "pps" => per_second(r.packets, r.seconds),
    }))
}

/// Count UDP datagrams arriving on bind:port for `seconds` (capped at 30 s), recvmmsg in batches;
/// with `idle`, stop early once datagrams came and then none for `idle` seconds.
///
/// Returns {"packets", "bytes", "seconds", "active_seconds", "pps"}; pps is computed over the
/// window from the first to the last datagram.
#[pyfunction]
#[pyo3(signature = (bind, port, seconds, idle = None))]
fn udp_sink<'py>(
    py: Python<'py>,
    bind: &str,
    port: u16,
    seconds: f64,
    idle: Option<f64>,
) -> PyResult<Bound<'py, PyDict>> {
    let at = addr(bind, port)?;
    let idle = match idle {
        None => None,
        Some(v) if v.is_finite() && v > 0.0 => {
            Some(std::time::Duration::from_secs_f64(v.min(30.0)))
        }
        Some(v) => {
            return Err(PyValueError::new_err(format!(
                "idle must be a positive number, got {v}"
            )))
        }
    };
    let r = py
        .allow_threads(|| blast::udp_sink(at, seconds, idle))
        .map_err(to_py_err)?;
    Ok(report_dict!(py, {
        "packets" => r.packets,
        "bytes" => r.bytes,
        "seconds" => r.seconds,
        "active_seconds" => r.active_seconds,
        "pps" => r.pps(),
    }))
}

/// Open and reset TCP connections to dst:port from `threads` threads for `seconds` (capped at 30 s).
///
/// Returns {"connections", "errors", "seconds", "cps"}.
#[pyfunction]
#[pyo3(signature = (dst, port, seconds, threads = 4))]
fn tcp_connect_rate<'py>(
    py: Python<'py>,
    dst: &str,
    port: u16,
    seconds: f64,
    threads: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let at = addr(dst, port)?;
    let r = py
        .allow_threads(|| blast::tcp_connect_rate(at, seconds, threads))
        .map_err(to_py_err)?;
    Ok(report_dict!(py, {
        "connections" => r.connections,
        "errors" => r.errors,
        "seconds" => r.seconds,
        "cps" => per_second(r.connections, r.seconds),
    }))
}

/// Accept and drop TCP connections on bind:port for `seconds` (capped at 30 s); returns the count.
#[pyfunction]
fn tcp_accept_sink(py: Python<'_>, bind: &str, port: u16, seconds: f64) -> PyResult<u64> {
    let at = addr(bind, port)?;
    py.allow_threads(|| blast::tcp_accept_sink(at, seconds))
        .map_err(to_py_err)
}

/// Add the load generators to `podrouter._native`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(udp_blast, m)?)?;
    m.add_function(wrap_pyfunction!(udp_sink, m)?)?;
    m.add_function(wrap_pyfunction!(tcp_connect_rate, m)?)?;
    m.add_function(wrap_pyfunction!(tcp_accept_sink, m)?)?;
    Ok(())
}
