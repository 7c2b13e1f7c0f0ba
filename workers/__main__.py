"""`python -m workers --model NAME [--device cpu|cuda:N]`: the same as `llmos worker`."""

from llmos.cli import main

if __name__ == "__main__":
    import sys

    main(["worker", *sys.argv[1:]])
