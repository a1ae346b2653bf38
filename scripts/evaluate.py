"""`python scripts/evaluate.py ckpt=... eval=...` = `aeforge-eval ...` (torchrun starts this file form):
see aeforge/evaluate.py."""

from aeforge.evaluate import main

if __name__ == "__main__":
    main()
