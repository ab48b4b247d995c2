//! This file exists so the crate has a library target, which lets `relay` list it as a
//! build-dependency (and rebuild when it changes). The programs are in `main.rs`.
#![no_std]
