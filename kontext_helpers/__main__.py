"""``python -m kontext_helpers train ...``: see :mod:`kontext_helpers.cli`."""

from .cli import main

if __name__ == "__main__":
    main()
