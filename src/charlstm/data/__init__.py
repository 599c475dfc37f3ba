"""Text in, ids out: corpora and named datasets, the vocabulary, prepared (memory-mapped) corpora,
and the batches training cuts from them. Nothing here knows about models or run folders."""
