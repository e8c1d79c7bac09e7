"""``python -m simmoe``: the same command line as ``simmoe``."""
from .cli import main

if __name__ == "__main__":
    main(prog_name="simmoe")
