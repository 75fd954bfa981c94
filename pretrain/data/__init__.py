"""The trainer's data: the dataset format prep writes (`format`), the start-up check on
rank 0 (`check`), the sample order (`order`), the streaming loader (`loader`), the
tokenizer, and the mosaicml-streaming import shim."""
