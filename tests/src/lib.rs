//! Shared pieces of the privileged test tiers and the demo.
pub mod cluster;
pub mod fixture;
pub mod netns;
pub mod packet;
