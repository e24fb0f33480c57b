"""``python -m celltyper.cli``: the same as the ``celltyper`` command."""

from celltyper.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
