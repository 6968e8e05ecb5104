"""`python -m tp_runtime.synthetic`: the stable entry point of tp_runtime.convert.synthetic."""
import sys

from tp_runtime.convert.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
