//! vitscope: a terminal lab for watching a Vision Transformer learn CIFAR-10.
//!
//! The flow: [`config`] resolves the settings; [`data`] loads the images as bytes and
//! batches them; [`model`] is the ViT whose forward pass can capture its insides;
//! [`train`] runs on its own thread and reports [`events::Event`]s to a sink and to the
//! [`run`] directory; [`probe`] turns captured tensors into plain data; [`ui`] is the
//! dashboard that draws those events, [`follow`] replays a run directory as events,
//! [`headless`] prints them as lines; [`bench`] measures speed; [`cli`] ties it together.

pub mod cli;
pub mod config;
pub mod data;
pub mod events;
pub mod export;
pub mod headless;
pub mod inspect;
pub mod model;
pub mod ops;
pub mod palette;
pub mod run;
pub mod sys;
pub mod train;
pub mod ui;
