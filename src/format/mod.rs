//! The client-side object format (see docs/FORMAT.md, which is normative).
mod types;
pub use types::{BlockSize, DataKey, FileId, FILE_ID_LEN, KEY_LEN};
