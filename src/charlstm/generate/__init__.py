"""Generation: the sampling rules, the batched step-by-step engine, its compiled CPU kernels, and
`TextModel`, a trained model loaded from a run folder."""
