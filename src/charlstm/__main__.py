"""`python -m charlstm ...` (and `torchrun -m charlstm ...`) run the command-line interface."""

from charlstm.cli import main

if __name__ == "__main__":
    main()
