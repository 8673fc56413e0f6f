"""`python -m mclip` (and `torchrun -m mclip`) runs the CLI."""

from mclip.cli import main

if __name__ == "__main__":
    main()
