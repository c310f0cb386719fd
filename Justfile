# podrouter's single entry point. `just --list` shows the recipes.

set shell := ["bash", "-euo", "pipefail", "-c"]

fuzz_targets := "parse decap lpm_vs_linear nat_model vnet_segment gro_coalesce csum ingress_path egress_path"

default:
    @just --list

# set up a fresh machine (root): apt packages, Python deps, build + install the wheel
setup:
    bash scripts/bootstrap.sh

# everything CI runs: Rust tests, fuzz build + short runs, Python unit + integration tests (root)
test: test-rust fuzz-check test-py

ci: setup lint test

# cargo tests of the pure core and the I/O engine (the PyO3 crate is tested through Python)
test-rust:
    cargo test -p podrouter-core -p podrouter-io

# Python tests; the integration suite needs root and network namespaces and is never skipped
test-py:
    python3 -m pytest tests -q --durations=40

test-unit:
    python3 -m pytest tests/unit -q

test-integration:
    python3 -m pytest tests/integration -q

# build every fuzz target and run each one briefly (`just fuzz TARGET 600` runs one for longer)
fuzz-check seconds="15":
    command -v cargo-fuzz >/dev/null || cargo install --locked -q cargo-fuzz
    just _fuzz build --fuzz-dir rust/fuzz -O
    for t in {{fuzz_targets}}; do echo "fuzz: $t for {{seconds}}s"; just fuzz $t {{seconds}} 2>&1 | tail -n 20; done

fuzz target seconds="60":
    just _fuzz run --fuzz-dir rust/fuzz -O {{target}} -- -max_total_time={{seconds}} -rss_limit_mb=2048

# cargo-fuzz needs nightly's -Z flags; where no nightly toolchain is installed, stable with
# RUSTC_BOOTSTRAP=1 accepts them (the toolchain cannot be fetched on every machine)
_fuzz *args:
    if rustup run nightly rustc --version >/dev/null 2>&1; then cargo +nightly fuzz {{args}}; \
    else RUSTC_BOOTSTRAP=1 cargo fuzz {{args}}; fi

lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings
    ruff check python tests bench
    mypy

fmt:
    cargo fmt --all
    ruff check --fix python tests bench
    ruff format python tests bench

# the mode comparison, masquerade vs nftables, shaping accuracy (root): JSON, table and PNG in bench/results
bench *args:
    podrouter bench {{args}}

# criterion microbenchmarks of the packet core (lpm vs ip_network_table, classify+encap, nat)
bench-micro *args:
    cargo bench -p podrouter-core --bench core {{args}}

# a small cluster in network namespaces on this machine, every pod-to-pod path shown, then torn down
demo:
    podrouter demo
