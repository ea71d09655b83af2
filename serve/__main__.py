"""``python -m serve``: the same as ``dispider-serve``."""

from serve.cli import main

if __name__ == "__main__":
    main()
