//! nvmf
