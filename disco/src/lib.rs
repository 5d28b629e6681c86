//! Disco: NAT-traversal messages and per-peer path selection.
