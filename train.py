"""`python train.py [overrides]` — same as the `aeforge-train` console script."""

from aeforge.cli import main

if __name__ == "__main__":
    main()
