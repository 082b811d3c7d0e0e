"""``python -m fcconv``: the command line, as the ``fcconv`` script runs it."""

from fcconv.cli import main

if __name__ == "__main__":
    main()
