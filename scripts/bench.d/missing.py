"""Look up a missing PATH once, then 100 times more, and print the server log's size just before the repeats.

The repeats come 0.2 s after the first lookup, in this one process, so that they fall well within a metadata
TTL of 1 s (s3crypt's default) for the name and its directory alike; the caller counts the server's requests
from the printed offset on.
"""
import os
import sys
import time


def main() -> None:
    path, log = sys.argv[1], sys.argv[2]

    def probe() -> None:
        try:
            os.stat(path)
        except FileNotFoundError:
            pass

    probe()
    time.sleep(0.2)
    print(os.path.getsize(log))
    for _ in range(100):
        probe()


if __name__ == "__main__":
    main()
