"""The run folder: its layout, its metrics log and its checkpoints, owned in one place.

A run folder is what `charlstm train` writes and every other command reads::

    runs/byron/
        config.toml      the whole configuration, enough to repeat the run
        metrics.jsonl    one JSON record per evaluation (and a final one)
        samples.txt      short samples written during training
        best/checkpoint.safetensors   the weights with the best validation loss
        last/checkpoint.safetensors   everything needed to resume exactly
        report.html, report.md, report/   written by `charlstm report`

`folder` knows that layout, `metrics` reads and writes the log, `checkpoint` the file format. The
rest of charlstm asks them instead of joining paths itself.
"""
