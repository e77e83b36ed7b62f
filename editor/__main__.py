"""`python -m editor` is the `editor` command."""

from editor.cli import main

if __name__ == "__main__":
    main()
