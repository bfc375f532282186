//! Map rows, both ways: how the model's desired frontends and backends
//! become the programs' keys and values ([`encode`]), and how rows read
//! back from the maps look to a human ([`render`]: the golden dump and
//! `inspect`'s rows and tables). Adding a field the kernel reads touches
//! `service-common` (the type), `encode` (what it holds) and `render` (how
//! it shows).

pub mod encode;
pub mod render;

pub use self::encode::{
    SourceRangeRow, addr_bytes, backend_value, family, frontend_key, frontend_range_rows, frontend_ranges,
    frontend_value, rev_nat_value, service_cidrs, unserved_rows,
};
