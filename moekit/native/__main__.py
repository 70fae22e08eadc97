"""``python -m moekit.native build``: compile the native decode kernels; ``python -m moekit.native info``."""

import argparse
import sys
import time

from moekit import native


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moekit.native", description=__doc__)
    parser.add_argument("command", choices=["build", "info"], help="build: compile the extension (about 40 s); "
                        "info: where it is and which instruction set it uses")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    args = parser.parse_args(argv)
    if args.command == "build":
        start = time.time()
        print(f"moekit: building the native decode kernels into {native.build_dir()} ...", file=sys.stderr, flush=True)
        try:
            native.build(verbose=args.verbose)
        except Exception as e:  # a compiler error, a missing compiler: the PyTorch path still works
            lines = str(e).strip().splitlines() or ["unknown error"]
            why = next((ln for ln in lines if "error:" in ln), lines[-1]).strip()[:300]
            print(f"moekit: the native decode kernels did not build ({why}); "
                  "moekit will use the PyTorch path", file=sys.stderr)
            return 1
        print(f"moekit: native decode kernels built in {time.time() - start:.0f} s ({native.isa()})", file=sys.stderr)
        return 0
    print(f"build directory: {native.build_dir()}\ninstruction set: {native.isa()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
