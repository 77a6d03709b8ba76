"""``python -m fvq ...`` is the ``fvq`` command (so ``torchrun -m fvq ...`` works)."""

from fvq.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
