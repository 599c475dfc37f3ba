"""Training: the loop and its state (loop, schedule, signals, optimizer state), what differs on many
processes (distributed), starting from another run (transfer), and `orchestrate`, the one entry that
composes them into a job."""
