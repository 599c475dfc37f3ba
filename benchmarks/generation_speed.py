"""Generation speed: the lab's per-character loop against the library, in one run, same model.

    python benchmarks/generation_speed.py [RUN] [--temperature T] [--no-big] [--repeats N]

Without RUN, a randomly initialised lab-sized model (embedding 35, 2 × 85 LSTM, vocabulary 74) is
used: speed does not depend on the weights. Prints characters/s for the lab loop and for the library
with 1, 16 and 256 streams, the ratios, the time to the first character after a 1,000-character
start text, a 1 × 512 model against its memory-bandwidth bound, and one JSON line at the end. Same
as `charlstm bench generate`.
"""

from __future__ import annotations

import sys

from charlstm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "generate", *sys.argv[1:]]))
