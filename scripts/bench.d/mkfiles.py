"""Create COUNT files of SIZE bytes in DIR (each opened, written and closed), THREADS at a time.

Prints the elapsed seconds. Used for the small-file workload (one thread, timed) and to fill the listing
directory (several threads, not timed).
"""
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def main() -> None:
    directory, count, size, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    data = os.urandom(size)
    os.makedirs(directory, exist_ok=True)

    def make(i: int) -> None:
        with open(os.path.join(directory, f"f{i:06d}"), "wb") as f:
            f.write(data)

    start = time.monotonic()
    if threads <= 1:
        for i in range(count):
            make(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(make, range(count)))
    print(f"{time.monotonic() - start:.6f}")


if __name__ == "__main__":
    main()
