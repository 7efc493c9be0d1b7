//! The Pipeline resource: its types, how a file of them is loaded, and what makes one valid.

pub mod crd;
pub mod load;
pub mod located;
pub mod schema;
pub mod spec;

pub use load::{Diagnostic, LoadedPipeline, load_file, load_str};
pub use spec::*;
