"""``python -m tuneguard.cli``: the same entry point as the ``tuneguard`` console script."""

from tuneguard.cli import main

if __name__ == "__main__":
    main()
