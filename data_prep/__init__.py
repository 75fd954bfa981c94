"""Offline data preparation: train a tokenizer, then pack tokenized text into MDS shards.

`pretrain prep tokenizer` and `pretrain prep shards` (see `data_prep.cli`) are the entry
points. The error type (`pretrain.errors.PrepError`) and the atomic file write
(`pretrain.files.write_atomic`) are shared with the library.
"""
